"""DataLoader: batches of a dataset in the order a sampler chooses, as in ``torch.utils.data``.

Example:
    >>> from afnio import Variable
    >>> data = [(Variable(f"review {i}", role="review"), i % 2) for i in range(5)]
    >>> loader = DataLoader(data, batch_size=2, shuffle=True, seed=0)
    >>> len(loader)
    3
    >>> reviews, labels = next(iter(loader))
    >>> reviews.role, reviews.batch_size, len(labels)
    ('review', 2, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from afnio._variable import Variable
from afnio.utils.data.dataset import Dataset
from afnio.utils.data.sampler import (
    BatchSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    _check_epoch,
    _check_seed,
)

__all__ = ["DataLoader", "default_collate"]

_SCALARS = (str, int, float, bool)


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def _collate_variables(batch: list[Any], path: str) -> Variable:
    first = batch[0]
    for position, item in enumerate(batch):
        if not isinstance(item, Variable):
            raise TypeError(
                f"default_collate: sample {position}{_where(path)} is {type(item).__name__}, "
                f"but sample 0 is a Variable with role {first.role!r}"
            )
        if item.is_batched:
            raise TypeError(
                f"default_collate: sample {position}{_where(path)} is a Variable with role "
                f"{item.role!r} that is already a batch of {item.batch_size}; pass a collate_fn "
                "that says how to combine batches"
            )
    kinds = {isinstance(item.data, str) for item in batch}
    if len(kinds) > 1:
        raise TypeError(
            f"default_collate: Variables{_where(path)} (role {first.role!r}) mix str and number "
            "data, which can't form one batch"
        )
    return Variable([item.data for item in batch], role=first.role,
                    requires_grad=first.requires_grad)


def _collate(batch: list[Any], path: str) -> Any:
    first = batch[0]
    if isinstance(first, Variable):
        return _collate_variables(batch, path)
    if isinstance(first, Mapping):
        keys = list(first)
        for position, item in enumerate(batch):
            if not isinstance(item, Mapping) or set(item) != set(keys):
                found = sorted(map(str, item)) if isinstance(item, Mapping) else type(item).__name__
                raise TypeError(
                    f"default_collate: sample {position}{_where(path)} should be a mapping with "
                    f"keys {sorted(map(str, keys))}, but got {found}"
                )
        return {key: _collate([item[key] for item in batch], f"{path}[{key!r}]") for key in keys}
    if isinstance(first, (tuple, list)):
        for position, item in enumerate(batch):
            if not isinstance(item, (tuple, list)) or len(item) != len(first):
                shape = f"of length {len(item)}" if isinstance(item, (tuple, list)) else ""
                raise TypeError(
                    f"default_collate: sample {position}{_where(path)} should be a "
                    f"{type(first).__name__} of length {len(first)}, but got "
                    f"{type(item).__name__} {shape}".rstrip()
                )
        columns = [
            _collate([item[i] for item in batch], f"{path}[{i}]") for i in range(len(first))
        ]
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*columns)
        return tuple(columns) if isinstance(first, tuple) else columns
    if isinstance(first, _SCALARS):
        for position, item in enumerate(batch):
            if not isinstance(item, _SCALARS):
                raise TypeError(
                    f"default_collate: sample {position}{_where(path)} is "
                    f"{type(item).__name__}, but sample 0 is {type(first).__name__}"
                )
        return list(batch)
    raise TypeError(
        f"default_collate: samples{_where(path)} must be Variables, strings, numbers, dicts, "
        f"lists or tuples; found {type(first).__name__}"
    )


def default_collate(batch: Sequence[Any]) -> Any:
    """Merge a list of samples into one batch.

    - Variables become one batched Variable whose data lists the samples' (scalar) data; role and
      ``requires_grad`` come from the first sample.
    - Tuples and lists are collated position by position (a tuple stays a tuple, a named tuple
      keeps its type, a list becomes a list); dicts key by key.
    - Strings, numbers and bools become lists.

    Args:
        batch: The samples, all with the same structure.

    Raises:
        ValueError: If ``batch`` is empty.
        TypeError: If samples differ in structure, a Variable is already a batch, or a value has
            an unsupported type; the message gives the position inside the sample.

    Example:
        >>> from afnio import Variable
        >>> out = default_collate([{"q": Variable("hi", role="q"), "n": 1},
        ...                        {"q": Variable("yo", role="q"), "n": 2}])
        >>> out["q"].data, out["n"]
        (['hi', 'yo'], [1, 2])
    """
    if len(batch) == 0:
        raise ValueError("default_collate: batch must contain at least one sample")
    return _collate(list(batch), "")


class DataLoader:
    """Iterate over a dataset in batches, in an order chosen by a sampler.

    A seeded, shuffling loader gives a different order each epoch and the same sequence of
    orders on every run; epoch ``e`` is a pure function of ``(seed, e)``. Each ``iter(loader)``
    starts the next epoch; :meth:`set_epoch` chooses which one comes next (to resume a run).

    Args:
        dataset: A map-style dataset (anything with ``__getitem__`` and ``__len__``).
        batch_size: Samples per batch; ``None`` turns batching off (samples come one by one,
            uncollated).
        shuffle: Reshuffle every epoch (uses a :class:`RandomSampler` seeded with ``seed``).
        sampler: Chooses the indices; mutually exclusive with ``shuffle``.
        batch_sampler: Chooses whole batches of indices; mutually exclusive with ``batch_size``,
            ``shuffle``, ``sampler`` and ``drop_last``.
        drop_last: Drop the last batch if it is smaller than ``batch_size``.
        seed: Seed of the shuffling sampler (only used with ``shuffle=True``); ``None`` draws one
            from OS entropy.
        collate_fn: Merges a list of samples into a batch; defaults to :func:`default_collate`.

    Attributes:
        epoch: The epoch the next ``iter(loader)`` produces.

    Raises:
        ValueError: For the option combinations PyTorch rejects, or a ``seed`` that is not a
            non-negative integer.

    Example:
        >>> loader = DataLoader(list(range(7)), batch_size=3, drop_last=True)
        >>> list(loader), len(loader)
        ([[0, 1, 2], [3, 4, 5]], 2)
    """

    def __init__(
        self,
        dataset: Dataset | Sequence[Any],
        batch_size: int | None = 1,
        shuffle: bool | None = False,
        sampler: Sampler | Iterable[int] | None = None,
        batch_sampler: Sampler | Iterable[list[int]] | None = None,
        drop_last: bool = False,
        seed: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        _check_seed("DataLoader", seed)
        shuffle = bool(shuffle) if shuffle is not None else False
        if sampler is not None and shuffle:
            raise ValueError("DataLoader: sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError(
                    "DataLoader: batch_sampler option is mutually exclusive with batch_size, "
                    "shuffle, sampler, and drop_last"
                )
            batch_size = None
            drop_last = False
        elif batch_size is None and drop_last:
            raise ValueError(
                "DataLoader: batch_size=None option disables auto-batching and is mutually "
                "exclusive with drop_last"
            )
        if sampler is None:
            sampler = RandomSampler(dataset, seed=seed) if shuffle else SequentialSampler(dataset)
        if batch_size is not None and batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)

        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.collate_fn = default_collate if collate_fn is None else collate_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (e.g. to resume a run there).

        Raises:
            ValueError: If ``epoch`` is not a non-negative integer.
        """
        self.epoch = _check_epoch("DataLoader.set_epoch", epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for source in (self.sampler, self.batch_sampler):
            if isinstance(source, Sampler):
                source.set_epoch(epoch)
        if self.batch_sampler is None:
            return (self.dataset[index] for index in iter(self.sampler))
        batches = iter(self.batch_sampler)
        return (self.collate_fn([self.dataset[i] for i in indices]) for indices in batches)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return len(self.sampler)
