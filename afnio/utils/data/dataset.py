"""Datasets: map-style collections of samples, as in ``torch.utils.data``.

Example:
    >>> class Squares(Dataset):
    ...     def __getitem__(self, index):
    ...         return index * index
    ...     def __len__(self):
    ...         return 5
    >>> train, test = random_split(Squares(), [0.6, 0.4], seed=0)
    >>> len(train), len(test)
    (3, 2)
    >>> sorted(list(train) + list(test))
    [0, 1, 4, 9, 16]
"""

from __future__ import annotations

import abc
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from afnio.utils.data.sampler import _check_seed

__all__ = ["Dataset", "Subset", "random_split"]

T_co = TypeVar("T_co", covariant=True)


class Dataset(abc.ABC, Generic[T_co]):
    """A map-style dataset: ``dataset[i]`` is sample ``i``.

    Subclasses implement ``__getitem__`` and, for use with the default samplers, ``__len__``.
    """

    @abc.abstractmethod
    def __getitem__(self, index: int) -> T_co:
        """Return sample ``index``."""

    def __iter__(self) -> Iterator[T_co]:
        for index in range(len(self)):  # type: ignore[arg-type]
            yield self[index]


class Subset(Dataset[T_co]):
    """The samples of ``dataset`` at ``indices``, in that order.

    Args:
        dataset: The whole dataset.
        indices: Indices into ``dataset``.

    Example:
        >>> subset = Subset(["a", "b", "c", "d"], [3, 0])
        >>> subset[0], len(subset)
        ('d', 2)
    """

    def __init__(self, dataset: Sequence[T_co] | Dataset[T_co], indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __getitem__(self, index: int | list[int]) -> Any:
        if isinstance(index, list):
            return [self.dataset[self.indices[i]] for i in index]
        return self.dataset[self.indices[index]]

    def __len__(self) -> int:
        return len(self.indices)


def _is_fraction_list(lengths: Sequence[float]) -> bool:
    total = math.fsum(lengths)
    return math.isclose(total, 1) and total <= 1


def random_split(
    dataset: Sequence[T_co] | Dataset[T_co],
    lengths: Sequence[int | float],
    seed: int | None = None,
) -> list[Subset[T_co]]:
    """Split ``dataset`` into non-overlapping random subsets of the given lengths.

    As in PyTorch, ``lengths`` may be fractions summing to 1: each subset then gets
    ``floor(fraction * len(dataset))`` samples and the remainder is dealt one by one to the
    subsets in order (round-robin).

    Args:
        dataset: The dataset to split.
        lengths: Subset lengths (summing to ``len(dataset)``) or fractions (summing to 1).
        seed: Seed of the permutation; ``None`` uses fresh OS entropy.

    Returns:
        One :class:`Subset` per length.

    Raises:
        ValueError: If the lengths don't add up to the dataset's length, a fraction is outside
            ``[0, 1]``, a length is negative, or ``seed`` is negative.

    Example:
        >>> [len(s) for s in random_split(range(30), [0.3, 0.3, 0.4], seed=0)]
        [9, 9, 12]
    """
    _check_seed("random_split", seed)
    size = len(dataset)
    if _is_fraction_list(lengths):
        for position, fraction in enumerate(lengths):
            if not 0 <= fraction <= 1:
                raise ValueError(
                    f"random_split: fraction at index {position} is not between 0 and 1: "
                    f"{fraction!r}"
                )
        counts = [math.floor(size * fraction) for fraction in lengths]
        for i in range(size - sum(counts)):
            counts[i % len(counts)] += 1
        for position, count in enumerate(counts):
            if count == 0:
                warnings.warn(
                    f"random_split: length of split at index {position} is 0. "
                    "This might result in an empty dataset.",
                    stacklevel=2,
                )
        lengths = counts
    if any(not isinstance(n, numbers.Integral) or n < 0 for n in lengths):
        raise ValueError(
            f"random_split: lengths must be non-negative integers or fractions summing to 1, "
            f"got {list(lengths)!r}"
        )
    if sum(lengths) != size:
        raise ValueError(
            "random_split: sum of input lengths does not equal the length of the input dataset! "
            f"(sum {sum(lengths)}, dataset length {size})"
        )
    order = np.random.default_rng(seed).permutation(size).tolist()
    subsets, start = [], 0
    for length in lengths:
        subsets.append(Subset(dataset, order[start : start + length]))
        start += length
    return subsets
