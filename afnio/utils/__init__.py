"""Utilities around afnio programs: data loading (``afnio.utils.data``), ready-made datasets
(``afnio.utils.datasets``), graph drawing (``afnio.utils.viz``) and hook handles
(``afnio.utils.hooks``)."""

from afnio.utils import data, datasets, hooks

__all__ = ["data", "datasets", "hooks"]
