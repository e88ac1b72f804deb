"""Samplers: the order in which a DataLoader visits a dataset's indices.

They mirror ``torch.utils.data``'s samplers. The random ones draw from a
:class:`numpy.random.Generator` whose stream for epoch ``e`` is a pure function of
``(seed, e)``: a seeded sampler gives a different order every epoch, the same sequence of orders
on every run, and :meth:`Sampler.set_epoch` replays any epoch exactly (which is what lets a
Trainer resume mid-run). Every new iteration moves on to the next epoch by itself.

Example:
    >>> sampler = RandomSampler(range(5), seed=0)
    >>> first, second = list(sampler), list(sampler)
    >>> sorted(first) == sorted(second) == [0, 1, 2, 3, 4]
    True
    >>> sampler.set_epoch(0)
    >>> list(sampler) == first
    True
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np

__all__ = [
    "BatchSampler",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "SubsetRandomSampler",
    "WeightedRandomSampler",
    "epoch_generator",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_seed(owner: str, seed: Any) -> int | None:
    if seed is None:
        return None
    if not _is_int(seed) or seed < 0:
        raise ValueError(
            f"{owner}: seed should be a non-negative integer or None, but got seed={seed!r}"
        )
    return int(seed)


def _check_epoch(owner: str, epoch: Any) -> int:
    if not _is_int(epoch) or epoch < 0:
        raise ValueError(
            f"{owner}: epoch should be a non-negative integer, but got epoch={epoch!r}"
        )
    return int(epoch)


def _check_replacement(owner: str, replacement: Any) -> bool:
    if not isinstance(replacement, bool):
        raise TypeError(
            f"{owner}: replacement should be a boolean value, but got replacement={replacement!r}"
        )
    return replacement


def _check_num_samples(owner: str, num_samples: Any) -> int:
    if not _is_int(num_samples) or num_samples <= 0:
        raise ValueError(
            f"{owner}: num_samples should be a positive integer value, "
            f"but got num_samples={num_samples!r}"
        )
    return int(num_samples)


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """Return the random generator of ``epoch`` for ``seed``.

    The streams of different epochs are statistically independent (they are spawned children of
    one :class:`numpy.random.SeedSequence`), and each is a pure function of ``(seed, epoch)``.

    Args:
        seed: A non-negative integer.
        epoch: A non-negative epoch number.

    Example:
        >>> a = epoch_generator(7, 3).permutation(4).tolist()
        >>> a == epoch_generator(7, 3).permutation(4).tolist()
        True
    """
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(epoch,)))


class Sampler(abc.ABC):
    """Base class of samplers: an iterable over dataset indices (or batches of indices).

    Subclasses implement ``__iter__`` and usually ``__len__``. Every sampler carries an
    :attr:`epoch` counter; :meth:`set_epoch` chooses which epoch the next iteration produces.

    Attributes:
        epoch: The epoch the next iteration will produce.
    """

    epoch: int = 0

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Any]:
        """Yield the indices of one epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``.

        Args:
            epoch: A non-negative integer.

        Raises:
            ValueError: If ``epoch`` is not a non-negative integer.
        """
        self.epoch = _check_epoch(f"{type(self).__name__}.set_epoch", epoch)

    def _start_epoch(self) -> int:
        """Return the epoch to produce now and advance the counter for the next iteration."""
        epoch = self.epoch
        self.epoch = epoch + 1
        return epoch


class _SeededSampler(Sampler):
    """A sampler whose epochs come from :func:`epoch_generator`.

    Without a seed, a seed is drawn from fresh OS entropy once, at construction: different
    samplers (and runs) then differ, while :meth:`set_epoch` still replays epochs of this one.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = _check_seed(type(self).__name__, seed)
        self.epoch = 0
        self._initial_seed = (
            self.seed if self.seed is not None else int(np.random.SeedSequence().entropy)
        )

    @property
    def initial_seed(self) -> int:
        """The seed actually used: ``seed`` if one was given, otherwise the drawn one."""
        return self._initial_seed

    def _next_generator(self) -> np.random.Generator:
        return epoch_generator(self._initial_seed, self._start_epoch())


class SequentialSampler(Sampler):
    """Yield ``0, 1, ..., len(data_source) - 1`` in order, every epoch.

    Args:
        data_source: Anything with a length (usually the dataset).

    Example:
        >>> list(SequentialSampler(["a", "b", "c"]))
        [0, 1, 2]
    """

    def __init__(self, data_source: Sized) -> None:
        self.data_source = data_source
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        self._start_epoch()
        return iter(range(len(self.data_source)))

    def __len__(self) -> int:
        return len(self.data_source)


class RandomSampler(_SeededSampler):
    """Yield the indices of ``data_source`` in a random order.

    Without replacement each epoch is a permutation; when ``num_samples`` exceeds the dataset's
    length, whole permutations are chained and the last one is cut short (as in PyTorch). With
    replacement, ``num_samples`` indices are drawn uniformly and independently.

    Args:
        data_source: Anything with a length (usually the dataset).
        replacement: Draw with replacement.
        num_samples: How many indices per epoch; defaults to ``len(data_source)``.
        seed: Seed of the epoch streams; ``None`` draws one from OS entropy.

    Raises:
        TypeError: If ``replacement`` is not a bool.
        ValueError: If ``num_samples`` (or the default length) is not a positive integer, or
            ``seed`` is not a non-negative integer.

    Example:
        >>> sorted(RandomSampler(range(4), seed=1))
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        data_source: Sized,
        replacement: bool = False,
        num_samples: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.data_source = data_source
        self.replacement = _check_replacement("RandomSampler", replacement)
        self._num_samples = num_samples
        _check_num_samples("RandomSampler", self.num_samples)

    @property
    def num_samples(self) -> int:
        """Indices per epoch (the dataset's current length unless given)."""
        return len(self.data_source) if self._num_samples is None else self._num_samples

    def __iter__(self) -> Iterator[int]:
        rng = self._next_generator()
        n, count = len(self.data_source), self.num_samples
        if self.replacement:
            return iter(rng.integers(0, n, size=count).tolist())
        order: list[int] = []
        for _ in range(count // n):
            order.extend(rng.permutation(n).tolist())
        order.extend(rng.permutation(n)[: count % n].tolist())
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


class SubsetRandomSampler(_SeededSampler):
    """Yield the given indices in a random order, each once per epoch.

    Args:
        indices: The indices to draw from.
        seed: Seed of the epoch streams; ``None`` draws one from OS entropy.

    Example:
        >>> sorted(SubsetRandomSampler([10, 20, 30], seed=0))
        [10, 20, 30]
    """

    def __init__(self, indices: Sequence[int], seed: int | None = None) -> None:
        super().__init__(seed)
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        rng = self._next_generator()
        return iter([self.indices[i] for i in rng.permutation(len(self.indices)).tolist()])

    def __len__(self) -> int:
        return len(self.indices)


class WeightedRandomSampler(_SeededSampler):
    """Yield ``num_samples`` indices in ``[0, len(weights))`` drawn in proportion to ``weights``.

    With replacement, draws are independent with probabilities ``weights / sum(weights)``.
    Without replacement, the indices are distinct and drawn one after another, each with
    probability proportional to its weight among those not drawn yet (the rule of
    ``torch.multinomial(..., replacement=False)`` and ``numpy``'s ``choice(replace=False, p=)``).

    Args:
        weights: Non-negative, finite weights, not all zero (need not sum to one).
        num_samples: How many indices per epoch.
        replacement: Draw with replacement.
        seed: Seed of the epoch streams; ``None`` draws one from OS entropy.

    Raises:
        TypeError: If ``replacement`` is not a bool.
        ValueError: If ``num_samples`` is not a positive integer; if ``weights`` is not a 1-d
            sequence of finite non-negative numbers with a positive sum; or if, without
            replacement, fewer weights are positive than ``num_samples``.

    Example:
        >>> sampler = WeightedRandomSampler([0.0, 1.0, 3.0], num_samples=2, replacement=False,
        ...                                 seed=0)
        >>> sorted(sampler)
        [1, 2]
    """

    def __init__(
        self,
        weights: Sequence[float],
        num_samples: int,
        replacement: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.num_samples = _check_num_samples("WeightedRandomSampler", num_samples)
        self.replacement = _check_replacement("WeightedRandomSampler", replacement)
        values = np.asarray(weights, dtype=float)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                "WeightedRandomSampler: weights should be a non-empty 1d sequence but given "
                f"weights have shape {values.shape}"
            )
        if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
            raise ValueError(
                "WeightedRandomSampler: weights should be finite, non-negative and not all zero, "
                f"but got weights={values.tolist()}"
            )
        positive = int(np.count_nonzero(values))
        if not replacement and num_samples > positive:
            raise ValueError(
                f"WeightedRandomSampler: cannot draw num_samples={num_samples} distinct indices "
                f"without replacement when only {positive} weights are positive"
            )
        self.weights = values
        self._probabilities = values / values.sum()

    def __iter__(self) -> Iterator[int]:
        rng = self._next_generator()
        drawn = rng.choice(
            len(self._probabilities), size=self.num_samples, replace=self.replacement,
            p=self._probabilities,
        )
        return iter(drawn.tolist())

    def __len__(self) -> int:
        return self.num_samples


class BatchSampler(Sampler):
    """Group the indices of another sampler into lists of ``batch_size``.

    Args:
        sampler: The sampler (or any iterable of indices) to group.
        batch_size: Size of each batch.
        drop_last: Drop the last batch when it would be smaller than ``batch_size``.

    Raises:
        ValueError: If ``batch_size`` is not a positive integer or ``drop_last`` is not a bool.

    Example:
        >>> list(BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=False))
        [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
        >>> list(BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=True))
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    """

    def __init__(self, sampler: Sampler | Sequence[int], batch_size: int, drop_last: bool) -> None:
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(
                "BatchSampler: batch_size should be a positive integer value, "
                f"but got batch_size={batch_size!r}"
            )
        if not isinstance(drop_last, bool):
            raise ValueError(
                "BatchSampler: drop_last should be a boolean value, "
                f"but got drop_last={drop_last!r}"
            )
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (forwarded to the inner sampler)."""
        super().set_epoch(epoch)
        if isinstance(self.sampler, Sampler):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self._start_epoch()
        indices = iter(self.sampler)
        return self._batches(indices)

    def _batches(self, indices: Iterator[int]) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in indices:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        count = len(self.sampler)
        if self.drop_last:
            return count // self.batch_size
        return math.ceil(count / self.batch_size)
