"""Ready-made datasets for afnio programs.

Example:
    >>> from afnio.utils.datasets import FacilitySupport
    >>> [len(FacilitySupport(split)) for split in ("train", "val", "test")]
    [66, 66, 68]
"""

from afnio.utils.datasets._download import DatasetDownloadError, default_data_root
from afnio.utils.datasets.facility_support import FacilitySupport
from afnio.utils.datasets.trec import TREC

__all__ = ["TREC", "DatasetDownloadError", "FacilitySupport", "default_data_root"]
