"""Utilities around afnio programs: data loading (``afnio.utils.data``), ready-made datasets
(``afnio.utils.datasets``), graph drawing (``afnio.utils.viz``), hook handles
(``afnio.utils.hooks``) and Ray helpers (``afnio.utils.ray``, with the ``ray`` extra; not imported
here)."""

from afnio.utils import data, datasets, hooks

__all__ = ["data", "datasets", "hooks"]
