"""Utilities around afnio programs: data loading (``afnio.utils.data``), ready-made datasets
(``afnio.utils.datasets``) and graph drawing (``afnio.utils.viz``)."""

from afnio.utils import data, datasets

__all__ = ["data", "datasets"]
