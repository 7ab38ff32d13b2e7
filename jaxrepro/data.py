"""Datasets: a validated in-memory `Dataset` and loaders for MNIST-1D, sklearn digits, CIFAR-10
from the user's own files, and `.npz`.

Synopsis::

    >>> import os, tempfile
    >>> from jaxrepro import data
    >>> ds = data.mnist1d()             # generated locally, cached on disk
    >>> ds.x_train.shape, ds.x_test.shape, ds.input_shape, ds.num_classes
    ((4000, 40), (1000, 40), (40,), 10)
    >>> ds.x_train.dtype, ds.y_train.dtype
    (dtype('float32'), dtype('int32'))
    >>> data.digits(images=True).input_shape    # sklearn's 8x8 digits in [0, 1]
    (8, 8, 1)
    >>> path = data.to_npz(ds, os.path.join(tempfile.mkdtemp(), "my_data.npz"))
    >>> data.load(path).num_train               # x_train, y_train, x_test, y_test
    4000

Every loader returns host (NumPy) arrays checked once, so the rest of the library can trust their
shapes, dtypes and label ranges. Nothing is downloaded: MNIST-1D is generated with the `mnist1d`
package's own generator and cached as ``.npz`` (set ``JAXREPRO_CACHE`` to move the cache);
CIFAR-10 is read from the official ``cifar-10-batches-py`` directory the user already has
(`cifar10`, or ``load(that_directory)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pickle
import random
import uuid
import zipfile
from pathlib import Path

import numpy as np

from jaxrepro import checks

LOADERS = ("mnist1d", "digits", "digits_images", "cifar10")
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Bump when the cached file layout or the generation procedure here changes.
_MNIST1D_CACHE_VERSION = 1


def _is_numeric(dtype: np.dtype) -> bool:
    """Real numbers or booleans (not complex, strings, objects, datetimes)."""
    return dtype == np.bool_ or (
        np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    )


def _check_x(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if not _is_numeric(x.dtype):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have a leading example axis and at least one feature axis "
            f"(rank >= 2), got shape {x.shape}"
        )
    with np.errstate(over="ignore"):  # Overflow gives inf, which Dataset reports by count.
        return np.asarray(x, dtype=np.float32)


def _check_y(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if not _is_numeric(y.dtype):
        raise ValueError(f"{name} must be numeric (integer labels), got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one integer label per example), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            first = y[np.argmax(bad)]
            raise ValueError(
                f"{name} must hold integer labels; {int(bad.sum())} are not integers "
                f"(first: {first!r})"
            )
    return y


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification dataset held as validated NumPy arrays.

    `__post_init__` converts ``x_*`` to float32 and ``y_*`` to int32 and raises `ValueError`
    (naming the array) for: wrong rank (``y`` 1-D; ``x`` at least 2-D with examples first), x/y
    length mismatch, empty split, non-numeric dtype, non-integer labels, labels outside
    ``[0, num_classes)``, NaN/inf in ``x``, different per-example shapes in train and test, or
    ``num_classes < 2``. Instances compare by identity (arrays have no single truth value).

    Example:
        >>> ds = Dataset(np.zeros((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [1, 0], num_classes=2)
        >>> ds
        Dataset(name='custom', num_classes=2, train=4, test=2, input_shape=(3,))

    Attributes:
        x_train: inputs ``[N_train, *input_shape]``, float32.
        y_train: labels ``[N_train]``, int32 in ``[0, num_classes)``.
        x_test: inputs ``[N_test, *input_shape]``, float32.
        y_test: labels ``[N_test]``, int32 in ``[0, num_classes)``.
        num_classes: number of classes, >= 2.
        name: a short label for reports.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = "custom"

    def __post_init__(self):
        n = self.num_classes
        checks.integer("num_classes", n, minimum=2)
        object.__setattr__(self, "num_classes", int(n))
        for split in ("train", "test"):
            x = _check_x(f"x_{split}", getattr(self, f"x_{split}"))
            y = _check_y(f"y_{split}", getattr(self, f"y_{split}"))
            if len(x) != len(y):
                raise ValueError(
                    f"x_{split} and y_{split} have different lengths: {len(x)} vs {len(y)}"
                )
            if len(x) == 0:
                raise ValueError(f"x_{split} and y_{split} are empty (0 examples)")
            low, high = y.min(), y.max()
            if low < 0 or high >= n:
                raise ValueError(
                    f"y_{split} has labels outside [0, {n}) (num_classes={n}): "
                    f"min {low}, max {high}"
                )
            nonfinite = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            if nonfinite:
                raise ValueError(
                    f"x_{split} has {nonfinite} non-finite values (NaN or inf, after conversion "
                    f"to float32) out of {np.size(x)}"
                )
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y.astype(np.int32))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_train and x_test have different per-example shapes: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(40,)`` or ``(8, 8, 1)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, num_classes={self.num_classes}, "
            f"train={self.num_train}, test={self.num_test}, input_shape={self.input_shape})"
        )


def _default_cache_dir() -> Path:
    return Path(os.environ.get("JAXREPRO_CACHE") or Path.home() / ".cache" / "jaxrepro")


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Writes an ``.npz`` via a temporary file in the same directory and `os.replace`.

    Readers never see a partial file, and concurrent writers of the same path each replace it
    with a complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:  # Default permissions (umask), unlike tempfile.mkstemp.
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mnist1d_args(num_samples: int = 5000, seed: int = 42, **overrides) -> dict:
    """Returns the MNIST-1D generation arguments (without ``url``) with overrides applied.

    Example:
        >>> mnist1d_args(seed=1)["final_seq_length"]
        40

    Raises:
        ValueError: an override that is not a generation argument of `mnist1d`.
    """
    import mnist1d.data

    args = mnist1d.data.get_dataset_args(as_dict=True)
    args.pop("url", None)
    updates = {"num_samples": num_samples, "seed": seed, **overrides}
    unknown = sorted(set(updates) - set(args))
    if unknown:
        raise ValueError(
            f"unknown MNIST-1D argument(s) {unknown}; known: {', '.join(sorted(args))}"
        )
    args.update(updates)
    return args


def mnist1d_cache_path(cache_dir: str | os.PathLike | None = None, **kwargs) -> Path:
    """The cache file `mnist1d` uses for these arguments (same keywords as `mnist1d`).

    The name holds a hash of the generation arguments, the `mnist1d` package version and this
    module's cache version, so changing any of them gives a different file.
    """
    args = mnist1d_args(**kwargs)
    key = {
        "args": args,
        "mnist1d_version": importlib.metadata.version("mnist1d"),
        "cache_version": _MNIST1D_CACHE_VERSION,
    }
    # NumPy scalars hash like the Python numbers they equal; anything else by its repr.
    blob = json.dumps(key, sort_keys=True, default=lambda o: getattr(o, "item", o.__repr__)())
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else _default_cache_dir()) / (
        f"mnist1d_{digest}.npz"
    )


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    """Runs the `mnist1d` generator, restoring the global RNG state it reseeds."""
    import mnist1d.data
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        out = mnist1d.data.make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": out["x"],
        "y_train": out["y"],
        "x_test": out["x_test"],
        "y_test": out["y_test"],
    }


def mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    **overrides,
) -> Dataset:
    """MNIST-1D, generated locally with the `mnist1d` package and cached on disk; never downloads.

    The first call for a set of arguments runs ``mnist1d.data.make_dataset`` (~1-2 s) and writes
    ``mnist1d_<hash>.npz`` atomically into `cache_dir`; later calls load that file. With the
    defaults this is the standard split: 4000 train and 1000 test sequences of length 40, 10
    classes.

    Example:
        >>> ds = mnist1d()
        >>> ds.x_train.shape, ds.x_test.shape
        ((4000, 40), (1000, 40))

    Args:
        num_samples: total number of sequences (train + test).
        seed: generator seed.
        cache_dir: where the cache lives; default ``$JAXREPRO_CACHE`` or ``~/.cache/jaxrepro``.
        **overrides: other fields of ``mnist1d.data.get_dataset_args()``, e.g. ``train_split``,
            ``iid_noise_scale``, ``shuffle_seq`` (``url`` is not one: nothing is downloaded).

    Returns:
        A `Dataset` named ``"mnist1d"`` with x ``[N, final_seq_length]``.

    Raises:
        ValueError: an unknown override.
    """
    checks.integer("num_samples", num_samples, minimum=2)
    checks.integer("seed", seed, minimum=0)
    args = mnist1d_args(num_samples=num_samples, seed=seed, **overrides)
    path = mnist1d_cache_path(cache_dir, num_samples=num_samples, seed=seed, **overrides)
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in _SPLIT_KEYS}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            arrays = None  # Unreadable cache entry: regenerate and overwrite it.
    if arrays is None:
        arrays = _generate_mnist1d(args)
        _atomic_savez(path, **arrays)
    return Dataset(**arrays, num_classes=10, name="mnist1d")


def digits(*, images: bool = False, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, ships with sklearn, no download).

    Pixels are scaled from 0..16 to [0, 1]; the train/test split is stratified by class and
    deterministic given `seed` (``train_test_split(..., stratify=y, random_state=seed)``).

    Example:
        >>> ds = digits(images=True)
        >>> ds.x_train.shape, ds.num_test
        ((1437, 8, 8, 1), 360)

    Args:
        images: ``[N, 8, 8, 1]`` images (for `CNN2D`) instead of flat ``[N, 64]`` vectors.
        test_fraction: fraction of examples in the test split, in (0, 1).
        seed: seed of the split.

    Returns:
        A `Dataset` named ``"digits_images"`` or ``"digits"`` with 10 classes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    checks.boolean("images", images)
    checks.integer("seed", seed, minimum=0)
    if not checks.is_number(test_fraction) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x_N = bunch.data.astype(np.float32) / 16.0
    if images:
        x_N = x_N.reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x_N, bunch.target, test_size=test_fraction, stratify=bunch.target, random_state=seed
    )
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=10,
        name="digits_images" if images else "digits",
    )


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel (R, G, B) mean and standard deviation of CIFAR-10's 50,000 training images
scaled to [0, 1], to 4 digits (the constants airbench and most CIFAR code use): what `cifar10`
normalises with."""
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""The class names, label 0 to 9 (``batches.meta``'s ``label_names``)."""
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
_CIFAR10_PIXELS = 3 * 32 * 32
_CIFAR10_HINT = (
    "give the cifar-10-batches-py directory extracted from the official cifar-10-python.tar.gz "
    "(https://www.cs.toronto.edu/~kriz/cifar.html)"
)


def _numpy_global(module: str, name: str):
    """The NumPy object a pickle names, from ``numpy._core`` on NumPy 2 (where ``numpy.core``,
    which older pickles name, is a deprecated alias) or ``numpy.core`` on NumPy 1."""
    if module == "numpy":
        return getattr(np, name)
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module.rsplit(".", 1)[1]), name)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and NumPy arrays, and nothing else.

    A pickle runs code by naming a global (a class or function) for the unpickler to import
    and call; this one refuses every global but the few that rebuild an ndarray, a dtype or a
    NumPy scalar (and ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for
    bytes). It narrows what a hostile file can do; it is no licence to load untrusted files.
    """

    ALLOWED = frozenset(
        [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
        + [
            (f"numpy.{core}.{module}", name)
            for core in ("core", "_core")
            for module, name in (
                ("multiarray", "_reconstruct"),
                ("multiarray", "scalar"),
                ("numeric", "_frombuffer"),
            )
        ]
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it asks for the global {module}.{name}, which a CIFAR-10 file never holds "
                "(only NumPy arrays, lists and strings); refused"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        return _numpy_global(module, name)


def _unpickle(path: Path) -> dict:
    """One CIFAR-10 file: a pickled dict (keys bytes, as Python 2 wrote them, or str)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 file {path} does not exist (or is not a file); {_CIFAR10_HINT}"
        )
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    # Bytes that are not a pickle fail in the unpickler's every way (UnpicklingError,
    # EOFError, ValueError, KeyError, TypeError, UnicodeDecodeError, ...): one message for all.
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable CIFAR-10 pickle ({type(e).__name__}: {e}); {_CIFAR10_HINT}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a pickled {type(obj).__name__}, not the dict of a CIFAR-10 file"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _entry(path: Path, batch: dict, key: str):
    if key not in batch:
        raise ValueError(
            f"{path} has no {key!r} entry (it has {sorted(map(str, batch))}); "
            f"is it a CIFAR-10 file? {_CIFAR10_HINT}"
        )
    return batch[key]


def _cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch file's images ``uint8 [N, 3072]`` and labels ``int64 [N]``, checked."""
    batch = _unpickle(path)
    x_Nx3072 = _entry(path, batch, "data")
    if (
        not isinstance(x_Nx3072, np.ndarray)
        or x_Nx3072.dtype != np.uint8
        or x_Nx3072.ndim != 2
        or x_Nx3072.shape[1] != _CIFAR10_PIXELS
    ):
        got = (
            f"a {x_Nx3072.dtype} array of shape {x_Nx3072.shape}"
            if isinstance(x_Nx3072, np.ndarray)
            else f"a {type(x_Nx3072).__name__}"
        )
        raise ValueError(
            f"{path}: 'data' must be a uint8 array [N, {_CIFAR10_PIXELS}] (32x32 pixels of 3 "
            f"channels, one image a row), got {got}"
        )
    try:
        y_N = np.asarray(_entry(path, batch, "labels"))
    except ValueError as e:  # ragged lists
        raise ValueError(f"{path}: 'labels' is not a list of integers ({e})") from None
    if y_N.ndim != 1 or (y_N.size and y_N.dtype.kind not in "iu"):
        raise ValueError(
            f"{path}: 'labels' must be a list of integers, got {y_N.dtype} values of shape "
            f"{y_N.shape}"
        )
    if len(y_N) != len(x_Nx3072):
        raise ValueError(
            f"{path}: {len(x_Nx3072)} images but {len(y_N)} labels; they must match one to one"
        )
    if y_N.size and (y_N.min() < 0 or y_N.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(
            f"{path}: labels must be in [0, 10) (CIFAR-10's 10 classes), got min {y_N.min()}, "
            f"max {y_N.max()}"
        )
    return x_Nx3072, y_N.astype(np.int64)


def _cifar10_images(x_Nx3072: np.ndarray, normalize: bool) -> np.ndarray:
    """``uint8 [N, 3072]`` rows (the R plane, then G, then B, each 32x32 row-major) to float32
    NHWC images ``[N, 32, 32, 3]`` in [0, 1], then normalised per channel if asked."""
    x_NxHxWxC = x_Nx3072.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32, order="C")
    x_NxHxWxC /= np.float32(255.0)
    if normalize:
        x_NxHxWxC -= np.asarray(CIFAR10_MEAN, np.float32)
        x_NxHxWxC /= np.asarray(CIFAR10_STD, np.float32)
    return x_NxHxWxC


def cifar10(
    data_dir: str | os.PathLike,
    *,
    num_train: int = 0,
    num_test: int = 0,
    normalize: bool = True,
) -> Dataset:
    """CIFAR-10 read from the user's own copy of the official Python version; never downloads.

    ``data_dir`` is the ``cifar-10-batches-py`` directory extracted from
    ``cifar-10-python.tar.gz``: ``data_batch_1`` to ``data_batch_5`` (the training set, in that
    order), ``test_batch`` and ``batches.meta``, each a pickled dict. A batch file's ``data`` is
    a uint8 array ``[N, 3072]``, one image a row: the red plane, then green, then blue, each
    32x32 row-major; its ``labels`` is a list of N integers in [0, 10). ``batches.meta``'s
    ``label_names`` must list 10 names. The official files hold 10,000 images each; smaller
    files in the same format are read the same way. Every file must be present: a missing batch
    is an error, never a smaller training set.

    These files are pickles, and unpickling can run code. The files are read with an unpickler
    that refuses every global but NumPy's array constructors, which stops the usual attacks,
    but point ``data_dir`` only at files you trust (your own download of the official archive).

    Pixels are scaled to [0, 1], then (``normalize=True``, the default) each channel is
    normalised with `CIFAR10_MEAN` and `CIFAR10_STD`, the statistics of the full training set:
    ``x = (pixel / 255 - mean[c]) / std[c]`` in float32. Fixed constants rather than the
    statistics of the images loaded are the project's choice: an input then means the same
    whatever subset (``num_train``) or file set is loaded, and the numbers are the ones other
    CIFAR-10 code uses.

    Example::

        ds = data.cifar10("~/data/cifar-10-batches-py")   # or data.load(that directory)
        ds.x_train.shape, ds.x_test.shape                 # ((50000, 32, 32, 3), (10000, 32, 32, 3))

    Args:
        data_dir: the ``cifar-10-batches-py`` directory (``~`` is expanded).
        num_train: keep the first ``num_train`` training images (file order); 0: all.
        num_test: keep the first ``num_test`` test images; 0: all.
        normalize: normalise per channel (see above); False leaves the pixels in [0, 1].

    Returns:
        A `Dataset` named ``"cifar10"``: x float32 NHWC ``[N, 32, 32, 3]``, 10 classes (named
        by `CIFAR10_CLASSES`).

    Raises:
        FileNotFoundError: ``data_dir`` is not a directory, or one of its files is missing
            (named).
        ValueError: a file that is not a readable pickle, asks for a global other than NumPy's
            array constructors, lacks ``data`` or ``labels``, has ``data`` not uint8
            ``[N, 3072]``, labels not integers in [0, 10) or not one per image, a
            ``batches.meta`` without 10 ``label_names`` (each message names the file); or
            ``num_train`` / ``num_test`` above what the files hold.
    """
    checks.integer("num_train", num_train, minimum=0)
    checks.integer("num_test", num_test, minimum=0)
    checks.boolean("normalize", normalize)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 directory {root} does not exist (or is not a directory); {_CIFAR10_HINT}"
        )
    meta_path = root / CIFAR10_META_FILE
    names = _entry(meta_path, _unpickle(meta_path), "label_names")
    if not isinstance(names, (list, tuple)) or len(names) != len(CIFAR10_CLASSES):
        raise ValueError(
            f"{meta_path}: 'label_names' must list CIFAR-10's 10 class names, got {names!r:.200}"
        )
    splits = {}
    for split, file_names, wanted in (
        ("train", CIFAR10_TRAIN_FILES, num_train),
        ("test", (CIFAR10_TEST_FILE,), num_test),
    ):
        parts = [_cifar10_batch(root / name) for name in file_names]
        x_Nx3072 = np.concatenate([x for x, _ in parts])
        y_N = np.concatenate([y for _, y in parts])
        if wanted > len(y_N):
            raise ValueError(
                f"num_{split}={wanted} asks for more {split} images than {root} holds "
                f"({len(y_N)} in {', '.join(file_names)}); use at most {len(y_N)} (0: all)"
            )
        n = wanted or len(y_N)
        splits[split] = (_cifar10_images(x_Nx3072[:n], normalize), y_N[:n])
    return Dataset(*splits["train"], *splits["test"], num_classes=10, name="cifar10")


def to_npz(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Saves `dataset`'s four arrays to `path` (atomically), readable by `from_npz`.

    Returns:
        The path written.
    """
    path = Path(path)
    _atomic_savez(path, **{k: getattr(dataset, k) for k in _SPLIT_KEYS})
    return path


def from_npz(
    path: str | os.PathLike, num_classes: int | None = None, name: str | None = None
) -> Dataset:
    """Loads a user's ``.npz`` holding ``x_train``, ``y_train``, ``x_test`` and ``y_test``.

    Example:
        >>> import os, tempfile
        >>> path = to_npz(digits(), os.path.join(tempfile.mkdtemp(), "my_data.npz"))
        >>> from_npz(path).num_classes
        10

    Args:
        path: the ``.npz`` file (loaded without pickle).
        num_classes: default ``max label + 1`` over both splits.
        name: default the file name without its extension.

    Returns:
        A validated `Dataset`.

    Raises:
        ValueError: a missing key (named), or any `Dataset` validation failure.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist (or is not a file)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); write one with "
            "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array under a .npz name
        raise ValueError(
            f"{path} holds a single .npy array (shape {getattr(loaded, 'shape', '?')}), not an "
            ".npz archive of x_train, y_train, x_test and y_test; write one with numpy.savez"
        )
    with loaded as f:
        missing = [k for k in _SPLIT_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} is missing array(s) {missing}; it has {sorted(f.files)}, "
                f"needs {list(_SPLIT_KEYS)}"
            )
        arrays = {}
        for k in _SPLIT_KEYS:
            try:
                arrays[k] = f[k]
            except ValueError as e:  # object (pickled) arrays are never loaded
                raise ValueError(
                    f"{path}: array {k!r} cannot be read without pickle ({e}); store numeric "
                    "arrays (float inputs, integer labels)"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(
                    f"{path}: array {k!r} is damaged ({type(e).__name__}: {e})"
                ) from None
    if num_classes is None:
        labels = np.concatenate([np.ravel(arrays["y_train"]), np.ravel(arrays["y_test"])])
        try:
            num_classes = int(np.max(labels)) + 1
        except (ValueError, TypeError, OverflowError):
            num_classes = 2  # Labels are empty or not numbers: Dataset reports the real problem.
    return Dataset(**arrays, num_classes=num_classes, name=name if name is not None else path.stem)


def load(name_or_path: str | os.PathLike, **kwargs) -> Dataset:
    """Loads a dataset by name (``"mnist1d"``, ``"digits"``, ``"digits_images"``, ``"cifar10"``)
    or path (an ``.npz`` file, or a CIFAR-10 ``cifar-10-batches-py`` directory).

    Example:
        >>> load("digits").input_shape
        (64,)

    ``load("cifar10", data_dir=d)`` and ``load(d)`` are both ``cifar10(d)``: CIFAR-10 is never
    downloaded, so the name needs the directory of the user's copy.

    Args:
        name_or_path: one of `LOADERS`, a path ending in ``.npz``, or a directory (read as
            CIFAR-10 by `cifar10`).
        **kwargs: passed to the loader (e.g. ``seed``, ``cache_dir``, ``num_classes``;
            ``data_dir``, ``num_train``, ``num_test`` for ``"cifar10"``).

    Raises:
        ValueError: anything else (the message lists the choices), ``"cifar10"`` without
            ``data_dir``, or a file that is not a readable ``.npz`` of numeric arrays or
            CIFAR-10 batch (the message names the file and the fix).
        FileNotFoundError: a path that does not exist, or a CIFAR-10 directory missing a file.
        jaxrepro.checks.BadType: ``name_or_path`` is neither a string nor a path.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise checks.BadType(
            f"name_or_path must be a dataset name ({', '.join(LOADERS)}), a path to an .npz "
            f"file or a CIFAR-10 directory, got {name_or_path!r}"
        )
    key = os.fspath(name_or_path)
    if key == "mnist1d":
        return mnist1d(**kwargs)
    if key == "digits":
        return digits(**kwargs)
    if key == "digits_images":
        return digits(images=True, **kwargs)
    if key == "cifar10":
        if kwargs.get("data_dir") is None:
            raise ValueError(
                "cifar10 is read from your own copy, never downloaded: pass "
                "data_dir=<the cifar-10-batches-py directory> (or load that directory's path)"
            )
        return cifar10(**kwargs)
    key = os.path.expanduser(key)
    if key.endswith(".npz"):
        return from_npz(key, **kwargs)
    if os.path.isdir(key):
        return cifar10(key, **kwargs)
    if os.sep in key or key.startswith("."):
        raise FileNotFoundError(f"no such file or directory: {key!r}")
    raise ValueError(
        f"unknown dataset {key!r}: choose one of {', '.join(LOADERS)}, a path ending in .npz or "
        "a CIFAR-10 directory (cifar-10-batches-py)"
    )
