"""Datasets, samplers and the DataLoader, shaped like ``torch.utils.data``.

Example:
    >>> from afnio.utils.data import DataLoader
    >>> [batch for batch in DataLoader(["a", "b", "c"], batch_size=2)]
    [['a', 'b'], ['c']]
"""

from afnio.utils.data.dataloader import DataLoader, default_collate
from afnio.utils.data.dataset import Dataset, Subset, random_split
from afnio.utils.data.sampler import (
    BatchSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = [
    "BatchSampler",
    "DataLoader",
    "Dataset",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "Subset",
    "SubsetRandomSampler",
    "WeightedRandomSampler",
    "default_collate",
    "random_split",
]
