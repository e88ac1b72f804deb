"""Samplers: PyTorch conformance, seeded epochs, and distribution properties.

Expected values are written from ``torch.utils.data``'s documented behaviour (torch itself is not
a dependency).
"""

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afnio.utils.data import (
    BatchSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


# ------------------------------------------------------------------ torch conformance
def test_sequential_sampler_yields_indices_in_order():
    sampler = SequentialSampler(["a", "b", "c", "d"])
    assert list(sampler) == [0, 1, 2, 3]
    assert list(sampler) == [0, 1, 2, 3]
    assert len(sampler) == 4


def test_batch_sampler_matches_torch_docstring_example():
    assert list(BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=False)) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9],
    ]
    assert list(BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=True)) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
    ]


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "expected"),
    [
        (10, 3, False, 4),
        (10, 3, True, 3),
        (9, 3, False, 3),
        (9, 3, True, 3),
        (2, 5, False, 1),
        (2, 5, True, 0),
        (0, 4, False, 0),
    ],
)
def test_batch_sampler_len(n, batch_size, drop_last, expected):
    sampler = BatchSampler(SequentialSampler(range(n)), batch_size, drop_last)
    assert len(sampler) == expected
    assert len(list(sampler)) == expected


@pytest.mark.parametrize("batch_size", [0, -2, True, 1.5, "2", None])
def test_batch_sampler_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size should be a positive integer value"):
        BatchSampler(SequentialSampler(range(3)), batch_size, False)


def test_batch_sampler_rejects_non_bool_drop_last():
    with pytest.raises(ValueError, match="drop_last should be a boolean value"):
        BatchSampler(SequentialSampler(range(3)), 2, 1)


def test_random_sampler_argument_errors_follow_torch():
    with pytest.raises(TypeError, match="replacement should be a boolean value"):
        RandomSampler(range(3), replacement=1)
    with pytest.raises(ValueError, match="num_samples should be a positive integer value"):
        RandomSampler(range(3), num_samples=0)
    with pytest.raises(ValueError, match="num_samples should be a positive integer value"):
        RandomSampler([])  # an empty dataset gives num_samples=0, as in torch
    with pytest.raises(ValueError, match="seed should be a non-negative integer"):
        RandomSampler(range(3), seed=-1)


def test_random_sampler_len_is_num_samples():
    assert len(RandomSampler(range(5))) == 5
    assert len(RandomSampler(range(5), num_samples=12)) == 12
    assert len(RandomSampler(range(5), replacement=True, num_samples=3)) == 3


def test_random_sampler_without_replacement_chains_permutations():
    # torch: num_samples > n without replacement yields whole permutations, then a partial one.
    order = list(RandomSampler(range(4), num_samples=10, seed=3))
    assert sorted(order[:4]) == [0, 1, 2, 3]
    assert sorted(order[4:8]) == [0, 1, 2, 3]
    assert len(set(order[8:])) == 2
    assert len(order) == 10


def test_random_sampler_with_replacement_draws_in_range():
    order = list(RandomSampler(range(3), replacement=True, num_samples=200, seed=0))
    assert len(order) == 200
    assert set(order) == {0, 1, 2}


def test_subset_random_sampler_permutes_the_given_indices():
    sampler = SubsetRandomSampler([7, 3, 11, 20], seed=5)
    assert sorted(sampler) == [3, 7, 11, 20]
    assert len(sampler) == 4


def test_weighted_sampler_argument_errors():
    with pytest.raises(ValueError, match="num_samples should be a positive integer value"):
        WeightedRandomSampler([1.0, 2.0], num_samples=0)
    with pytest.raises(TypeError, match="replacement should be a boolean value"):
        WeightedRandomSampler([1.0, 2.0], num_samples=1, replacement=None)
    with pytest.raises(ValueError, match="1d sequence"):
        WeightedRandomSampler([[1.0, 2.0]], num_samples=1)
    with pytest.raises(ValueError, match="non-negative"):
        WeightedRandomSampler([1.0, -1.0], num_samples=1)
    with pytest.raises(ValueError, match="not all zero"):
        WeightedRandomSampler([0.0, 0.0], num_samples=1)
    with pytest.raises(ValueError, match="only 2 weights are positive"):
        WeightedRandomSampler([1.0, 0.0, 3.0], num_samples=3, replacement=False)


def test_weighted_sampler_never_draws_zero_weights():
    drawn = list(WeightedRandomSampler([0.0, 1.0, 0.0, 2.0], num_samples=500, seed=1))
    assert set(drawn) == {1, 3}
    assert len(drawn) == 500


def test_weighted_sampler_without_replacement_draws_distinct_indices():
    sampler = WeightedRandomSampler(
        [5.0, 1.0, 1.0, 0.5, 2.0], num_samples=5, replacement=False, seed=2
    )
    for _ in range(20):
        assert sorted(sampler) == [0, 1, 2, 3, 4]


def test_sampler_base_class_is_abstract():
    with pytest.raises(TypeError):
        Sampler()


def test_set_epoch_rejects_bad_values():
    with pytest.raises(ValueError, match="epoch should be a non-negative integer"):
        RandomSampler(range(3)).set_epoch(-1)
    with pytest.raises(ValueError, match="epoch should be a non-negative integer"):
        SequentialSampler(range(3)).set_epoch("1")


# ------------------------------------------------------------------ seeded epochs
def test_seeded_sampler_changes_order_each_epoch_but_repeats_across_runs():
    sampler_a, sampler_b = RandomSampler(range(30), seed=11), RandomSampler(range(30), seed=11)
    run_a = [list(sampler_a) for _ in range(4)]
    run_b = [list(sampler_b) for _ in range(4)]
    assert run_a == run_b
    assert len({tuple(order) for order in run_a}) == 4  # a new order every epoch


def test_set_epoch_replays_an_epoch_exactly():
    sampler = RandomSampler(range(25), seed=4)
    epochs = [list(sampler) for _ in range(5)]
    assert sampler.epoch == 5
    sampler.set_epoch(3)
    assert list(sampler) == epochs[3]
    assert list(sampler) == epochs[4]  # and then carries on from there
    fresh = RandomSampler(range(25), seed=4)
    fresh.set_epoch(2)
    assert list(fresh) == epochs[2]


def test_different_seeds_give_different_orders():
    assert list(RandomSampler(range(40), seed=0)) != list(RandomSampler(range(40), seed=1))


def test_unseeded_samplers_use_fresh_entropy_but_replay_their_own_epochs():
    a, b = RandomSampler(range(40)), RandomSampler(range(40))
    assert a.seed is None
    assert a.initial_seed != b.initial_seed
    assert list(a) != list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(0)
    assert list(a) == first
    same = RandomSampler(range(40), seed=a.initial_seed)
    assert list(same) == first


def test_iteration_advances_the_epoch_when_it_starts():
    sampler = SubsetRandomSampler(list(range(10)), seed=0)
    iterator = iter(sampler)
    assert sampler.epoch == 1
    assert sorted(iterator) == list(range(10))


def test_batch_sampler_forwards_set_epoch_to_its_sampler():
    inner = RandomSampler(range(12), seed=9)
    batches = BatchSampler(inner, 5, drop_last=False)
    epochs = [list(batches) for _ in range(3)]
    batches.set_epoch(1)
    assert list(batches) == epochs[1]
    assert [len(batch) for batch in epochs[0]] == [5, 5, 2]


# ------------------------------------------------------------------ properties
@given(n=st.integers(1, 60), seed=seeds, epochs=st.integers(1, 4))
def test_every_index_exactly_once_per_epoch(n, seed, epochs):
    sampler = RandomSampler(range(n), seed=seed)
    for _ in range(epochs):
        assert sorted(sampler) == list(range(n))


@given(n=st.integers(1, 20), num_samples=st.integers(1, 70), seed=seeds)
def test_oversampling_without_replacement_is_balanced(n, num_samples, seed):
    counts = Counter(RandomSampler(range(n), num_samples=num_samples, seed=seed))
    assert sum(counts.values()) == num_samples
    assert all(num_samples // n <= counts[i] <= math.ceil(num_samples / n) for i in range(n))


@given(indices=st.lists(st.integers(-100, 100), unique=True, max_size=40), seed=seeds)
def test_subset_sampler_visits_each_index_once(indices, seed):
    sampler = SubsetRandomSampler(indices, seed=seed)
    for _ in range(2):
        assert sorted(sampler) == sorted(indices)


@given(n=st.integers(0, 80), batch_size=st.integers(1, 12), drop_last=st.booleans(), seed=seeds)
def test_batch_sizes(n, batch_size, drop_last, seed):
    inner = RandomSampler(range(n), seed=seed) if n else SequentialSampler(range(0))
    batches = list(BatchSampler(inner, batch_size, drop_last))
    assert len(batches) == len(BatchSampler(inner, batch_size, drop_last))
    assert all(len(batch) == batch_size for batch in batches[:-1])
    if batches:
        assert 0 < len(batches[-1]) <= batch_size
        if drop_last:
            assert len(batches[-1]) == batch_size
    flat = [index for batch in batches for index in batch]
    expected = n - n % batch_size if drop_last else n
    assert len(flat) == expected == len(set(flat))


@given(seed=seeds, epoch=st.integers(0, 50))
def test_epoch_is_a_pure_function_of_seed_and_epoch(seed, epoch):
    walked = RandomSampler(range(15), seed=seed)
    for _ in range(epoch):
        iter(walked)
    jumped = WeightedRandomSampler([1.0] * 15, 15, replacement=False, seed=seed)
    jumped.set_epoch(epoch)
    other = RandomSampler(range(15), seed=seed)
    other.set_epoch(epoch)
    assert list(walked) == list(other)
    again = WeightedRandomSampler([1.0] * 15, 15, replacement=False, seed=seed)
    again.set_epoch(epoch)
    assert list(jumped) == list(again)


weights_lists = st.lists(
    st.one_of(st.just(0.0), st.floats(0.2, 10.0)), min_size=2, max_size=5
).filter(lambda ws: sum(w > 0 for w in ws) >= 1)


def _tolerance(p, draws):
    p = min(max(p, 0.0), 1.0)
    return 5 * math.sqrt(p * (1 - p) / draws) + 0.005


@settings(max_examples=15)
@given(weights=weights_lists, seed=seeds)
def test_weighted_frequencies_with_replacement(weights, seed):
    draws = 20_000
    counts = Counter(WeightedRandomSampler(weights, draws, replacement=True, seed=seed))
    total = sum(weights)
    for index, weight in enumerate(weights):
        p = weight / total
        assert abs(counts[index] / draws - p) <= _tolerance(p, draws)


def _inclusion_probabilities(weights, k):
    """Exact P(index drawn) for k successive draws without replacement, by enumeration."""
    n = len(weights)
    included = [0.0] * n
    for sequence in itertools.permutations(range(n), k):
        probability, remaining = 1.0, sum(weights)
        for index in sequence:
            if remaining <= 0 or weights[index] == 0:
                probability = 0.0
                break
            probability *= weights[index] / remaining
            remaining -= weights[index]
        for index in sequence:
            included[index] += probability
    return included


@settings(max_examples=15)
@given(weights=weights_lists, data=st.data(), seed=seeds)
def test_weighted_frequencies_without_replacement(weights, data, seed):
    positive = sum(w > 0 for w in weights)
    k = data.draw(st.integers(1, positive), label="num_samples")
    epochs = 2_000
    sampler = WeightedRandomSampler(weights, k, replacement=False, seed=seed)
    inclusion, first = Counter(), Counter()
    for _ in range(epochs):
        drawn = list(sampler)
        assert len(set(drawn)) == k
        inclusion.update(drawn)
        first[drawn[0]] += 1
    expected = _inclusion_probabilities(weights, k)
    total = sum(weights)
    for index, weight in enumerate(weights):
        assert abs(inclusion[index] / epochs - expected[index]) <= _tolerance(
            expected[index], epochs
        )
        p_first = weight / total
        assert abs(first[index] / epochs - p_first) <= _tolerance(p_first, epochs)
