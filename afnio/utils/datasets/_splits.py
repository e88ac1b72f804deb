"""Split names the datasets accept: ``"train"``, ``"val"`` (alias ``"validation"``), ``"test"``."""

from __future__ import annotations

__all__ = ["SPLIT_NAMES", "canonical_split"]

_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}

#: How each canonical split is shown in a dataset's repr.
SPLIT_NAMES = {"train": "Train", "val": "Validation", "test": "Test"}


def canonical_split(dataset: str, split: str) -> str:
    """Return the canonical name of ``split`` (``"validation"`` becomes ``"val"``).

    Args:
        dataset: The dataset's name, quoted in the error.
        split: The split a user asked for.

    Raises:
        ValueError: If ``split`` is not a known split name.

    Example:
        >>> canonical_split("TREC", "validation")
        'val'
    """
    if split not in _ALIASES:
        raise ValueError(
            f"{dataset}: split should be one of ['train', 'val', 'test'] (or 'validation'), "
            f"but got split={split!r}"
        )
    return _ALIASES[split]
