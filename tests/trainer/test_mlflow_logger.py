"""MLflowLogger against a real local MLflow store, read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from verdict_program import SECRET, loaders, make

from afnio.trainer import MLflowLogger, Trainer
from afnio.trainer.history import read_history

mlflow = pytest.importorskip(
    "mlflow", reason="mlflow is not installed: pip install 'afnio[mlflow]'"
)
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes a few seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def fit_with(run_dir, logger, **agent):
    trainer, model = make(run_dir, **agent)
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=run_dir,
        enable_progress_bar=False,
        logger=[logger],
        log_every_n_steps=1,
    )
    model.trainer_ref = trainer
    return trainer, model


def test_a_run_round_trips_through_a_local_mlflow_store(tmp_path, store):
    uri, artifacts = store
    logger = MLflowLogger(
        "afnio-tests",
        run_name="roundtrip",
        tracking_uri=uri,
        artifact_location=artifacts,
        tags={"team": "qa"},
    )
    trainer, agent = fit_with(tmp_path, logger)
    trainer.fit(agent, *loaders())

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "roundtrip"
    assert run.data.tags["team"] == "qa"
    assert run.data.tags["afnio.run_dir"] == str(tmp_path.resolve())
    params = run.data.params
    assert params["trainer.max_epochs"] == "2" and params["trainer.monitor"] == "val_score"
    assert params["optimizers.0.param_groups.0.params"] == '["prefix", "style"]'
    assert params["optimizers.0.param_groups.0.completion_args.temperature"] == "0.0"
    assert not any(SECRET in value or "api_key" in name for name, value in params.items())

    # Metrics: every epoch row at its global step, and one point per training step.
    epochs = client.get_metric_history(logger.run_id, "val_score")
    assert [(m.step, m.value) for m in epochs] == [
        (row["step"], row["val_score"]) for row in trainer.metrics_log.rows
    ]
    costs = client.get_metric_history(logger.run_id, "requests")
    assert [m.value for m in costs] == [row["requests"] for row in trainer.metrics_log.rows]
    per_step = sorted(
        client.get_metric_history(logger.run_id, "train_score_step"), key=lambda m: m.step
    )
    assert [(m.step, m.value) for m in per_step] == [
        (k + 1, pytest.approx(score)) for k, score in enumerate(agent.scores)
    ]

    # Artifacts: each prompt version, the configuration and the report.
    versions = [a.path for a in client.list_artifacts(logger.run_id, "prompts/prefix")]
    assert versions == [f"prompts/prefix/step_{k:06d}.txt" for k in range(9)]
    local = client.download_artifacts(
        logger.run_id, "prompts/prefix/step_000003.txt", str(tmp_path / "down")
    )
    assert Path(local).read_text() == "Answer <b>briefly</b>.|s1|s2|s3"
    styles = [a.path for a in client.list_artifacts(logger.run_id, "prompts/style")]
    assert styles == ["prompts/style/step_000000.txt"]  # rejected proposals make no version
    report = client.download_artifacts(logger.run_id, "report/report.html", str(tmp_path / "d2"))
    assert Path(report).read_bytes() == (tmp_path / "report.html").read_bytes()
    config_path = client.download_artifacts(logger.run_id, "config.json", str(tmp_path / "d3"))
    config = json.loads(Path(config_path).read_text())
    assert config["trainer"]["max_epochs"] == 2 and SECRET not in json.dumps(config)
    assert len(read_history(tmp_path).steps) == 8


def test_a_failed_fit_is_marked_failed_and_a_resume_fills_a_new_run(tmp_path, store):
    uri, artifacts = store
    first = MLflowLogger("afnio-tests", tracking_uri=uri, artifact_location=artifacts)
    trainer, agent = fit_with(tmp_path, first, crash_at=(1, 1))
    with pytest.raises(RuntimeError):
        trainer.fit(agent, *loaders())
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    second = MLflowLogger("afnio-tests", tracking_uri=uri, artifact_location=artifacts)
    trainer, agent = fit_with(tmp_path, second)
    trainer.fit(agent, *loaders(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert second.run_id != first.run_id
    history = client.get_metric_history(second.run_id, "train_score")
    assert [m.step for m in history] == [4, 8]  # epoch 0 from the checkpoint, epoch 1 new
    assert client.get_run(second.run_id).info.status == "FINISHED"


def test_afnio_imports_without_mlflow_and_the_logger_says_how_to_get_it(monkeypatch):
    for name in [name for name in sys.modules if name == "mlflow" or name.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r"pip install 'afnio\[mlflow\]'"):
        MLflowLogger(tracking_uri=os.devnull)
