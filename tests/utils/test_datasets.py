"""FacilitySupport and TREC: splits, item structure, md5 checks and the download code.

Downloads are exercised with ``file://`` mirrors and a local socket that never answers; no test
touches the network.
"""

import hashlib
import json
import random
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from afnio import Variable
from afnio.utils.data import DataLoader
from afnio.utils.datasets import TREC, DatasetDownloadError, FacilitySupport, _download

SHARED = Path("/work/shared/data/facility_support/dataset.json")
PACKAGED = Path(__file__).parents[2] / "afnio/utils/datasets/data/dataset.json"
SENTIMENTS = {"negative", "neutral", "positive"}
URGENCIES = {"low", "medium", "high"}
CATEGORIES = {
    "routine_maintenance_requests",
    "customer_feedback_and_complaints",
    "training_and_support_requests",
    "quality_and_safety_concerns",
    "sustainability_and_environmental_practices",
    "cleaning_services_scheduling",
    "specialized_cleaning_services",
    "emergency_repair_services",
    "facility_management_issues",
    "general_inquiries",
}


@pytest.fixture
def shared_file():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is not present on this machine")
    return SHARED


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this test must not download anything")

    monkeypatch.setattr("afnio.utils.datasets.facility_support.download_file", refuse)
    monkeypatch.setattr("afnio.utils.datasets.trec.download_file", refuse)


def _messages(dataset):
    return [dataset[i][0].data for i in range(len(dataset))]


# ------------------------------------------------------------------ FacilitySupport
def test_packaged_copy_and_licence_ship_with_afnio():
    assert hashlib.md5(PACKAGED.read_bytes()).hexdigest() == FacilitySupport.md5
    licence = (PACKAGED.parent / "LICENSE").read_text()
    assert "MIT License" in licence and "Meta Platforms" in licence


def test_facility_support_split_sizes(no_download):
    sizes = {split: len(FacilitySupport(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 66, "val": 66, "test": 68}
    assert _messages(FacilitySupport("validation")) == _messages(FacilitySupport("val"))


def test_facility_support_splits_partition_the_file_by_the_peer_rule(no_download, shared_file):
    records = json.loads(shared_file.read_text())
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    expected = [r["fields"]["input"] for r in shuffled]
    got = [m for split in ("train", "val", "test") for m in _messages(FacilitySupport(split))]
    assert got == expected
    assert Counter(got) == Counter(r["fields"]["input"] for r in records)


def test_facility_support_item_structure(no_download, shared_file):
    records = {
        r["fields"]["input"]: json.loads(r["answer"]) for r in json.loads(shared_file.read_text())
    }
    dataset = FacilitySupport("test")
    for index in range(len(dataset)):
        message, targets = dataset[index]
        assert isinstance(targets, tuple) and len(targets) == 3
        urgency, sentiment, categories = targets
        for variable in (message, urgency, sentiment, categories):
            assert isinstance(variable, Variable)
            assert isinstance(variable.data, str) and not variable.requires_grad
            assert variable.role
        answer = records[message.data]
        assert urgency.data == answer["urgency"] in URGENCIES
        assert sentiment.data == answer["sentiment"] in SENTIMENTS
        flags = json.loads(categories.data)
        assert flags == answer["categories"] and set(flags) == CATEGORIES
        assert all(isinstance(flag, bool) for flag in flags.values())


def test_facility_support_items_are_fresh_variables(no_download):
    dataset = FacilitySupport("train")
    assert dataset[0][0] is not dataset[0][0]
    assert dataset[-1][0].data == dataset[65][0].data
    with pytest.raises(IndexError, match="index 66 is out of range for the 'train' split of 66"):
        dataset[66]


def test_facility_support_batches_for_the_sentiment_task(no_download):
    loader = DataLoader(FacilitySupport("train"), batch_size=8, shuffle=True, seed=0)
    assert len(loader) == 9
    message, (urgency, sentiment, categories) = next(iter(loader))
    assert message.batch_size == sentiment.batch_size == 8
    assert set(sentiment.data) <= SENTIMENTS
    assert sentiment.role == "sentiment of the message"


def test_facility_support_rejects_unknown_split():
    with pytest.raises(ValueError, match="split should be one of .* but got split='dev'"):
        FacilitySupport("dev")


def test_facility_support_repr(tmp_path, shared_file):
    raw = tmp_path / "FacilitySupport" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(shared_file, raw / "dataset.json")
    assert repr(FacilitySupport("val")) == (
        "Dataset FacilitySupport\n    Number of datapoints: 66\n    Split: Validation"
    )
    assert f"Root location: {tmp_path}" in repr(FacilitySupport("test", root=tmp_path))


def test_facility_support_reads_a_root_holding_the_shared_file(tmp_path, shared_file, no_download):
    raw = tmp_path / "FacilitySupport" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(shared_file, raw / "dataset.json")
    for split, size in (("train", 66), ("val", 66), ("test", 68)):
        from_root = FacilitySupport(split, root=str(tmp_path))
        assert len(from_root) == size
        assert _messages(from_root) == _messages(FacilitySupport(split))


def test_facility_support_downloads_into_root(tmp_path, shared_file, monkeypatch):
    monkeypatch.setattr(
        FacilitySupport,
        "mirrors",
        [
            (tmp_path / "offline-mirror").as_uri() + "/",  # fails: tried first, then skipped
            shared_file.parent.as_uri() + "/",
        ],
    )
    dataset = FacilitySupport("train", root=tmp_path / "data")
    stored = tmp_path / "data" / "FacilitySupport" / "raw" / "dataset.json"
    assert hashlib.md5(stored.read_bytes()).hexdigest() == FacilitySupport.md5
    assert len(dataset) == 66
    assert sorted(p.name for p in stored.parent.iterdir()) == ["dataset.json"]


def test_facility_support_offline_gives_a_clear_error(tmp_path, monkeypatch):
    missing = (tmp_path / "nowhere").as_uri() + "/"
    monkeypatch.setattr(FacilitySupport, "mirrors", [missing])
    with pytest.raises(DatasetDownloadError) as caught:
        FacilitySupport("train", root=tmp_path)
    message = str(caught.value)
    assert "FacilitySupport: could not download dataset.json" in message
    assert missing + "dataset.json" in message
    assert "If this machine is offline, copy the file to" in message
    assert FacilitySupport.md5 in message
    assert list((tmp_path / "FacilitySupport" / "raw").iterdir()) == []  # no partial file


def test_facility_support_rejects_a_download_with_the_wrong_md5(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "dataset.json").write_text("[]")
    monkeypatch.setattr(FacilitySupport, "mirrors", [mirror.as_uri() + "/"])
    with pytest.raises(DatasetDownloadError, match="does not match the expected 530dc66b"):
        FacilitySupport("train", root=tmp_path / "data")
    assert not (tmp_path / "data" / "FacilitySupport" / "raw" / "dataset.json").exists()


def test_facility_support_checks_md5_of_an_existing_file(tmp_path, no_download):
    raw = tmp_path / "FacilitySupport" / "raw"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text("[]")
    with pytest.raises(ValueError, match="has md5 .* expected 530dc66b.*delete it"):
        FacilitySupport("train", root=tmp_path)
    assert (raw / "dataset.json").read_text() == "[]"  # left for the user to inspect


def test_facility_support_checks_md5_of_the_packaged_copy(tmp_path, monkeypatch):
    tampered = tmp_path / "dataset.json"
    tampered.write_bytes(PACKAGED.read_bytes().replace(b"urgent", b"URGENT", 1))
    monkeypatch.setattr(FacilitySupport, "packaged_file", tampered)
    with pytest.raises(ValueError, match="FacilitySupport: data file .* has md5"):
        FacilitySupport("train")


def test_a_mirror_that_never_answers_times_out(tmp_path, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections, never sends a byte
    port = server.getsockname()[1]
    monkeypatch.setattr(_download, "DOWNLOAD_TIMEOUT", 0.3)
    monkeypatch.setattr(FacilitySupport, "mirrors", [f"http://127.0.0.1:{port}/"])
    outcome = {}

    def attempt():
        try:
            FacilitySupport("train", root=tmp_path)
        except DatasetDownloadError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)  # a liveness bound, not a speed measurement
    server.close()
    assert not worker.is_alive(), "the download hung instead of timing out"
    assert "timed out" in outcome["error"]


# ------------------------------------------------------------------ TREC
TREC_TRAIN = [
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ENTY:cremat What films featured the character Popeye Doyle ?",
    "DESC:manner How can I find a list of celebrities ' real names ?",
    "ENTY:animal What fowl grabs the spotlight after the Chinese Year of the Monkey ?",
    "ABBR:exp What is the full form of .com ?",
    "HUM:ind What contemptible scoundrel stole the cork from my lunch ?",
    "HUM:gr What team did baseball 's St. Louis Browns become ?",
    "HUM:title What is the oldest profession ?",
    "DESC:def What are liver enzymes ?",
    "HUM:ind Name the scar-faced bounty hunter of The Old West .",
    "NUM:date When was Ozzy Osbourne born ?",
    "DESC:reason Why do heavier objects travel downhill faster ?",
    "HUM:ind Who was The Pride of the Yankees ?",
    "HUM:ind Who killed Gandhi ?",
    "ENTY:event What is considered the costliest disaster the insurance industry has faced ?",
    "LOC:state What sprawling U.S. state boasts the most airports ?",
    "DESC:desc What did the only repealed amendment to the U.S. Constitution deal with ?",
    "NUM:count How many Jews were executed in concentration camps during WWII ?",
    'DESC:desc What is " Nine Inch Nails " ?',
    "DESC:def What is an annotated bibliography ?",
    "NUM:date What is the date of Boxing Day ?",
    "ENTY:other What articles of clothing are tokens in Monopoly ?",
    "HUM:ind Name 11 famous martyrs .",
    "DESC:def What 's the Olympic motto ?",
    "ABBR:exp What is the origin of the name ` Scarlett ' ?",
    "LOC:other What is the sister\xf0city of Kiev ?",
    "LOC:city What is the capital of Yugoslavia ?",
    "NUM:dist How far is it from Denver to Aspen ?",
    "HUM:ind Who killed Gandhi ?",  # an exact duplicate: dropped
    "LOC:country Where is Belize located ?",
]
TREC_TEST = [
    "NUM:dist How far is it from Denver to Aspen ?",
    "LOC:city What county is Modesto , California in ?",
    "HUM:desc Who was Galileo ?",
    "DESC:def What is an atom ?",
    "NUM:date When did Hawaii become a state ?",
    "NUM:date When did Hawaii become a state ?",  # test questions are kept as they are
]


def _write_label_file(path, lines):
    payload = b"".join(line.encode().replace("\xf0".encode(), b"\xf0") + b"\n" for line in lines)
    path.write_bytes(payload)
    return hashlib.md5(payload).hexdigest()


@pytest.fixture
def trec_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    resources = [
        ("train_5500.label", _write_label_file(mirror / "train_5500.label", TREC_TRAIN)),
        ("TREC_10.label", _write_label_file(mirror / "TREC_10.label", TREC_TEST)),
    ]
    monkeypatch.setattr(TREC, "mirrors", [mirror.as_uri() + "/"])
    monkeypatch.setattr(TREC, "resources", resources)
    return tmp_path / "data"


def test_trec_real_resources_are_the_cogcomp_files():
    assert TREC.mirrors == ["https://cogcomp.seas.upenn.edu/Data/QA/QC/"]
    assert [name for name, _ in TREC.resources] == ["train_5500.label", "TREC_10.label"]


def test_trec_downloads_and_reads_the_test_split(trec_mirror):
    test = TREC("coarse", "test", root=trec_mirror)
    assert (trec_mirror / "TREC" / "raw" / "TREC_10.label").exists()
    assert (trec_mirror / "TREC" / "raw" / "train_5500.label").exists()
    assert len(test) == 6
    assert test[0] == ("How far is it from Denver to Aspen ?", ("NUM:dist", "NUM"))
    assert test[2] == ("Who was Galileo ?", ("HUM:desc", "HUM"))


def test_trec_train_without_validation_keeps_every_unique_question(trec_mirror):
    train = TREC("coarse", "train", root=trec_mirror)
    assert len(train) == len(TREC_TRAIN) - 1
    assert len(TREC("coarse", "val", root=trec_mirror)) == 0
    assert ("What is the sister city of Kiev ?", ("LOC:other", "LOC")) in list(train)
    assert all(isinstance(q, str) and isinstance(t, tuple) for q, t in train)


def _serve_train_lines(lines, monkeypatch):
    mirror = Path(TREC.mirrors[0][len("file://") :])
    md5 = _write_label_file(mirror / "train_5500.label", lines)
    monkeypatch.setattr(TREC, "resources", [("train_5500.label", md5), TREC.resources[1]])


@pytest.mark.parametrize("task", ["coarse", "fine"])
def test_trec_validation_split_is_stratified_and_deterministic(trec_mirror, monkeypatch, task):
    labels = [line.split(" ", 1)[0] for line in TREC_TRAIN]
    variants = [f"{label} Variant question number {i} ?" for i, label in enumerate(labels)]
    _serve_train_lines(TREC_TRAIN + variants, monkeypatch)  # every fine label at least twice
    train = TREC(task, "train", validation_split=0.25, root=trec_mirror)
    val = TREC(task, "validation", validation_split=0.25, root=trec_mirror)
    position = 0 if task == "fine" else 1
    everything = Counter(t[position] for _, t in list(train) + list(val))
    in_train = Counter(t[position] for _, t in train)
    unique_labels = [line.split(" ", 1)[0] for line in dict.fromkeys(TREC_TRAIN + variants)]
    assert everything == Counter(
        label if task == "fine" else label.split(":")[0] for label in unique_labels
    )
    for label, count in everything.items():
        assert in_train[label] == int(count * 0.75)
    assert not set(train.data) & set(val.data)
    assert len(train) + len(val) == len(TREC_TRAIN) - 1 + len(variants)
    again = TREC(task, "val", validation_split=0.25, root=trec_mirror)
    assert list(again) == list(val)


def test_trec_label_too_small_for_the_split(trec_mirror):
    with pytest.raises(
        ValueError,
        match="label 'ENTY:cremat' has 1 training questions, too few to keep any in 'train'",
    ):
        TREC("fine", "train", validation_split=0.5, root=trec_mirror)
    with pytest.raises(
        ValueError, match="label 'DESC' has 8 training questions, too few to put any in 'val'"
    ):
        TREC("coarse", "train", validation_split=1e-17, root=trec_mirror)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"task": "medium", "split": "train"}, "task should be one of"),
        ({"task": "fine", "split": "dev"}, "split should be one of"),
        ({"task": "fine", "split": "train", "validation_split": 1.0}, r"in \[0, 1\)"),
        ({"task": "fine", "split": "train", "validation_split": -0.1}, r"in \[0, 1\)"),
    ],
)
def test_trec_argument_errors(arguments, message, trec_mirror):
    with pytest.raises(ValueError, match=message):
        TREC(root=trec_mirror, **arguments)


def test_trec_rejects_files_with_the_wrong_md5(trec_mirror, no_download):
    raw = trec_mirror / "TREC" / "raw"
    raw.mkdir(parents=True)
    (raw / "train_5500.label").write_text("DESC:def What ?\n")
    (raw / "TREC_10.label").write_text("DESC:def What ?\n")
    with pytest.raises(ValueError, match="TREC: data file .*train_5500.label has md5"):
        TREC("coarse", "test", root=trec_mirror)


def test_trec_reports_malformed_lines(trec_mirror, monkeypatch):
    _serve_train_lines(["NUM:date When ?", "no label here"], monkeypatch)
    with pytest.raises(ValueError, match="line 2 should read 'COARSE:fine question'"):
        TREC("coarse", "train", root=trec_mirror)


def test_trec_default_root_comes_from_the_environment(trec_mirror, monkeypatch):
    monkeypatch.setenv("AFNIO_DATA_DIR", str(trec_mirror))
    test = TREC("fine", "test")
    assert test.root == trec_mirror
    assert "Task: Classify Fine Labels" in repr(test)


def test_trec_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(TREC, "mirrors", [(tmp_path / "nowhere").as_uri() + "/"])
    with pytest.raises(DatasetDownloadError, match="TREC: could not download train_5500.label"):
        TREC("coarse", "train", root=tmp_path)
