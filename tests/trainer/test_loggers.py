"""Lightning-style loggers: what the Trainer sends them, and the CSV / JSONL files."""

from __future__ import annotations

import json

import pytest
from verdict_program import FORWARD, OPTIMIZER, SECRET, Agent, PricedModel, loaders, make

from afnio.trainer import CSVLogger, JSONLLogger, Logger, Trainer


class Recorder(Logger):
    """Keeps every call, in order."""

    def __init__(self):
        self.calls = []
        self.run_dir = None

    def setup(self, run_dir):
        self.run_dir = run_dir

    def log_hyperparams(self, params):
        self.calls.append(("hyperparams", json.loads(json.dumps(params))))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", dict(metrics), step))

    def log_history(self, rows):
        self.calls.append(("history", [dict(row) for row in rows]))

    def log_text(self, text, name, step):
        self.calls.append(("text", name, step, text))

    def log_artifact(self, path, name=None):
        self.calls.append(("artifact", str(path), name))

    def finalize(self, status):
        self.calls.append(("finalize", status))

    def of(self, kind):
        return [call[1:] for call in self.calls if call[0] == kind]


def trainer_with(run_dir, logger, **kwargs):
    trainer, agent = make(run_dir, **kwargs.pop("agent", {}))
    trainer = Trainer(
        max_epochs=2, default_root_dir=run_dir, enable_progress_bar=False, logger=logger, **kwargs
    )
    agent.trainer_ref = trainer
    return trainer, agent


def test_a_logger_gets_config_step_and_epoch_metrics_prompt_versions_report_and_status(tmp_path):
    recorder = Recorder()
    trainer, agent = trainer_with(tmp_path, recorder, log_every_n_steps=3)
    trainer.fit(agent, *loaders())
    assert recorder.run_dir == tmp_path
    assert [call[0] for call in recorder.calls][:2] == ["history", "hyperparams"]
    assert recorder.calls[-2:] == [
        ("artifact", str(tmp_path / "report.html"), None),
        ("finalize", "success"),
    ]
    (config,) = recorder.of("hyperparams")
    assert config[0]["trainer"]["max_epochs"] == 2
    assert config[0]["optimizers"][0]["param_groups"][0]["params"] == ["prefix", "style"]
    assert SECRET not in json.dumps(config)

    metrics = recorder.of("metrics")
    steps = [(m, step) for m, step in metrics if m["stage"] == "train_step"]
    assert [step for _, step in steps] == [3, 6]
    assert steps[0][0]["train_score_step"] == pytest.approx(agent.scores[2])
    assert steps[0][0]["requests_step"] == 3  # one forward and two optimizer requests
    epochs = [(m, step) for m, step in metrics if m["stage"] == "fit"]
    assert [step for _, step in epochs] == [4, 8]
    assert [m for m, _ in epochs] == trainer.metrics_log.rows

    # Step 0 carries the starting values; then one version per accepted change, in order.
    texts = recorder.of("text")
    prefix = [(step, text) for name, step, text in texts if name == "prefix"]
    assert prefix == [(0, "Answer <b>briefly</b>.")] + [
        (k, "Answer <b>briefly</b>." + "".join(f"|s{i}" for i in range(1, k + 1)))
        for k in range(1, 9)
    ]
    assert [(step, text) for name, step, text in texts if name == "style"] == [(0, "Be polite.")]


def test_finalize_reports_a_failed_and_an_interrupted_fit(tmp_path):
    failing = Recorder()
    trainer, agent = trainer_with(tmp_path / "a", failing, agent={"crash_at": (0, 1)})
    with pytest.raises(RuntimeError):
        trainer.fit(agent, *loaders())
    assert failing.calls[-1] == ("finalize", "failed")
    assert not failing.of("artifact") and not (tmp_path / "a" / "report.html").exists()

    spent = Recorder()
    trainer = Trainer(
        max_epochs=2, default_root_dir=tmp_path / "b", enable_progress_bar=False, logger=spent
    )
    agent = Agent(
        PricedModel(FORWARD, ["ok"] * 99, budget_tokens=60),
        PricedModel(OPTIMIZER, ["ok"] * 99),
    )
    trainer.fit(agent, *loaders())
    assert trainer.stop_reason == "budget"
    assert spent.calls[-2:] == [
        ("artifact", str(tmp_path / "b" / "report.html"), None),
        ("finalize", "interrupted"),
    ]


def test_resume_sends_the_checkpoint_rows_and_no_starting_versions(tmp_path):
    first = Recorder()
    trainer, agent = trainer_with(tmp_path, first, agent={"crash_at": (1, 1)})
    with pytest.raises(RuntimeError):
        trainer.fit(agent, *loaders())
    again = Recorder()
    trainer, agent = trainer_with(tmp_path, again)
    trainer.fit(agent, *loaders(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    histories = again.of("history")
    assert histories[0] == ([],) and histories[1][0] == trainer.metrics_log.rows[:1]
    assert min(step for _, step, _ in again.of("text")) == 6  # epoch 1 resumes after batch 0


def test_default_and_chosen_file_loggers(tmp_path):
    trainer, agent = trainer_with(tmp_path / "off", False)
    trainer.fit(agent, *loaders())
    assert not (tmp_path / "off" / "metrics.jsonl").exists()
    assert (tmp_path / "off" / "report.html").exists()

    steps = JSONLLogger(tmp_path / "elsewhere", include_steps=True)
    trainer, agent = trainer_with(tmp_path / "run", [steps, CSVLogger()])
    trainer.fit(agent, *loaders())
    rows = [json.loads(line) for line in steps.path.read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["train_step"] * 4 + ["fit"] + ["train_step"] * 4 + [
        "fit"
    ]
    assert [row["step"] for row in rows if row["stage"] == "train_step"] == list(range(1, 9))
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("stage,epoch,step,train_score,val_score") and "_step" not in header
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logger": "csv"}, TypeError, "logger must be True, False, an afnio.trainer.Logger"),
        ({"logger": [Logger(), object()]}, TypeError, "got list"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be None or a positive"),
    ],
)
def test_bad_logger_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        Trainer(**kwargs)
