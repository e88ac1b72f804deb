"""The TREC question classification dataset (Li & Roth, 2002)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from afnio.utils.data.dataset import Dataset
from afnio.utils.datasets._download import check_md5, default_data_root, download_file, file_md5
from afnio.utils.datasets._splits import SPLIT_NAMES, canonical_split

__all__ = ["TREC"]

_TASK_NAMES = {"coarse": "Classify Coarse Labels", "fine": "Classify Fine Labels"}

Sample = tuple[str, tuple[str, str]]


def _parse(path: Path) -> list[Sample]:
    """Read a TREC ``.label`` file: one ``FINE_LABEL question`` per line."""
    samples = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            # The training file has one stray non-UTF-8 byte ("sister\xf0city"): make it a space.
            line = raw.replace(b"\xf0", b" ").strip()
            if not line:
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"TREC: {path}, line {number} is not UTF-8: {error}") from None
            fine, _, question = text.partition(" ")
            if ":" not in fine or not question:
                raise ValueError(
                    f"TREC: {path}, line {number} should read 'COARSE:fine question', got {text!r}"
                )
            samples.append((question, (fine, fine.split(":")[0])))
    return samples


class TREC(Dataset[Sample]):
    """The TREC question classification dataset.

    5,452 labelled training questions (5,382 once exact duplicates are removed) and 500 test
    questions (from TREC 10), with 6 coarse and 50 fine labels. Files are downloaded from the
    Cognitive Computation Group's site into ``root/TREC/raw`` and md5-checked.

    ``"train"`` and ``"val"`` both come from the de-duplicated training file, split by label
    (stratified on the task's labels): the questions of each label, in order of first
    appearance, are shuffled by one ``random.Random(42)`` and the last ``validation_split``
    fraction of each goes to ``"val"`` — the same split as the afnio peer package's.

    Each item is ``(question, (fine_label, coarse_label))``, e.g.
    ``("How far is it from Denver to Aspen ?", ("NUM:dist", "NUM"))``.

    Args:
        task: ``"coarse"`` or ``"fine"``: which labels the train/val split is stratified on.
        split: ``"train"``, ``"val"`` (alias ``"validation"``) or ``"test"``.
        validation_split: Fraction (``0 <= f < 1``) of each label's training questions that go
            to ``"val"``.
        root: Folder to keep the files in; defaults to :func:`default_data_root`.

    Raises:
        ValueError: For a bad task, split or fraction; for a file with the wrong md5; or when a
            label would end up missing from the train or val split.
        DatasetDownloadError: If a file must be downloaded and no mirror delivers it.

    Example:
        >>> train = TREC("coarse", "train", validation_split=0.1)  # doctest: +SKIP
        >>> train[0]  # doctest: +SKIP
        ('How did serfdom develop in and then leave Russia ?', ('DESC:manner', 'DESC'))
    """

    mirrors: list[str] = ["https://cogcomp.seas.upenn.edu/Data/QA/QC/"]
    resources: list[tuple[str, str]] = [
        ("train_5500.label", "073462e3fcefaae31e00edb1f18d2d02"),
        ("TREC_10.label", "323a3554401d86e650717e2d2f942589"),
    ]

    def __init__(
        self,
        task: str,
        split: str,
        validation_split: float = 0.0,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        if task not in _TASK_NAMES:
            raise ValueError(
                f"TREC: task should be one of ['coarse', 'fine'], but got task={task!r}"
            )
        canonical = canonical_split("TREC", split)
        if (
            isinstance(validation_split, bool)
            or not isinstance(validation_split, (int, float))
            or not 0.0 <= validation_split < 1.0
        ):
            raise ValueError(
                "TREC: validation_split should be a number in [0, 1), "
                f"but got validation_split={validation_split!r}"
            )
        self.task = task
        self.split = canonical
        self.validation_split = float(validation_split)
        self.root = default_data_root() if root is None else Path(root).expanduser()
        self._ensure_files()
        if self.split == "test":
            samples = _parse(self.raw_folder / self.resources[1][0])
        else:
            train, val = self._train_val_split()
            samples = train if self.split == "train" else val
        self.data = [question for question, _ in samples]
        self.targets = [labels for _, labels in samples]

    @property
    def raw_folder(self) -> Path:
        """``root/TREC/raw``, where the ``.label`` files live."""
        return self.root / type(self).__name__ / "raw"

    def _ensure_files(self) -> None:
        for filename, md5 in self.resources:
            path = self.raw_folder / filename
            if not path.exists():
                urls = [mirror + filename for mirror in self.mirrors]
                download_file("TREC", urls, path, md5)
            check_md5("TREC", path, file_md5(path), md5)

    def _train_val_split(self) -> tuple[list[Sample], list[Sample]]:
        unique = list(dict.fromkeys(_parse(self.raw_folder / self.resources[0][0])))
        label_position = 0 if self.task == "fine" else 1
        by_label: dict[str, list[Sample]] = {}
        for sample in unique:
            by_label.setdefault(sample[1][label_position], []).append(sample)
        rng = random.Random(42)
        train: list[Sample] = []
        val: list[Sample] = []
        for label, samples in by_label.items():
            rng.shuffle(samples)
            cut = int(len(samples) * (1 - self.validation_split))
            if cut == 0:
                raise ValueError(
                    f"TREC: label {label!r} has {len(samples)} training questions, too few to "
                    f"keep any in 'train' with validation_split={self.validation_split}"
                )
            if cut == len(samples) and self.validation_split > 0:
                raise ValueError(
                    f"TREC: label {label!r} has {len(samples)} training questions, too few to "
                    f"put any in 'val' with validation_split={self.validation_split}"
                )
            train.extend(samples[:cut])
            val.extend(samples[cut:])
        return train, val

    def __getitem__(self, index: int) -> Sample:
        """Return ``(question, (fine_label, coarse_label))`` for sample ``index``."""
        return self.data[index], self.targets[index]

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        lines = [
            f"Number of datapoints: {len(self)}",
            f"Root location: {self.root}",
            f"Split: {SPLIT_NAMES[self.split]}",
            f"Task: {_TASK_NAMES[self.task]}",
        ]
        return "Dataset TREC\n" + "\n".join("    " + line for line in lines)
