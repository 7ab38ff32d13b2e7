"""Key derivation and the shuffling window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import randomness


def _order(seed, replica, epoch, n, window, varied=True):
    key = randomness.replica_key(seed, "order", replica, varied=varied)
    return np.asarray(randomness.epoch_order(key, epoch, randomness.base_order(seed, n), window))


def test_keys_depend_on_source_replica_and_seed_only():
    k = lambda *a, **kw: jax.random.key_data(randomness.replica_key(*a, **kw))
    np.testing.assert_array_equal(k(0, "init", 3, varied=True), k(0, "init", 3, varied=True))
    assert not np.array_equal(k(0, "init", 3, varied=True), k(0, "init", 4, varied=True))
    assert not np.array_equal(k(0, "init", 3, varied=True), k(0, "order", 3, varied=True))
    assert not np.array_equal(k(0, "init", 3, varied=True), k(1, "init", 3, varied=True))
    # A fixed source gives every replica the key of replica 0.
    np.testing.assert_array_equal(k(0, "init", 7, varied=False), k(0, "init", 0, varied=True))
    # Vectorised derivation equals the scalar one (so R never enters).
    keys = jax.random.key_data(randomness.replica_keys(0, "dropout", jnp.arange(5), varied=True))
    for r in range(5):
        np.testing.assert_array_equal(keys[r], k(0, "dropout", r, varied=True))


def test_threefry_is_used_whatever_the_default():
    assert "threefry" in str(jax.random.key_impl(randomness.root_key(0)))


def test_check_sources():
    assert randomness.check_sources(("order", "init")) == ("init", "order")
    assert randomness.check_sources("all") == randomness.SOURCES
    with pytest.raises(ValueError, match="'inti'"):
        randomness.check_sources(("inti",))


def test_window_one_is_the_base_order_for_every_replica_and_epoch():
    n = 103
    base = np.asarray(randomness.base_order(0, n))
    assert sorted(base) == list(range(n))
    for r in range(3):
        for epoch in range(2):
            np.testing.assert_array_equal(_order(0, r, epoch, n, 1), base)


def test_full_window_is_a_full_shuffle():
    n = 200
    orders = [_order(0, r, 0, n, n) for r in range(4)]
    for o in orders:
        assert sorted(o) == list(range(n))
    # Different replicas and epochs give different permutations, spread over the whole range:
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], _order(0, 0, 1, n, n))
    base = np.asarray(randomness.base_order(0, n))
    pos_in_base = np.argsort(base)
    moved = np.abs(pos_in_base[orders[0]] - np.arange(n))
    assert moved.max() > n // 2


@pytest.mark.parametrize("window", [2, 10, 64])
def test_no_example_leaves_its_window(window):
    n = 150  # not a multiple of any window: the last window is short
    base = np.asarray(randomness.base_order(3, n))
    for r in range(3):
        order = _order(3, r, 2, n, window)
        assert sorted(order) == list(range(n))
        for start in range(0, n, window):
            assert set(order[start : start + window]) == set(base[start : start + window])
    # Within windows the order does change.
    assert not np.array_equal(_order(3, 0, 2, n, window), base)


def test_fixed_order_source_gives_identical_orders():
    a = _order(0, 1, 0, 50, 50, varied=False)
    b = _order(0, 5, 0, 50, 50, varied=False)
    np.testing.assert_array_equal(a, b)
