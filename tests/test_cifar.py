"""CIFAR-10 from the user's own files: the loader (pixel order, subsets, bad files), the
crop-and-flip augmentation against a NumPy reference, ``models.AirbenchNet``, and the main job
with ``--dataset cifar10 --data_dir``.

Nothing is downloaded: each test writes a small dataset in the official on-disk format
(``cifar-10-batches-py``: pickled dicts written as Python 2 wrote them) to ``tmp_path``.
"""

import functools
import json
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import augment, data, engine, models, study
from jaxrepro.studies import base

PER_BATCH = 8  # 5 training files of 8 images: 40 training images
NUM_TEST = 20


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 wrote its ``str`` (BINSTRING opcodes), as the official
    files hold them (their keys, and the dtype's ``"|"`` and ``"u1"``, which Python 3 reads
    back as bytes with ``encoding="bytes"``); Python 3's protocol 2 would write
    ``_codecs.encode`` calls and unicode strings instead."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes | str):
        if isinstance(obj, str):
            obj = obj.encode("latin1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_py2_str


def _official_pickle(obj) -> bytes:
    """``obj`` pickled as the official CIFAR-10 files are: protocol 2, Python 2 strings, and
    NumPy 1's module name for the array constructor."""
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _batch(rng, n, label_offset=0):
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int((i + label_offset) % 10) for i in range(n)]
    return {
        b"batch_label": b"a batch",
        b"labels": labels,
        b"data": x,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _write(path, obj):
    path.write_bytes(_official_pickle(obj))


def _make_cifar(root, seed=0):
    """Writes a small ``cifar-10-batches-py`` into ``root``; returns the batches written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(data.CIFAR10_TRAIN_FILES):
        batches[name] = _batch(rng, PER_BATCH, label_offset=i)
    batches["test_batch"] = _batch(rng, NUM_TEST, label_offset=3)
    # One known pixel: training image 0, row 2, column 5 is (R, G, B) = (255, 0, 128).
    x0 = batches["data_batch_1"][b"data"]
    x0[0, 0 * 1024 + 2 * 32 + 5], x0[0, 1 * 1024 + 2 * 32 + 5] = 255, 0
    x0[0, 2 * 1024 + 2 * 32 + 5] = 128
    for name, batch in batches.items():
        _write(root / name, batch)
    meta = {b"label_names": [n.encode() for n in data.CIFAR10_CLASSES], b"num_vis": 3072}
    _write(root / "batches.meta", meta)
    return batches


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    return root, _make_cifar(root)


def _expected_images(rows):
    """A plain reference of the layout: pixel (i, j) of channel c is column c*1024 + i*32 + j."""
    n = len(rows)
    out = np.zeros((n, 32, 32, 3), np.float32)
    for c in range(3):
        for i in range(32):
            for j in range(32):
                out[:, i, j, c] = rows[:, c * 1024 + i * 32 + j]
    return out / np.float32(255)


# ---------------------------------------------------------------------------------------------
# The loader.


def test_cifar10_reads_the_official_format_exactly(cifar_dir):
    root, batches = cifar_dir
    ds = data.cifar10(root, normalize=False)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (5 * PER_BATCH, 32, 32, 3) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (NUM_TEST, 32, 32, 3) and ds.y_train.dtype == np.int32
    rows = np.concatenate([batches[n][b"data"] for n in data.CIFAR10_TRAIN_FILES])
    np.testing.assert_array_equal(ds.x_train, _expected_images(rows))
    np.testing.assert_array_equal(ds.x_test, _expected_images(batches["test_batch"][b"data"]))
    np.testing.assert_array_equal(
        ds.y_train, sum((batches[n][b"labels"] for n in data.CIFAR10_TRAIN_FILES), [])
    )
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    np.testing.assert_array_equal(ds.x_train[0, 2, 5], np.float32([1.0, 0.0, 128 / 255]))
    # Normalised (the default): (pixel / 255 - mean[c]) / std[c] with the fixed constants.
    normed = data.cifar10(root)
    mean, std = np.float32(data.CIFAR10_MEAN), np.float32(data.CIFAR10_STD)
    np.testing.assert_allclose(normed.x_train, (ds.x_train - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(normed.x_test, (ds.x_test - mean) / std, rtol=1e-6, atol=1e-6)


def test_cifar10_subsets_and_load_dispatch(cifar_dir, monkeypatch):
    root, _ = cifar_dir
    monkeypatch.setenv("HOME", str(root.parent))  # "~/<dir>" is the user's home's directory
    assert data.load(f"~/{root.name}").num_train == 40
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        data.load(str(root.parent / "no-such-dir"))
    full = data.cifar10(root)
    small = data.cifar10(root, num_train=12, num_test=5)
    np.testing.assert_array_equal(small.x_train, full.x_train[:12])  # first n, across files
    np.testing.assert_array_equal(small.y_test, full.y_test[:5])
    for ds in (data.load(root), data.load(str(root)), data.load("cifar10", data_dir=root)):
        assert ds.name == "cifar10"
        np.testing.assert_array_equal(ds.x_train, full.x_train)
    assert data.load("cifar10", data_dir=root, num_train=3).num_train == 3
    with pytest.raises(ValueError, match="data_dir"):
        data.load("cifar10")
    with pytest.raises(ValueError, match=r"num_train=41 .* at most 40"):
        data.cifar10(root, num_train=41)
    with pytest.raises(ValueError, match="num_test"):
        data.cifar10(root, num_test=-1)


def test_cifar10_accepts_python3_pickles(tmp_path, cifar_dir):
    """Files re-pickled by Python 3 (str keys, the newest protocol) read the same."""
    root, batches = cifar_dir
    other = tmp_path / "py3"
    other.mkdir()
    meta = {"label_names": list(data.CIFAR10_CLASSES)}
    for name, obj in [*batches.items(), ("batches.meta", meta)]:
        obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
        (other / name).write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    np.testing.assert_array_equal(data.cifar10(other).x_test, data.cifar10(root).x_test)


def _bad_data(b):
    b[b"data"] = b[b"data"][:, :3071]


def _bad_label(b):
    b[b"labels"][3] = 10


def _too_few_labels(b):
    b[b"labels"] = b[b"labels"][:-1]


def _float_data(b):
    b[b"data"] = b[b"data"].astype(np.float32)


def _no_labels(b):
    del b[b"labels"]


@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (_bad_data, ValueError, r"data_batch_3: 'data' must be a uint8 array \[N, 3072\]"),
        (_float_data, ValueError, "data_batch_3: 'data' must be a uint8 array"),
        (_bad_label, ValueError, r"data_batch_3: labels must be in \[0, 10\).*max 10"),
        (_too_few_labels, ValueError, "data_batch_3: 8 images but 7 labels"),
        (_no_labels, ValueError, "data_batch_3 has no 'labels' entry"),
    ],
)
def test_cifar10_refuses_a_bad_batch_naming_the_file(tmp_path, spoil, error, match):
    root = tmp_path / "c"
    batches = _make_cifar(root)
    spoil(batches["data_batch_3"])
    _write(root / "data_batch_3", batches["data_batch_3"])
    with pytest.raises(error, match=match):
        data.cifar10(root)


def test_cifar10_refuses_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 directory .*nowhere"):
        data.cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no such file or directory.*nowhere"):
        data.load(tmp_path / "nowhere")  # a path (not a name) that does not exist
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("nowhere")  # neither a name, an .npz nor a path
    root = tmp_path / "c"
    _make_cifar(root)
    (root / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4 does not exist"):
        data.load(root)
    _make_cifar(root)
    (root / "test_batch").write_bytes(os.urandom(64) + b"garbage")
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR-10 pickle"):
        data.cifar10(root)
    _make_cifar(root)
    (root / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="test_batch holds a pickled list"):
        data.cifar10(root)
    _make_cifar(root)
    _write(root / "batches.meta", {b"label_names": [b"a"] * 9})
    with pytest.raises(ValueError, match="batches.meta: 'label_names' must list"):
        data.cifar10(root)


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    """A pickle naming any global but NumPy's array constructors is refused, not run."""
    root = tmp_path / "c"
    _make_cifar(root)
    target = tmp_path / "created_by_the_pickle"
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": _Hostile(str(target))}))
    with pytest.raises(ValueError, match=r"data_batch_2 .*global (posix|os)\.mkdir.*refused"):
        data.cifar10(root)
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# The augmentation.


def _np_crop(image_HxWxC, pad, padding, dy, dx):
    mode = "reflect" if padding == "reflect" else "constant"
    padded = np.pad(image_HxWxC, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    h, w = image_HxWxC.shape[:2]
    return padded[dy : dy + h, dx : dx + w]


@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_random_crop_moves_pixels_as_a_numpy_crop_of_the_padded_image(padding):
    pad, b = 2, 200
    image = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2) + 1.0  # distinct, nonzero
    x = jnp.broadcast_to(image, (b, 5, 6, 2))
    out = np.asarray(augment.RandomCrop(pad=pad, padding=padding)(jax.random.key(1), x))
    seen = set()
    for k in range(b):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(out[k], _np_crop(image, pad, padding, dy, dx))
        ]
        assert len(hits) == 1, (k, hits)
        seen.add(hits[0])
    assert len(seen) == (2 * pad + 1) ** 2  # every offset drawn, per example
    assert np.array_equal(
        np.asarray(augment.RandomCrop(pad=0)(jax.random.key(1), x)), np.asarray(x)
    )


def test_random_flip_and_crop_flip():
    image = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    x = jnp.broadcast_to(image, (64, 4, 4, 3))
    flipped = np.asarray(augment.RandomFlip()(jax.random.key(0), x))
    is_flip = [np.array_equal(f, image[:, ::-1]) for f in flipped]
    assert all(is_flip[k] or np.array_equal(flipped[k], image) for k in range(64))
    assert 10 < sum(is_flip) < 54
    both = np.asarray(augment.RandomCropFlip(pad=1)(jax.random.key(0), x))
    crops = [_np_crop(image, 1, "reflect", dy, dx) for dy in range(3) for dx in range(3)]
    for out in both:
        assert any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in crops)


@pytest.mark.parametrize(
    "aug", [augment.RandomCrop(pad=3), augment.RandomFlip(), augment.RandomCropFlip(pad=4)]
)
def test_image_augmentations_are_pure_functions_of_the_key(aug):
    x = jax.random.normal(jax.random.key(5), (6, 8, 8, 3))
    a = aug(jax.random.key(7), x)
    np.testing.assert_array_equal(a, aug(jax.random.key(7), x))
    np.testing.assert_array_equal(a, jax.jit(aug)(jax.random.key(7), x))
    assert not np.array_equal(a, aug(jax.random.key(8), x))
    # Under vmap over keys (replicas), each key gives its own call's output.
    keys = jax.random.split(jax.random.key(9), 3)
    batched = jax.vmap(aug, in_axes=(0, None))(keys, x)
    for r in range(3):
        np.testing.assert_array_equal(batched[r], aug(keys[r], x))


def test_image_augmentations_refuse_bad_arguments():
    with pytest.raises(ValueError, match="pad must be an int >= 0"):
        augment.RandomCrop(pad=-1)
    with pytest.raises(ValueError, match="padding must be one of"):
        augment.RandomCropFlip(padding="edge")
    with pytest.raises(ValueError, match=r"images \[B, H, W, C\]"):
        augment.RandomFlip()(jax.random.key(0), jnp.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="reflect padding of 4 needs images larger"):
        augment.RandomCrop(pad=4)(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))


# ---------------------------------------------------------------------------------------------
# The model.


def _variables(model, x):
    """Random variables shaped as ``model.init``'s, without compiling the initialisation
    (``eval_shape`` only traces it): normal parameters, BatchNorm running variances of 1."""
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), {"params": jax.random.key(0)}, x
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.5 * rng.normal(size=s.shape).astype(np.float32), shapes["params"]
    )
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, 1.0 if path[-1].key == "var" else 0.0, np.float32),
        shapes.get("batch_stats", {}),
    )
    return {"params": params, "batch_stats": stats} if stats else {"params": params}


def test_airbench_net_shapes_and_patch_conv_equals_xla():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    model = models.AirbenchNet(widths=(4, 6), stem=3, num_classes=5)
    variables = _variables(model, x)
    assert sorted(variables) == ["batch_stats", "params"]
    assert sorted(variables["params"]) == [
        "conv_0_a", "conv_0_b", "conv_1_a", "conv_1_b", "head",
        "norm_0_a", "norm_0_b", "norm_1_a", "norm_1_b", "stem",
    ]  # fmt: skip

    @functools.partial(jax.jit, static_argnames=("module", "train"))
    def apply(module, x, train):
        if train:
            return module.apply(variables, x, train=True, mutable=["batch_stats"])
        return module.apply(variables, x, train=False), {}

    for train in (False, True):
        got, updates = apply(model, x, train)
        want, _ = apply(model.clone(conv="xla"), x, train)
        assert got.shape == (3, 5) and sorted(updates) == (["batch_stats"] if train else [])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, 0.0)
    # Shapes only (traced, not compiled): several heads, grayscale [B, H, W] images.
    two = models.AirbenchNet(widths=(4,), stem=2, num_classes=3, heads=2, norm=None)
    gray = x[..., 0]
    out = jax.eval_shape(
        lambda x: two.apply(
            two.init({"params": jax.random.key(0)}, x, train=False), x, train=False
        ),
        gray,
    )
    assert out.shape == (2, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widths": ()}, "widths"),
        ({"head_scale": 0.0}, "head_scale"),
        ({"conv": "fft"}, "conv"),
        ({"stem": 0}, "stem"),
        ({"norm": "group"}, "norm"),
    ],
)
def test_airbench_net_refuses_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.AirbenchNet(**kwargs)


def test_airbench_net_refuses_images_too_small_for_its_blocks():
    model = models.AirbenchNet(widths=(2, 2, 2))
    with pytest.raises(ValueError, match="at least 8x8"):
        model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 3)), train=False)


def test_airbench_net_trains_with_the_augmentation_as_a_source(cifar_dir):
    """engine.fit with the crop-and-flip augmentation: replicas sharing every key but the
    augment one train to different weights, and the loss is finite."""
    root, _ = cifar_dir
    ds = data.cifar10(root, num_train=16, num_test=8)
    # The main job's task in test_main_job_on_cifar10_end_to_end (the study's defaults with
    # --widths=4), on the same shapes: the two tests share their compilation.
    task = base.airbench_task((4,), 10, "relu", 0.1, 3e-3)
    assert task.augment == augment.RandomCropFlip(pad=4, padding="reflect")
    run = engine.fit(
        task.model,
        task.tx,
        ds,
        replicas=2,
        vary=("augment",),
        batch_size=8,
        epochs=1,
        augment=task.augment,
    )
    assert np.isfinite(run.history["loss"]).all()
    kernels = np.asarray(run.state.params["conv_0_a"]["kernel"])
    assert not np.array_equal(kernels[0], kernels[1])
    assert run.predict(ds.x_test).shape == (2, 8, 10)


# ---------------------------------------------------------------------------------------------
# The studies.


def test_studies_refuse_cifar10_without_data_dir_and_data_dir_without_cifar10(tmp_path):
    with pytest.raises(study.ConfigError, match="data_dir: .*cifar-10-batches-py") as info:
        study.IrreproducibilityConfig(dataset="cifar10")
    assert info.value.fields == ("data_dir",)
    with pytest.raises(study.ConfigError, match="data_dir: only cifar10 read files"):
        study.IrreproducibilityConfig(data_dir=str(tmp_path))
    with pytest.raises(study.ConfigError, match="data_dir"):
        study.TestSetVarianceConfig(datasets=("digits", "cifar10"))
    config = study.TestSetVarianceConfig(datasets=("cifar10",), data_dir=str(tmp_path))
    with pytest.raises(study.ConfigError, match="data_dir: CIFAR-10 file .*batches.meta"):
        base.load_dataset("cifar10", data_dir=config.data_dir)
    assert base.model_task("cifar10", (4,), 10, "relu", 0.0, 1e-3).augment is not None
    assert isinstance(base.model_task("digits", (4,), 10, "relu", 0.0, 1e-3).model, models.MLP)


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "--data_dir: the cifar10 dataset is read from your own copy"),
        (["--data_dir=/nonexistent/cifar"], "--data_dir: CIFAR-10 directory /nonexistent/cifar"),
    ],
)
def test_main_job_refuses_cifar10_without_its_files_before_training(
    tmp_path, binary_body, extra, match
):
    from absl import app

    with pytest.raises(app.UsageError, match=match):
        binary_body(
            study.IrreproducibilityConfig,
            ["--quick", "--dataset=cifar10", f"--workdir={tmp_path / 'w'}", *extra],
        )
    assert not (tmp_path / "w").exists()


def test_a_workdir_written_before_data_dir_existed_resumes(tmp_path):
    config = study.IrreproducibilityConfig.quick()
    study.prepare_workdir(tmp_path, config)
    path = tmp_path / "config.json"
    held = json.loads(path.read_text())
    del held["config"]["data_dir"]
    path.write_text(json.dumps(held))
    study.prepare_workdir(tmp_path, config)  # accepted: data_dir at its default ""


def test_main_job_on_cifar10_end_to_end(tmp_path, cifar_dir, binary_body):
    root, _ = cifar_dir
    workdir = tmp_path / "run"
    argv = [
        "--dataset=cifar10",
        f"--data_dir={root}",
        "--activations=relu",
        "--settings=nothing,augment",
        "--widths=4",
        "--replicas=2",
        "--epochs=1",
        "--batch_size=8",
        "--num_train=16",
        "--num_test=8",
        "--num_samples=10",
        f"--workdir={workdir}",
    ]
    binary_body(study.IrreproducibilityConfig, argv)
    results = json.loads((workdir / "results.json").read_text())
    assert results["complete"] is True
    assert results["config"]["dataset"] == "cifar10"
    assert results["config"]["data_dir"] == str(root)
    records = results["results"]
    assert records["relu/nothing"]["metrics"]["pd_abs"] == 0.0  # the control: identical replicas
    assert records["relu/augment"]["metrics"]["pd_abs"] > 0.0  # the augmentation is drawn
