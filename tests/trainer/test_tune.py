"""afnio.trainer.tune: one report per finished epoch with its checkpoint, exact resumes, the best
epoch recovered (without a cluster: ``run_trial`` with a stand-in for ``tune.report``; the sweep
example in ``tests/examples/test_tune_sweep.py`` runs the same code under Tune)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from afnio.trainer.checkpoint import read_checkpoint
from afnio.trainer.tune import CHECKPOINT_FILE, BestTrial, TuneJob, best_trial, run_trial, trainable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tune_sweep.py"


def load_example():
    name = "afnio_example_tune_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


CONFIG = {"optimizer": "tgd", "momentum": 2, "batch_size": 2, "seed": 1, "max_epochs": 3}


class Reports:
    """A stand-in for ``tune.report`` that keeps each epoch's metrics and checkpoint file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics: list[dict] = []
        self.files: list[Path] = []

    def __call__(self, metrics: dict, checkpoint_dir: str) -> None:
        kept = self.directory / f"report{len(self.metrics)}.ckpt"
        shutil.copyfile(Path(checkpoint_dir) / CHECKPOINT_FILE, kept)
        self.metrics.append(metrics)
        self.files.append(kept)


def test_each_finished_epoch_is_reported_once_with_its_checkpoint(tmp_path) -> None:
    example = load_example()
    reports = Reports(tmp_path)
    trainer = run_trial(example.build, CONFIG, run_dir=tmp_path / "run", report=reports)
    assert [m["epoch"] for m in reports.metrics] == [0, 1, 2]
    assert [m["val_score"] for m in reports.metrics] == [
        row["val_score"] for row in trainer.metrics_log.rows]
    assert all(isinstance(value, (int, float)) for m in reports.metrics for value in m.values())
    for epoch, file in enumerate(reports.files):
        saved = read_checkpoint(file)
        assert (saved["epoch"], saved["batches_done"]) == (epoch + 1, 0)  # after the epoch
        assert saved["metrics"]["val_score"] == reports.metrics[epoch]["val_score"]
    assert read_checkpoint(reports.files[-1])["agent"]["rules"].data == trainer._agent.rules.data


def test_a_resumed_trial_reports_only_the_epochs_it_runs_and_ends_the_same(tmp_path) -> None:
    example = load_example()
    whole = Reports(tmp_path / "whole")
    run_trial(example.build, CONFIG, run_dir=tmp_path / "a", report=whole)
    resumed = Reports(tmp_path / "resumed")
    trainer = run_trial(example.build, CONFIG, run_dir=tmp_path / "b", report=resumed,
                        resume_from=whole.files[0])
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]
    assert resumed.metrics == whole.metrics[1:]
    assert trainer._agent.rules.data == read_checkpoint(whole.files[-1])["agent"]["rules"].data


@pytest.mark.parametrize(
    ("job", "error", "match"),
    [
        (lambda config: {"agent": None}, TypeError, "must return a TuneJob"),
        (lambda config: TuneJob(None, [], trainer_args={"default_root_dir": "x"}), ValueError,
         "may not set default_root_dir"),
        (lambda config: TuneJob(None, [], trainer_args={"enable_checkpointing": False}),
         ValueError, "turns checkpointing off"),
    ],
)
def test_bad_jobs_are_refused(tmp_path, job, error, match) -> None:
    with pytest.raises(error, match=match):
        run_trial(job, {}, run_dir=tmp_path, report=lambda metrics, directory: None)
    with pytest.raises(TypeError, match="build must be callable"):
        trainable("build")


class _Checkpoint:
    """What Tune hands back for a reported checkpoint: a directory to read."""

    def __init__(self, file: Path) -> None:
        self.directory = file.parent / f"{file.stem}-dir"
        self.directory.mkdir()
        shutil.copyfile(file, self.directory / CHECKPOINT_FILE)

    def as_directory(self):
        from contextlib import nullcontext

        return nullcontext(str(self.directory))


class _Result:
    def __init__(self, config, reports: Reports, path: str) -> None:
        self.config = config
        self.path = path
        self.best_checkpoints = [
            (_Checkpoint(file), {**metrics, "config": config})
            for file, metrics in zip(reports.files, reports.metrics)
        ]


def test_best_trial_prefers_the_best_score_then_the_earliest_epoch(tmp_path) -> None:
    example = load_example()
    results = []
    base = {"momentum": 0, "batch_size": 2, "seed": 0, "max_epochs": 2}
    for number, family in enumerate(["tgd", "tgd-examples"]):
        reports = Reports(tmp_path / f"t{number}")
        config = {**base, "optimizer": family}
        run_trial(example.build, config, run_dir=tmp_path / f"run{number}", report=reports)
        results.append(_Result(config, reports, f"/trials/{number}"))
    scores = [[m["val_score"] for _, m in r.best_checkpoints] for r in results]
    best = best_trial(results, "val_score", "max")
    top = max(max(s) for s in scores)
    epoch, trial = min((epoch, number) for number, s in enumerate(scores)
                       for epoch, value in enumerate(s) if value == top)
    assert scores[0].index(top) > scores[1].index(top)  # a tie the later trial reached first
    assert (trial, epoch) == (1, 0)
    assert isinstance(best, BestTrial)
    assert best.metrics["val_score"] == top and best.path == f"/trials/{trial}"
    assert best.metrics["epoch"] == epoch
    assert best.config == results[trial].config and "config" not in best.metrics
    assert best.agent_state["rules"].data.startswith(example.INITIAL_PROMPT)
    worst = best_trial(results, "val_score", "min")
    assert worst.metrics["val_score"] == min(min(s) for s in scores)
    with pytest.raises(ValueError, match="no reported epoch has a checkpoint and a numeric "
                                         "'val_scor'"):
        best_trial(results, "val_scor")
