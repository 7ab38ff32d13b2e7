"""Datasets: a validated in-memory `Dataset` and loaders for MNIST-1D, sklearn digits and `.npz`.

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
package's own generator and cached as ``.npz`` (set ``JAXREPRO_CACHE`` to move the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import random
import uuid
import zipfile
from pathlib import Path

import numpy as np

from jaxrepro import checks

LOADERS = ("mnist1d", "digits", "digits_images")
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
    """Loads a dataset by name (``"mnist1d"``, ``"digits"``, ``"digits_images"``) or ``.npz`` path.

    Example:
        >>> load("digits").input_shape
        (64,)

    Args:
        name_or_path: one of `LOADERS`, or a path ending in ``.npz``.
        **kwargs: passed to the loader (e.g. ``seed``, ``cache_dir``, ``num_classes``).

    Raises:
        ValueError: anything else (the message lists the choices), or a file that is not a
            readable ``.npz`` of numeric arrays (the message names the file and the fix).
        FileNotFoundError: a path that does not exist.
        jaxrepro.checks.BadType: ``name_or_path`` is neither a string nor a path.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise checks.BadType(
            f"name_or_path must be a dataset name ({', '.join(LOADERS)}) or a path to an .npz "
            f"file, got {name_or_path!r}"
        )
    key = os.fspath(name_or_path)
    if key == "mnist1d":
        return mnist1d(**kwargs)
    if key == "digits":
        return digits(**kwargs)
    if key == "digits_images":
        return digits(images=True, **kwargs)
    if key.endswith(".npz"):
        return from_npz(key, **kwargs)
    raise ValueError(
        f"unknown dataset {key!r}: choose one of {', '.join(LOADERS)} or a path ending in .npz"
    )
