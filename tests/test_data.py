"""Tests for jaxrepro.data: Dataset validation, MNIST-1D generation and cache, digits, npz, load."""

import dataclasses
import os
import random

import mnist1d.data
import numpy as np
import pytest

from jaxrepro import data


def _base():
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.normal(size=(10, 3)),
        y_train=np.arange(10) % 3,
        x_test=rng.normal(size=(4, 3)),
        y_test=np.array([0, 1, 2, 0]),
        num_classes=3,
        name="tiny",
    )


# ---------------------------------------------------------------- Dataset validation


def test_dataset_normalises_dtypes_and_reports_shapes():
    kw = _base()
    kw["y_train"] = kw["y_train"].astype(np.float64)  # Integer-valued floats are fine.
    ds = data.Dataset(**kw)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.input_shape == (3,) and ds.num_train == 10 and ds.num_test == 4
    assert repr(ds) == "Dataset(name='tiny', num_classes=3, train=10, test=4, input_shape=(3,))"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 4


def test_dataset_accepts_image_inputs_and_lists():
    ds = data.Dataset(np.zeros((2, 8, 8, 1)), [0, 1], np.zeros((1, 8, 8, 1)), [1], num_classes=2)
    assert ds.input_shape == (8, 8, 1)
    assert ds.name == "custom"


def _set(key, value):
    def mutate(kw):
        kw[key] = value(kw) if callable(value) else value

    return mutate


def _nan(kw):
    x = kw["x_test"].copy()
    x[0, 0] = np.nan
    x[1, 2] = np.inf
    kw["x_test"] = x


@pytest.mark.parametrize(
    "mutate, names",
    [
        (_set("y_train", lambda kw: kw["y_train"][:, None]), ["y_train", "1-D"]),
        (_set("x_train", lambda kw: kw["x_train"][:, 0]), ["x_train", "rank"]),
        (_set("x_test", np.float32(1.0)), ["x_test", "rank"]),
        (_set("y_test", np.array([0, 1, 2])), ["x_test", "y_test", "lengths"]),
        (_set("x_train", lambda kw: kw["x_train"].astype(str)), ["x_train", "numeric"]),
        (_set("y_train", lambda kw: kw["y_train"].astype(str)), ["y_train", "numeric"]),
        (_set("y_test", np.array([0.0, 1.5, 2.0, 0.0])), ["y_test", "integer"]),
        (_set("y_test", np.array([0.0, np.nan, 2.0, 0.0])), ["y_test", "integer"]),
        (_set("y_train", lambda kw: kw["y_train"] + 1), ["y_train", "outside", "max 3"]),
        (_set("y_test", np.array([0, -1, 2, 0])), ["y_test", "outside", "min -1"]),
        (_nan, ["x_test", "2 non-finite"]),
        (_set("x_train", np.full((10, 3), 1e300)), ["x_train", "30 non-finite"]),
        (_set("x_test", np.zeros((4, 4))), ["x_train", "x_test", "(3,)", "(4,)"]),
        (_set("x_test", np.zeros((4, 3, 1))), ["x_test", "shapes"]),
        (_set("x_test", np.zeros((0, 3))), ["x_test", "empty"]),
        (_set("num_classes", 1), ["num_classes"]),
        (_set("num_classes", 2.0), ["num_classes"]),
        (_set("x_train", lambda kw: kw["x_train"] + 0j), ["x_train", "numeric"]),
    ],
)
def test_dataset_validation_errors_name_the_array(mutate, names):
    kw = _base()
    if "empty" in names:
        kw["y_test"] = np.zeros((0,), np.int64)
    mutate(kw)
    with pytest.raises(ValueError) as info:
        data.Dataset(**kw)
    for name in names:
        assert name in str(info.value)


# ---------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """One standard MNIST-1D generation (~1.3 s) shared by the tests; returns (dataset, dir)."""
    cache_dir = tmp_path_factory.mktemp("mnist1d_cache")
    return data.mnist1d(cache_dir=cache_dir), cache_dir


def _forbid_generation(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("make_dataset called: the cache was not used")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)


def test_mnist1d_shapes_and_dtypes(mnist_cache):
    ds, cache_dir = mnist_cache
    assert ds.name == "mnist1d" and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert abs(float(ds.x_train.std()) - 1.0) < 0.1  # The generator standardises x.
    files = os.listdir(cache_dir)
    assert len(files) == 1 and files[0].startswith("mnist1d_") and files[0].endswith(".npz")


def test_mnist1d_second_call_hits_cache(mnist_cache, monkeypatch):
    ds, cache_dir = mnist_cache
    _forbid_generation(monkeypatch)
    again = data.mnist1d(cache_dir=cache_dir)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, key), getattr(ds, key))
    assert again.num_classes == 10 and again.name == "mnist1d"


def test_load_mnist1d_uses_the_cache(mnist_cache, monkeypatch):
    ds, cache_dir = mnist_cache
    _forbid_generation(monkeypatch)
    np.testing.assert_array_equal(data.load("mnist1d", cache_dir=cache_dir).x_test, ds.x_test)


def test_mnist1d_cache_is_keyed_by_arguments(mnist_cache, tmp_path):
    _, cache_dir = mnist_cache
    base = data.mnist1d_cache_path(cache_dir)
    assert base.exists()
    assert data.mnist1d_cache_path(cache_dir, seed=43) != base
    assert data.mnist1d_cache_path(cache_dir, num_samples=4000) != base
    assert data.mnist1d_cache_path(cache_dir, iid_noise_scale=0.1) != base
    assert data.mnist1d_cache_path(cache_dir, seed=42) == base

    small_a = data.mnist1d(num_samples=200, seed=1, cache_dir=tmp_path)
    small_b = data.mnist1d(num_samples=200, seed=2, cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 2  # One file per argument set, no temp files left.
    assert not np.array_equal(small_a.x_train, small_b.x_train)
    assert small_a.num_train == 160 and small_a.num_test == 40


def test_mnist1d_generation_is_deterministic_and_restores_global_rng(tmp_path):
    random.seed(123)
    np.random.seed(123)
    py_before, np_before = random.random(), np.random.random()
    random.seed(123)
    np.random.seed(123)
    a = data.mnist1d(num_samples=200, seed=5, cache_dir=tmp_path / "a")
    assert (random.random(), np.random.random()) == (py_before, np_before)
    b = data.mnist1d(num_samples=200, seed=5, cache_dir=tmp_path / "b")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_mnist1d_overrides_are_applied(tmp_path):
    ds = data.mnist1d(num_samples=100, train_split=0.5, final_seq_length=20, cache_dir=tmp_path)
    assert ds.x_train.shape == (50, 20) and ds.x_test.shape == (50, 20)


@pytest.mark.parametrize("bad", [{"url": "https://example.com"}, {"not_an_arg": 1}])
def test_mnist1d_rejects_unknown_overrides(bad, tmp_path):
    with pytest.raises(ValueError, match=next(iter(bad))):
        data.mnist1d(cache_dir=tmp_path, **bad)


def test_mnist1d_env_cache_dir_and_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXREPRO_CACHE", str(tmp_path))
    path = data.mnist1d_cache_path(num_samples=100)
    assert path.parent == tmp_path
    path.write_bytes(b"not a zip file")
    ds = data.mnist1d(num_samples=100)
    assert ds.num_train == 80
    with np.load(path) as f:
        np.testing.assert_array_equal(f["x_test"].astype(np.float32), ds.x_test)


# ---------------------------------------------------------------- digits


def test_digits_flat_and_images():
    flat = data.digits()
    img = data.digits(images=True)
    assert flat.name == "digits" and img.name == "digits_images"
    assert flat.x_train.shape == (1437, 64) and flat.x_test.shape == (360, 64)
    assert img.x_train.shape == (1437, 8, 8, 1) and img.input_shape == (8, 8, 1)
    assert flat.num_classes == 10
    assert flat.x_train.min() >= 0.0 and flat.x_train.max() == 1.0
    np.testing.assert_array_equal(img.x_train.reshape(-1, 64), flat.x_train)
    np.testing.assert_array_equal(img.y_test, flat.y_test)


def test_digits_split_is_stratified_and_deterministic():
    ds = data.digits(test_fraction=0.25, seed=3)
    all_y = np.concatenate([ds.y_train, ds.y_test])
    assert ds.num_train + ds.num_test == 1797
    counts, test_counts = np.bincount(all_y), np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * counts) <= 1)
    again = data.digits(test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    other = data.digits(test_fraction=0.25, seed=4)
    assert not np.array_equal(ds.y_test, other.y_test)


def test_digits_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(test_fraction=1.0)


# ---------------------------------------------------------------- npz and load


def test_npz_round_trip(tmp_path):
    ds = data.Dataset(**_base())
    path = data.to_npz(ds, tmp_path / "tiny_set.npz")
    back = data.from_npz(path)
    assert back.name == "tiny_set" and back.num_classes == 3
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_set.npz"]
    named = data.from_npz(path, num_classes=7, name="mine")
    assert named.num_classes == 7 and named.name == "mine"


def test_from_npz_user_file_infers_classes_from_both_splits(tmp_path):
    kw = _base()
    path = tmp_path / "user.npz"
    np.savez(
        path,
        x_train=kw["x_train"],
        y_train=kw["y_train"],
        x_test=kw["x_test"],
        y_test=np.array([0, 1, 5, 0]),
    )
    assert data.from_npz(path).num_classes == 6


def test_from_npz_missing_key(tmp_path):
    kw = _base()
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=kw["x_train"], y_train=kw["y_train"], x_test=kw["x_test"])
    with pytest.raises(ValueError, match="y_test"):
        data.from_npz(path)


def test_from_npz_bad_labels_still_name_the_array(tmp_path):
    kw = _base()
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        x_train=kw["x_train"],
        y_train=kw["y_train"] + 0.5,
        x_test=kw["x_test"],
        y_test=kw["y_test"],
    )
    with pytest.raises(ValueError, match="y_train"):
        data.from_npz(path)


def test_load_dispatch(tmp_path):
    assert data.load("digits").input_shape == (64,)
    assert data.load("digits_images").input_shape == (8, 8, 1)
    path = data.to_npz(data.Dataset(**_base()), tmp_path / "x.npz")
    assert data.load(path).num_train == 10
    assert data.load(str(path), name="n").name == "n"
    with pytest.raises(ValueError) as info:
        data.load("cifar100")
    for choice in ("cifar10", "mnist1d", "digits", "digits_images", ".npz"):
        assert choice in str(info.value)
