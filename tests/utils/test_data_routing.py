"""Routing properties of DataLoader and the samplers: every field of a batch position comes from
the same sample, each sample once per epoch, and an epoch is a pure function of (seed, epoch).

Each sample carries its own index in every field (``in3``, ``t3``, ``{"id": 3}``), so a batch that
pairs one sample's input with another's target shows up.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)


class Samples:
    """Sample k is ``(Variable("in<k>"), Variable("t<k>"), {"id": k, "note": "n<k>"})``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        return (
            Variable(f"in{k}", role="input"),
            Variable(f"t{k}", role="target"),
            {"id": k, "note": f"n{k}"},
        )


def sample_ids(batch) -> list[int]:
    """The sample index at every position, checking every field agrees."""
    inputs, targets, meta = batch
    ids = meta["id"]
    assert inputs.data == [f"in{k}" for k in ids]
    assert targets.data == [f"t{k}" for k in ids]
    assert meta["note"] == [f"n{k}" for k in ids]
    return ids


def samplers(n: int, seed: int):
    return {
        "sequential": SequentialSampler(range(n)),
        "random": RandomSampler(range(n), seed=seed),
        "subset": SubsetRandomSampler(list(range(n))[::-1], seed=seed),
        "weighted": WeightedRandomSampler([1.0 + k for k in range(n)], n, replacement=False,
                                          seed=seed),
    }


@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 9),
    kind=st.sampled_from(["shuffle", "sequential", "random", "subset", "weighted"]),
    seed=st.integers(0, 2**32 - 1),
    epochs=st.integers(1, 3),
)
def test_batches_keep_each_samples_fields_together(n, batch_size, kind, seed, epochs):
    def loader():
        if kind == "shuffle":
            return DataLoader(Samples(n), batch_size=batch_size, shuffle=True, seed=seed)
        return DataLoader(Samples(n), batch_size=batch_size, sampler=samplers(n, seed)[kind])

    walked = loader()
    history = []
    for _ in range(epochs):
        ids = [sample_ids(batch) for batch in walked]
        assert all(len(batch) == batch_size for batch in ids[:-1])
        assert sorted(k for batch in ids for k in batch) == list(range(n))
        history.append(ids)
    if kind == "sequential":
        assert all(ids == history[0] for ids in history)
        assert [k for batch in history[0] for k in batch] == list(range(n))
    # Epoch e of a fresh loader told to start at e equals epoch e of one walked there.
    for epoch, ids in enumerate(history):
        fresh = loader()
        fresh.set_epoch(epoch)
        assert [sample_ids(batch) for batch in fresh] == ids


@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_sampler_partitions_its_samplers_order(n, batch_size, drop_last, seed):
    inner = RandomSampler(range(n), seed=seed) if n else SequentialSampler(range(0))
    order = list(RandomSampler(range(n), seed=seed)) if n else []
    batches = list(BatchSampler(inner, batch_size, drop_last))
    flat = [k for batch in batches for k in batch]
    kept = (n // batch_size) * batch_size if drop_last else n
    assert flat == order[:kept]
    assert len(batches) == len(BatchSampler(inner, batch_size, drop_last))
