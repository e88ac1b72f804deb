"""DataLoader and default_collate: PyTorch conformance, seeded epochs, collation."""

import math
from collections import namedtuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    WeightedRandomSampler,
    default_collate,
    random_split,
)


class Numbers(Dataset):
    def __init__(self, n):
        self.n = n

    def __getitem__(self, index):
        return index

    def __len__(self):
        return self.n


# ------------------------------------------------------------------ option exclusivity (torch)
def test_sampler_is_mutually_exclusive_with_shuffle():
    with pytest.raises(ValueError, match="sampler option is mutually exclusive with shuffle"):
        DataLoader(Numbers(4), sampler=SequentialSampler(range(4)), shuffle=True)


@pytest.mark.parametrize(
    "options",
    [{"batch_size": 2}, {"shuffle": True}, {"sampler": [0, 1]}, {"drop_last": True}],
)
def test_batch_sampler_is_mutually_exclusive_with_the_batching_options(options):
    batch_sampler = BatchSampler(SequentialSampler(range(4)), 2, False)
    with pytest.raises(
        ValueError,
        match="batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, "
        "and drop_last",
    ):
        DataLoader(Numbers(4), batch_sampler=batch_sampler, **options)


def test_batch_size_none_is_mutually_exclusive_with_drop_last():
    with pytest.raises(ValueError, match="batch_size=None option disables auto-batching"):
        DataLoader(Numbers(4), batch_size=None, drop_last=True)


def test_bad_batch_size_is_reported_by_the_batch_sampler():
    with pytest.raises(ValueError, match="batch_size should be a positive integer value"):
        DataLoader(Numbers(4), batch_size=0)


# ------------------------------------------------------------------ batch counts and len
@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "sizes"),
    [
        (10, 3, False, [3, 3, 3, 1]),
        (10, 3, True, [3, 3, 3]),
        (9, 3, False, [3, 3, 3]),
        (2, 4, False, [2]),
        (2, 4, True, []),
        (5, 1, False, [1, 1, 1, 1, 1]),
    ],
)
def test_batch_counts(n, batch_size, drop_last, sizes):
    loader = DataLoader(Numbers(n), batch_size=batch_size, drop_last=drop_last)
    batches = list(loader)
    assert [len(batch) for batch in batches] == sizes
    assert len(loader) == len(sizes)
    assert [i for batch in batches for i in batch] == list(range(sum(sizes)))


def test_len_with_a_batch_sampler_and_without_batching():
    batch_sampler = BatchSampler(SequentialSampler(range(7)), 2, drop_last=True)
    loader = DataLoader(Numbers(7), batch_sampler=batch_sampler)
    assert len(loader) == 3
    assert list(loader) == [[0, 1], [2, 3], [4, 5]]
    unbatched = DataLoader(Numbers(3), batch_size=None)
    assert len(unbatched) == 3
    assert list(unbatched) == [0, 1, 2]  # samples come uncollated


def test_len_with_a_sampler_counts_its_samples():
    sampler = RandomSampler(range(5), replacement=True, num_samples=11, seed=0)
    loader = DataLoader(Numbers(5), batch_size=4, sampler=sampler)
    assert len(loader) == 3
    assert [len(batch) for batch in loader] == [4, 4, 3]


def test_weighted_sampler_in_a_loader():
    loader = DataLoader(
        Numbers(3), batch_size=2, sampler=WeightedRandomSampler([0.0, 1.0, 1.0], 6, seed=0)
    )
    drawn = [i for batch in loader for i in batch]
    assert len(drawn) == 6 and set(drawn) <= {1, 2}


def test_plain_lists_work_as_datasets():
    assert list(DataLoader(["a", "b", "c"], batch_size=2)) == [["a", "b"], ["c"]]


# ------------------------------------------------------------------ seeded epochs
def _epochs(loader, count):
    return [[i for batch in loader for i in batch] for _ in range(count)]


def test_seeded_loader_differs_per_epoch_and_repeats_per_run():
    run_a = _epochs(DataLoader(Numbers(30), batch_size=4, shuffle=True, seed=7), 4)
    run_b = _epochs(DataLoader(Numbers(30), batch_size=4, shuffle=True, seed=7), 4)
    assert run_a == run_b
    assert len({tuple(order) for order in run_a}) == 4
    assert all(sorted(order) == list(range(30)) for order in run_a)
    other_seed = _epochs(DataLoader(Numbers(30), batch_size=4, shuffle=True, seed=8), 1)
    assert other_seed[0] != run_a[0]


def test_set_epoch_resumes_a_run_mid_epoch():
    uninterrupted = DataLoader(Numbers(20), batch_size=3, shuffle=True, seed=1)
    reference = [list(uninterrupted) for _ in range(3)]
    assert uninterrupted.epoch == 3

    resumed = DataLoader(Numbers(20), batch_size=3, shuffle=True, seed=1)
    resumed.set_epoch(1)
    batches = iter(resumed)
    for _ in range(2):  # these batches were already trained on before the "crash"
        next(batches)
    assert list(batches) == reference[1][2:]
    assert list(resumed) == reference[2]


def test_each_iteration_starts_a_new_epoch():
    loader = DataLoader(Numbers(6), batch_size=2, shuffle=True, seed=0)
    first = iter(loader)
    assert loader.epoch == 1
    second = iter(loader)
    assert loader.epoch == 2
    assert [i for b in first for i in b] != [i for b in second for i in b]


def test_unseeded_loader_shuffles_differently():
    assert _epochs(DataLoader(Numbers(40), shuffle=True), 1) != _epochs(
        DataLoader(Numbers(40), shuffle=True), 1
    )


def test_seed_without_shuffle_keeps_dataset_order():
    loader = DataLoader(Numbers(5), batch_size=2, seed=3)
    assert _epochs(loader, 2) == [[0, 1, 2, 3, 4]] * 2


def test_shuffle_uses_a_random_sampler_with_the_loader_seed():
    loader = DataLoader(Numbers(12), batch_size=5, shuffle=True, seed=42)
    assert isinstance(loader.sampler, RandomSampler) and loader.sampler.seed == 42
    sampler = RandomSampler(range(12), seed=42)
    assert _epochs(loader, 3) == [list(sampler) for _ in range(3)]


def test_bad_seed_is_refused_even_without_shuffle():
    with pytest.raises(ValueError, match="DataLoader: seed should be a non-negative integer"):
        DataLoader(Numbers(3), seed=-1)


def test_set_epoch_rejects_bad_values():
    with pytest.raises(ValueError, match="epoch should be a non-negative integer"):
        DataLoader(Numbers(3)).set_epoch(-1)
    for bad in (True, 1.0, "2"):
        with pytest.raises(ValueError, match=r"^DataLoader\.set_epoch: epoch should be"):
            DataLoader(Numbers(3)).set_epoch(bad)


def test_bad_seeds_name_their_owner():
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=r"^DataLoader: seed should be"):
            DataLoader(Numbers(3), seed=bad)
        with pytest.raises(ValueError, match=r"^random_split: seed should be"):
            random_split(range(4), [2, 2], seed=bad)


@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_shuffled_loader_properties(n, batch_size, drop_last, seed):
    loader = DataLoader(
        Numbers(n), batch_size=batch_size, shuffle=True, drop_last=drop_last, seed=seed
    )
    for _ in range(2):
        batches = list(loader)
        expected_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        assert len(batches) == len(loader) == expected_batches
        assert all(len(batch) == batch_size for batch in batches[:-1])
        flat = [i for batch in batches for i in batch]
        if drop_last:
            assert len(flat) == len(set(flat)) == expected_batches * batch_size
        else:
            assert sorted(flat) == list(range(n))  # every index exactly once per epoch


# ------------------------------------------------------------------ collation
def test_variables_collate_into_one_batched_variable():
    batch = default_collate(
        [
            Variable("great", role="review", requires_grad=True),
            Variable("awful", role="ignored role", requires_grad=False),
        ]
    )
    assert isinstance(batch, Variable)
    assert batch.data == ["great", "awful"]
    assert batch.role == "review"
    assert batch.requires_grad is True
    numbers = default_collate([Variable(1, role="score"), Variable(2.5, role="score")])
    assert numbers.data == [1, 2.5] and numbers.requires_grad is False


def test_tuples_collate_position_wise_and_recursively():
    samples = [
        (
            Variable(f"message {i}", role="message"),
            (Variable("high", role="urgency"), Variable("neutral", role="sentiment")),
        )
        for i in range(3)
    ]
    message, (urgency, sentiment) = default_collate(samples)
    assert message.data == ["message 0", "message 1", "message 2"]
    assert urgency.data == ["high"] * 3 and urgency.role == "urgency"
    assert sentiment.role == "sentiment"
    assert isinstance(default_collate(samples), tuple)
    assert isinstance(default_collate(samples)[1], tuple)


def test_dicts_lists_strings_and_numbers():
    samples = [
        {"q": "why?", "n": 1, "tags": ["a", 0.5], "ok": True},
        {"q": "how?", "n": 2, "tags": ["b", 1.5], "ok": False},
    ]
    assert default_collate(samples) == {
        "q": ["why?", "how?"],
        "n": [1, 2],
        "tags": [["a", "b"], [0.5, 1.5]],
        "ok": [True, False],
    }
    assert default_collate(["x", "y"]) == ["x", "y"]
    assert default_collate([3, 4.0]) == [3, 4.0]


def test_named_tuples_keep_their_type():
    Pair = namedtuple("Pair", "text label")
    batch = default_collate([Pair("a", 0), Pair("b", 1)])
    assert batch == Pair(["a", "b"], [0, 1])
    assert type(batch) is Pair


def test_loader_uses_default_and_custom_collate():
    data = [(Variable(f"q{i}", role="question"), i) for i in range(5)]
    questions, labels = next(iter(DataLoader(data, batch_size=3)))
    assert questions.data == ["q0", "q1", "q2"] and labels == [0, 1, 2]
    loader = DataLoader(data, batch_size=2, collate_fn=lambda batch: len(batch))
    assert list(loader) == [2, 2, 1]


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (
            [Variable("a", role="x"), "b"],
            r"sample 1 is str, but sample 0 is a Variable with "
            r"role 'x'",
        ),
        ([Variable(["a"], role="x"), Variable(["b"], role="x")], "already a batch of 1"),
        ([Variable("a", role="x"), Variable(1, role="x")], "mix str and number data"),
        ([("a", 1), ("b",)], r"sample 1 should be a tuple of length 2"),
        ([{"a": 1}, {"b": 1}], r"sample 1 should be a mapping with keys \['a'\]"),
        ([("a", {"k": object()}), ("b", {"k": object()})], r"found object"),
        ([("a", [1]), ("b", [None])], r"at \[1\]\[0\]"),
    ],
)
def test_collate_errors_say_where(samples, message):
    with pytest.raises(TypeError, match=message):
        default_collate(samples)


def test_collate_of_an_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        default_collate([])


# ------------------------------------------------------------------ datasets helpers
def test_subset_and_random_split():
    subset = Subset(["a", "b", "c", "d"], [3, 1])
    assert [subset[0], subset[1]] == ["d", "b"] and len(subset) == 2
    assert subset[[1, 0]] == ["b", "d"]
    parts = random_split(range(10), [3, 7], seed=0)
    assert [len(p) for p in parts] == [3, 7]
    assert sorted(list(parts[0]) + list(parts[1])) == list(range(10))
    again = random_split(range(10), [3, 7], seed=0)
    assert list(again[0]) == list(parts[0])


@pytest.mark.parametrize(
    ("n", "fractions", "lengths"),
    [
        (30, [0.3, 0.3, 0.4], [9, 9, 12]),
        (5, [1 / 3] * 3, [2, 2, 1]),
        (10, [0.5, 0.5], [5, 5]),
        (3, [0.1, 0.9], [1, 2]),
    ],
)
def test_random_split_fractions_follow_torch(n, fractions, lengths):
    assert [len(p) for p in random_split(range(n), fractions, seed=1)] == lengths


def test_random_split_errors():
    with pytest.raises(ValueError, match="sum of input lengths does not equal the length"):
        random_split(range(10), [3, 3])
    with pytest.raises(ValueError, match="seed should be a non-negative integer"):
        random_split(range(10), [5, 5], seed=-3)
    with pytest.warns(UserWarning) as caught:
        parts = random_split(range(2), [0.9, 0.05, 0.05], seed=0)
    assert [len(p) for p in parts] == [2, 0, 0]
    assert [str(w.message) for w in caught] == [
        f"random_split: length of split at index {i} is 0. This might result in an empty dataset."
        for i in (1, 2)
    ]


def test_dataset_base_class_is_abstract():
    with pytest.raises(TypeError):
        Dataset()
