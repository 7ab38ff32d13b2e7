"""The synthetic generator: determinism given its seed, and labels that follow its teacher."""

import numpy as np
import pytest
from scipy import stats

from jaxrepro import data, synthetic

SMALL = dict(dim=5, num_train=300, num_test=200, hidden=6)


def _same(a: data.Dataset, b: data.Dataset) -> bool:
    return all(
        np.array_equal(getattr(a, k), getattr(b, k))
        for k in ("x_train", "y_train", "x_test", "y_test")
    )


@pytest.mark.parametrize("teacher", synthetic.TEACHERS)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_same_seed_same_dataset_other_seed_other_dataset(teacher, num_classes):
    spec = synthetic.Synthetic(
        **SMALL, teacher=teacher, num_classes=num_classes, seed=7, label_noise=0.1
    )
    ds = spec.dataset()
    assert isinstance(ds, data.Dataset)
    assert ds.x_train.shape == (300, 5) and ds.x_test.shape == (200, 5)
    assert ds.num_classes == num_classes
    assert _same(
        ds,
        synthetic.generate(
            **SMALL, teacher=teacher, num_classes=num_classes, seed=7, label_noise=0.1
        ),
    )
    other = synthetic.Synthetic(
        **SMALL, teacher=teacher, num_classes=num_classes, seed=8, label_noise=0.1
    ).dataset()
    assert not np.array_equal(ds.x_train, other.x_train)
    # Every class occurs (the standardised teacher splits the data).
    assert len(np.unique(ds.y_train)) == num_classes


def test_teacher_and_test_set_do_not_depend_on_the_training_size():
    a = synthetic.Synthetic(**SMALL, seed=3)
    b = synthetic.Synthetic(**{**SMALL, "num_train": 50}, seed=3)
    np.testing.assert_array_equal(a.dataset().x_test, b.dataset().x_test)
    np.testing.assert_array_equal(a.dataset().x_train[:50], b.dataset().x_train)
    x = np.ones((3, 5), np.float32)
    np.testing.assert_array_equal(a.make_teacher()(x), b.make_teacher()(x))


@pytest.mark.parametrize("teacher", synthetic.TEACHERS)
def test_deterministic_binary_labels_are_the_sign_of_the_teacher(teacher):
    spec = synthetic.Synthetic(**SMALL, teacher=teacher, temperature=0.0, seed=1)
    ds = spec.dataset()
    f = spec.make_teacher()(ds.x_test)
    assert f.shape == (200, 1)
    np.testing.assert_array_equal(ds.y_test, (f[:, 0] > 0).astype(np.int32))
    # Standardised outputs: mean about 0 and std about 1 on fresh inputs.
    assert abs(float(f.mean())) < 0.25 and 0.75 < float(f.std()) < 1.25


def test_deterministic_multiclass_labels_are_the_teachers_argmax():
    spec = synthetic.Synthetic(**SMALL, teacher="mlp", num_classes=5, temperature=0.0, seed=2)
    ds = spec.dataset()
    np.testing.assert_array_equal(ds.y_train, np.argmax(spec.make_teacher()(ds.x_train), -1))


def test_stochastic_binary_labels_follow_the_sigmoid_of_the_teacher():
    spec = synthetic.Synthetic(dim=4, num_train=20000, num_test=10, temperature=0.5, seed=4)
    ds = spec.dataset()
    p = 1.0 / (1.0 + np.exp(-spec.make_teacher()(ds.x_train)[:, 0] / 0.5))
    # Calibration in bins of the teacher's probability, and a likelihood check overall.
    bins = np.digitize(p, [0.2, 0.4, 0.6, 0.8])
    for b in range(5):
        sel = bins == b
        freq, expected = ds.y_train[sel].mean(), p[sel].mean()
        assert abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / sel.sum()) + 1e-3
    # The number of positive labels is a sum of independent Bernoulli(p): a z-test on it.
    z = (ds.y_train.sum() - p.sum()) / np.sqrt(np.sum(p * (1 - p)))
    assert abs(z) < 4
    # Labels are not just the sign: some examples near the boundary get the other label.
    assert 0 < np.mean(ds.y_train != (p > 0.5)) < 0.5


def test_label_noise_replaces_the_stated_fraction_of_labels():
    clean = synthetic.Synthetic(
        dim=4, num_train=20000, num_test=10, num_classes=4, temperature=0.0, seed=5
    )
    noisy = synthetic.Synthetic(
        dim=4, num_train=20000, num_test=10, num_classes=4, temperature=0.0, seed=5, label_noise=0.4
    )
    changed = np.mean(clean.dataset().y_train != noisy.dataset().y_train)
    # A replaced label is uniform over 4 classes, so 3/4 of the replaced ones change.
    expected = 0.4 * 3 / 4
    assert stats.binomtest(int(changed * 20000), 20000, expected).pvalue > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher="cubic"), "teacher"),
        (dict(activation="nope"), "nope"),
        (dict(num_classes=1), "num_classes"),
        (dict(temperature=-1.0), "temperature"),
        (dict(label_noise=1.5), "label_noise"),
        (dict(dim=0), "dim"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_knobs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.Synthetic(**kwargs)
