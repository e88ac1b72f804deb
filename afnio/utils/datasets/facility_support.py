"""Meta's Facility Support Analyzer dataset (200 annotated support messages)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.utils.data.dataset import Dataset
from afnio.utils.datasets._download import check_md5, download_file
from afnio.utils.datasets._splits import SPLIT_NAMES, canonical_split

__all__ = ["FacilitySupport"]



class FacilitySupport(Dataset[tuple[Variable, tuple[Variable, Variable, Variable]]]):
    """Meta's Facility Support Analyzer dataset.

    200 emails and messages sent to a facility-management company, each annotated with its
    urgency (``low``/``medium``/``high``), sentiment (``negative``/``neutral``/``positive``) and
    the service-request categories it belongs to (ten booleans). It comes from Meta's
    ``llama-prompt-ops`` (MIT licence, shipped beside the data).

    A copy ships inside afnio, so ``root=None`` needs no network. With ``root``, the file is
    read from (or first downloaded to) ``root/FacilitySupport/raw/dataset.json``. Either way its
    md5 is checked on load.

    The split is deterministic and the same as the afnio peer package's: the records, in file
    order, are shuffled by ``random.Random(0)``; the first 33% (66) are ``"train"``, the next 33%
    (66) ``"val"`` and the remaining 68 ``"test"``.

    Each item is ``(message, (urgency, sentiment, categories))``, all scalar Variables of
    text; ``categories`` holds the JSON object of the ten category flags.

    Args:
        split: ``"train"``, ``"val"`` (alias ``"validation"``) or ``"test"``.
        root: Folder to keep the downloaded file in; ``None`` reads the packaged copy.

    Raises:
        ValueError: For an unknown split, or a data file whose md5 does not match.
        DatasetDownloadError: If the file must be downloaded and no mirror delivers it.

    Example:
        >>> train = FacilitySupport("train")
        >>> len(train)
        66
        >>> message, (urgency, sentiment, categories) = train[0]
        >>> sentiment.data in {"negative", "neutral", "positive"}
        True
    """

    mirrors: list[str] = [
        "https://raw.githubusercontent.com/meta-llama/llama-prompt-ops/refs/heads/main/"
        "use-cases/facility-support-analyzer/",
    ]
    filename = "dataset.json"
    md5 = "530dc66b1b07c9b15b19f08891e9bfa0"
    packaged_file: Any = resources.files("afnio.utils.datasets").joinpath("data", "dataset.json")

    def __init__(self, split: str, root: str | os.PathLike[str] | None = None) -> None:
        self.split = canonical_split("FacilitySupport", split)
        self.root = None if root is None else Path(root).expanduser()
        records = self._load_records()
        random.Random(0).shuffle(records)
        n_train = n_val = int(len(records) * 0.33)
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(records)),
        }
        start, stop = bounds[self.split]
        self.records: list[dict[str, Any]] = records[start:stop]

    @property
    def raw_folder(self) -> Path | None:
        """``root/FacilitySupport/raw`` when a root was given, else ``None``."""
        return None if self.root is None else self.root / type(self).__name__ / "raw"

    def _load_records(self) -> list[dict[str, Any]]:
        if self.raw_folder is None:
            source: Any = self.packaged_file
        else:
            source = self.raw_folder / self.filename
            if not source.exists():
                urls = [mirror + self.filename for mirror in self.mirrors]
                download_file("FacilitySupport", urls, source, self.md5)
        content = source.read_bytes()
        got = hashlib.md5(content, usedforsecurity=False).hexdigest()
        check_md5("FacilitySupport", source, got, self.md5)
        return json.loads(content.decode("utf-8"))

    def __getitem__(self, index: int) -> tuple[Variable, tuple[Variable, Variable, Variable]]:
        """Return ``(message, (urgency, sentiment, categories))`` for sample ``index``."""
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(
                f"FacilitySupport: index {index} is out of range for the {self.split!r} split "
                f"of {len(self.records)} samples"
            )
        record = self.records[index]
        answer = json.loads(record["answer"])
        message = Variable(record["fields"]["input"], role="message sent to facility support")
        urgency = Variable(answer["urgency"], role="urgency of the message")
        sentiment = Variable(answer["sentiment"], role="sentiment of the message")
        categories = Variable(
            json.dumps(answer["categories"]), role="service request categories of the message"
        )
        return message, (urgency, sentiment, categories)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        lines = [f"Number of datapoints: {len(self)}"]
        if self.root is not None:
            lines.append(f"Root location: {self.root}")
        lines.append(f"Split: {SPLIT_NAMES[self.split]}")
        return "Dataset FacilitySupport\n" + "\n".join("    " + line for line in lines)
