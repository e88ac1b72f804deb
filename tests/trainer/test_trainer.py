"""Trainer end to end with a scripted model: fit, resume, budget, errors, metrics and cost."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from rich.console import Console

import afnio
from afnio.autodiff.basic_ops import Add
from afnio.autodiff.evaluator import DeterministicEvaluator
from afnio.cognitive import Module, Parameter
from afnio.models.errors import TransientError
from afnio.optim import TGD
from afnio.testing import ScriptedModel
from afnio.trainer import Callback, Trainer
from afnio.trainer.checkpoint import read_checkpoint, write_checkpoint
from afnio.utils.data import DataLoader


# --------------------------------------------------------------------------- the program
def improve(messages, **_):
    """The optimizer model: append the target ids its feedback mentions, in feedback order.

    The new value is a pure function of the request, so the final prompt records which batches
    were trained on and in which order.
    """
    user = messages[-1]["content"]
    old = re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", user, re.S).group(1)
    feedback = re.search(r"<FEEDBACK>(.*?)</FEEDBACK>", user, re.S).group(1)
    if '"a8"' in feedback and old.startswith("flaky"):
        raise TransientError("server error", status=500)
    ids = re.findall(r'"(a\d+)"', feedback)
    return f"<IMPROVED_VARIABLE>{old}|{','.join(ids)}</IMPROVED_VARIABLE>"


def divisible_by_three(prediction, target):
    return int(int(target[1:]) % 3 == 0)


class Crash(Exception):
    """A simulated kill."""


class Agent(Module):
    """Prompt + question, scored by a deterministic evaluator; TGD rewrites the prompt."""

    def __init__(self, client, prompt="v0", crash_at=None):
        super().__init__()
        self.prompt = Parameter(prompt, role="system prompt")
        self.client = client
        self.seen = []
        self.crash_at = crash_at  # (epoch, batch_idx) whose training_step raises Crash
        self.epoch = 0
        self.grad_enabled_in_eval = []

    def forward(self, questions):
        return Add.apply(self.prompt, questions)

    def evaluate(self, batch):
        questions, answers = batch
        return DeterministicEvaluator.apply(
            self(questions), answers, divisible_by_three, "divisibility", lambda s: s == 1
        )

    def training_step(self, batch, batch_idx):
        if self.crash_at == (self.trainer_epoch(), batch_idx):
            raise Crash(f"killed at batch {batch_idx}")
        self.seen.append(list(batch[0].data))
        return self.evaluate(batch)

    def trainer_epoch(self):
        return self.trainer.current_epoch if hasattr(self, "trainer") else None

    def validation_step(self, batch, batch_idx):
        self.grad_enabled_in_eval.append((afnio.is_grad_enabled(), self.training))
        return self.evaluate(batch)

    def test_step(self, batch, batch_idx):
        score, explanation = self.evaluate(batch)
        return {"loss": (score, explanation), "length": float(len(batch[0].data[0]))}

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).data

    def configure_optimizers(self):
        return TGD(self.parameters(), model_client=self.client, momentum=2)


DATA = [(afnio.Variable(f"q{i}", role="question"), f"a{i}") for i in range(10)]


def loaders(seed=7):
    train = DataLoader(DATA, batch_size=3, shuffle=True, seed=seed)
    val = DataLoader(DATA[:5], batch_size=2)
    return train, val


def make_agent(trainer=None, **kwargs):
    agent = Agent(ScriptedModel(improve), **kwargs)
    if trainer is not None:
        object.__setattr__(agent, "trainer", trainer)
    return agent


def quiet_trainer(tmp_path, **kwargs):
    kwargs.setdefault("max_epochs", 3)
    return Trainer(default_root_dir=tmp_path, enable_progress_bar=False, **kwargs)


def read_rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def uninterrupted(tmp_path):
    trainer = quiet_trainer(tmp_path / "full")
    agent = make_agent(trainer)
    trainer.fit(agent, *loaders())
    return trainer, agent


# --------------------------------------------------------------------------- fit
def test_fit_trains_every_sample_once_per_epoch_and_writes_logs_and_checkpoints(tmp_path):
    trainer, agent = uninterrupted(tmp_path)
    run_dir = tmp_path / "full"
    assert trainer.stop_reason == "max_epochs"
    assert (trainer.current_epoch, trainer.batches_done, trainer.global_step) == (3, 0, 12)
    epochs = [sum(agent.seen[i * 4 : i * 4 + 4], []) for i in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(f"q{i}" for i in range(10))
    assert len({tuple(order) for order in epochs}) == 3  # a new order each epoch
    # One optimizer update per batch with feedback: the prompt lists the failing ids per batch.
    failing = [",".join(f"a{q[1:]}" for q in batch if int(q[1:]) % 3) for batch in agent.seen]
    assert agent.prompt.data == "v0|" + "|".join(ids for ids in failing if ids)
    assert agent.client.calls == sum(1 for ids in failing if ids)

    rows = read_rows(run_dir)
    assert [(r["stage"], r["epoch"], r["step"]) for r in rows] == [
        ("fit", 0, 4),
        ("fit", 1, 8),
        ("fit", 2, 12),
    ]
    for row in rows:
        assert row["train_score"] == pytest.approx(0.4)  # q0, q3, q6, q9 of 10
        assert row["val_score"] == pytest.approx(0.4)  # q0, q3 of the first 5
        assert row["skipped_batches"] == 0
    usage = agent.client.get_usage()
    assert sum(r["requests"] for r in rows) == usage["requests"] == agent.client.calls
    assert sum(r["prompt_tokens"] for r in rows) == usage["prompt_tokens"]
    assert rows[-1]["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    with (run_dir / "metrics.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [list(r) for r in table] == [list(r) for r in rows]
    assert [float(t["train_score"]) for t in table] == [r["train_score"] for r in rows]

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best.ckpt", "epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"]
    last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["batches_done"], last["global_step"]) == (3, 0, 12)
    assert last["agent"]["prompt"].data == agent.prompt.data
    assert last["loader"]["seed"] == 7 and last["loader"]["initial_seed"] == 7
    assert last["history"] == rows
    # val_score never improves on epoch 0, so best.ckpt is the state after the first epoch.
    best = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    first = read_checkpoint(run_dir / "checkpoints" / "epoch=0.ckpt")
    assert best["epoch"] == 1 and best["agent"]["prompt"].data == first["agent"]["prompt"].data
    assert trainer.best_score == pytest.approx(0.4)
    assert all(
        enabled is False and training is False for enabled, training in agent.grad_enabled_in_eval
    )
    assert agent.training is True


def test_checkpoints_hold_no_secret_and_resume_in_another_directory(tmp_path):
    trainer, agent = uninterrupted(tmp_path)
    raw = (tmp_path / "full" / "checkpoints" / "last.ckpt").read_bytes()
    assert b"api_key" not in raw
    other = quiet_trainer(tmp_path / "elsewhere", max_epochs=4)
    resumed = make_agent(other)
    other.fit(resumed, *loaders(), ckpt_path=trainer.last_checkpoint_path)
    assert resumed.prompt.data.startswith(agent.prompt.data)
    assert [r["epoch"] for r in read_rows(tmp_path / "elsewhere")] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- resume
def assert_same_run(full_trainer, full_agent, parts, tmp_path, resumed_dir):
    """The interrupted and resumed parts together equal the uninterrupted run."""
    first_agent, resumed_agent, finished_batches = parts
    assert first_agent.seen[:finished_batches] + resumed_agent.seen == full_agent.seen
    assert resumed_agent.prompt.data == full_agent.prompt.data
    assert resumed_agent.optimizers().state_dict() == full_agent.optimizers().state_dict()
    assert read_rows(resumed_dir) == read_rows(tmp_path / "full")


def test_resume_after_a_crash_in_a_training_step_replays_the_same_run(tmp_path):
    full_trainer, full_agent = uninterrupted(tmp_path)

    run_dir = tmp_path / "crashed"
    trainer = quiet_trainer(run_dir)
    agent = make_agent(trainer, crash_at=(1, 2))
    with pytest.raises(Crash) as raised:
        trainer.fit(agent, *loaders())
    assert trainer.stop_reason == "error"
    assert trainer.errors == [
        {"stage": "train", "epoch": 1, "batch_idx": 2, "error": "Crash: killed at batch 2"}
    ]
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "epoch 1, batch 2" in notes and "last.ckpt" in notes
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 2, 6)
    assert checkpoint["reason"] == "error"

    resumed_trainer = quiet_trainer(run_dir)
    resumed = make_agent(resumed_trainer)
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=run_dir / "checkpoints" / "last.ckpt")
    assert resumed_trainer.stop_reason == "max_epochs"
    assert_same_run(full_trainer, full_agent, (agent, resumed, 6), tmp_path, run_dir)


class KillAfter(Callback):
    def __init__(self, epoch, batch_idx):
        self.at = (epoch, batch_idx)

    def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise KeyboardInterrupt


def test_resume_after_an_interrupt_from_a_callback_replays_the_same_run(tmp_path):
    full_trainer, full_agent = uninterrupted(tmp_path)

    run_dir = tmp_path / "interrupted"
    trainer = quiet_trainer(run_dir, callbacks=[KillAfter(0, 1)])
    agent = make_agent(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(agent, *loaders())
    assert trainer.stop_reason == "interrupted"
    checkpoint = read_checkpoint(trainer.last_checkpoint_path)
    assert (checkpoint["epoch"], checkpoint["batches_done"]) == (0, 2)  # batch 1 finished
    assert checkpoint["loader"]["epoch"] == 0
    assert not (run_dir / "metrics.jsonl").read_text()  # no epoch finished yet

    resumed_trainer = quiet_trainer(run_dir)
    resumed = make_agent(resumed_trainer)
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=trainer.last_checkpoint_path)
    assert_same_run(full_trainer, full_agent, (agent, resumed, 2), tmp_path, run_dir)


def test_should_stop_from_a_callback_ends_the_fit_with_a_resumable_checkpoint(tmp_path):
    class StopAt(Callback):
        def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    full_trainer, full_agent = uninterrupted(tmp_path)
    run_dir = tmp_path / "stopped"
    trainer = quiet_trainer(run_dir, callbacks=[StopAt()])
    agent = make_agent(trainer)
    trainer.fit(agent, *loaders())
    assert trainer.stop_reason == "should_stop"
    assert read_checkpoint(trainer.last_checkpoint_path)["global_step"] == 5
    resumed_trainer = quiet_trainer(run_dir)
    resumed = make_agent(resumed_trainer)
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=trainer.last_checkpoint_path)
    assert_same_run(full_trainer, full_agent, (agent, resumed, 5), tmp_path, run_dir)


def test_resuming_with_a_differently_seeded_loader_warns(tmp_path):
    trainer, _ = uninterrupted(tmp_path)
    console_text = io.StringIO()
    other = Trainer(
        max_epochs=4,
        default_root_dir=tmp_path / "other",
        console=Console(file=console_text, width=200),
    )
    other.fit(make_agent(other), *loaders(seed=8), ckpt_path=trainer.last_checkpoint_path)
    assert "initial_seed is 8 but was 7" in console_text.getvalue()


# --------------------------------------------------------------------------- budget
def test_spent_budget_stops_cleanly_with_a_checkpoint_and_resumes(tmp_path):
    full_trainer, full_agent = uninterrupted(tmp_path)
    run_dir = tmp_path / "budget"
    output = io.StringIO()
    trainer = Trainer(
        max_epochs=3, default_root_dir=run_dir, console=Console(file=output, width=300)
    )
    agent = Agent(ScriptedModel(improve, budget_tokens=2500))
    object.__setattr__(agent, "trainer", trainer)
    trainer.fit(agent, *loaders())  # returns normally

    assert trainer.stop_reason == "budget"
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["reason"] == "budget"
    done = checkpoint["global_step"]
    assert 0 < done < 12
    used = agent.client.get_usage()
    assert 1000 < used["prompt_tokens"] + used["completion_tokens"] <= 2500  # never overshoots
    assert checkpoint["agent"]["prompt"].data == agent.prompt.data
    text = output.getvalue()
    assert "model budget spent" in text and "last.ckpt" in text
    assert "token budget of 2500 would be passed" in text

    resumed_trainer = quiet_trainer(run_dir)
    resumed = make_agent(resumed_trainer)  # a client without a budget
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=run_dir / "checkpoints" / "last.ckpt")
    assert resumed.client.get_config().get("budget_tokens") is None
    assert resumed_trainer.stop_reason == "max_epochs"
    assert agent.seen[:done] + resumed.seen == full_agent.seen
    assert resumed.prompt.data == full_agent.prompt.data


# --------------------------------------------------------------------------- errors
def test_on_error_skip_reports_the_batch_and_keeps_training(tmp_path, caplog):
    trainer = quiet_trainer(tmp_path, max_epochs=1, on_error="skip")
    client = ScriptedModel(improve, max_retries=1, retry_base_delay=0.0)
    agent = Agent(client, prompt="flaky")
    object.__setattr__(agent, "trainer", trainer)
    trainer.fit(agent, *loaders())

    failed = [i for i, batch in enumerate(agent.seen) if "q8" in batch]
    assert len(failed) == 1
    assert trainer.errors == [
        {
            "stage": "train",
            "epoch": 0,
            "batch_idx": failed[0],
            "error": "TransientError: server error",
        }
    ]
    assert f"train step failed at epoch 0, batch {failed[0]}" in caplog.text
    assert "a8" not in agent.prompt.data  # the failed update was not applied
    with_feedback = [
        i
        for i, batch in enumerate(agent.seen)
        if i != failed[0] and any(int(q[1:]) % 3 for q in batch)
    ]
    assert agent.prompt.data.count("|") == len(with_feedback)  # the other updates were made
    row = read_rows(tmp_path)[0]
    assert row["skipped_batches"] == 1
    assert row["train_score"] == pytest.approx(3 / 7)  # the 7 samples of the other batches


def test_on_error_raise_checkpoints_then_reraises_with_the_batch_index(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    client = ScriptedModel(improve, max_retries=1, retry_base_delay=0.0)
    agent = Agent(client, prompt="flaky")
    with pytest.raises(TransientError) as raised:
        trainer.fit(agent, *loaders())
    failed = next(i for i, batch in enumerate(agent.seen) if "q8" in batch)
    assert f"train step failed at epoch 0, batch {failed}" in "\n".join(raised.value.__notes__)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["batches_done"] == failed
    assert checkpoint["agent"]["prompt"].data == agent.prompt.data


def test_malformed_step_output_names_the_hook(tmp_path):
    class Bad(Agent):
        def training_step(self, batch, batch_idx):
            return {"score": 1}

    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(TypeError, match="training_step: the returned dict has no 'loss'"):
        trainer.fit(Bad(ScriptedModel(improve)), *loaders())


# --------------------------------------------------------------------------- manual mode
class ManualAgent(Agent):
    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        score, explanation = self.evaluate(batch)
        explanation.backward()
        optimizer.step()
        self.seen.append(list(batch[0].data))
        correct = [int(int(q[1:]) % 3 == 0) for q in batch[0].data]
        return {"loss": (score, explanation), "hits": afnio.Variable(correct)}


def test_manual_optimization_runs_the_agents_own_steps_and_logs_extra_metrics(tmp_path):
    full_trainer, full_agent = uninterrupted(tmp_path)
    trainer = quiet_trainer(tmp_path / "manual")
    agent = ManualAgent(ScriptedModel(improve))
    trainer.fit(agent, *loaders())
    assert agent.optimizers() is trainer._optimizers[0]
    assert agent.prompt.data == full_agent.prompt.data
    rows = read_rows(tmp_path / "manual")
    assert [row["train_hits"] for row in rows] == pytest.approx([0.4, 0.4, 0.4])


def test_automatic_optimization_needs_an_optimizer(tmp_path):
    class NoOptimizer(Agent):
        def configure_optimizers(self):
            return None

    with pytest.raises(ValueError, match="returned no optimizer"):
        quiet_trainer(tmp_path).fit(NoOptimizer(ScriptedModel(improve)), *loaders())


# --------------------------------------------------------------------------- evaluation
def test_validate_test_and_predict_run_in_eval_mode_without_grad(tmp_path):
    trainer = quiet_trainer(tmp_path)
    agent = make_agent()
    train, val = loaders()
    assert trainer.validate(agent, val) == {"val_score": pytest.approx(0.4)}
    assert agent.grad_enabled_in_eval == [(False, False)] * 3
    assert agent.training is True
    metrics = trainer.test(agent, DataLoader(DATA, batch_size=4))
    assert metrics == {"test_score": pytest.approx(0.4), "test_length": pytest.approx(2.0)}
    assert trainer.predict(agent, DataLoader(DATA[:3], batch_size=2)) == [
        ["v0q0", "v0q1"],
        ["v0q2"],
    ]
    assert [row["stage"] for row in read_rows(tmp_path)] == ["validate", "test"]
    assert agent.client.calls == 0


def test_score_reduction_mean_takes_the_score_as_a_per_sample_value(tmp_path):
    class MeanAgent(Agent):
        def validation_step(self, batch, batch_idx):
            questions, answers = batch
            return DeterministicEvaluator.apply(
                self(questions),
                answers,
                divisible_by_three,
                "divisibility",
                lambda s: s == 1,
                lambda scores: sum(scores) / len(scores),
                "mean",
            )

    trainer = quiet_trainer(tmp_path, score_reduction="mean")
    # Batches of 4, 4, 2 with hit rates 2/4, 1/4, 1/2 -> weighted mean 4/10.
    metrics = trainer.validate(MeanAgent(ScriptedModel(improve)), DataLoader(DATA, batch_size=4))
    assert metrics == {"val_score": pytest.approx(0.4)}


# --------------------------------------------------------------------------- cost and console
class PricedModel(ScriptedModel):
    """A scripted model billed at gpt-4o-mini prices, so costs are non-zero."""

    provider = "openai"


def test_cost_and_tokens_per_epoch_reach_the_log_and_the_console(tmp_path):
    output = io.StringIO()
    trainer = Trainer(
        max_epochs=2, default_root_dir=tmp_path, console=Console(file=output, width=200)
    )
    agent = Agent(PricedModel(improve, model="gpt-4o-mini"))
    trainer.fit(agent, *loaders())
    rows = read_rows(tmp_path)
    usage = agent.client.get_usage()
    assert usage["cost_usd"] > 0
    assert sum(row["cost_usd"] for row in rows) == pytest.approx(usage["cost_usd"])
    assert rows[-1]["total_cost_usd"] == pytest.approx(usage["cost_usd"])
    assert trainer.usage.cost_usd == pytest.approx(usage["cost_usd"])
    text = output.getvalue()
    assert "Epoch 0/1" in text and "Epoch 1/1" in text and "Validation" in text
    assert f"total ${usage['cost_usd']:.4f}" in text
    assert f"{usage['prompt_tokens'] + usage['completion_tokens']:,} tok" in text


def test_disabled_progress_bar_prints_nothing(tmp_path):
    output = io.StringIO()
    trainer = Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        console=Console(file=output),
    )
    trainer.fit(make_agent(), *loaders())
    assert output.getvalue() == ""


# --------------------------------------------------------------------------- checkpoints
def test_save_checkpoint_on_request_and_checkpointing_off(tmp_path):
    trainer = quiet_trainer(tmp_path / "off", max_epochs=1, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="call fit"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    agent = make_agent()
    trainer.fit(agent, *loaders())
    assert not (tmp_path / "off" / "checkpoints").exists()
    path = trainer.save_checkpoint(tmp_path / "manual.ckpt")
    state = read_checkpoint(path)
    assert state["reason"] == "manual" and state["epoch"] == 1
    assert state["agent"]["prompt"].data == agent.prompt.data


def test_read_checkpoint_rejects_other_files(tmp_path):
    afnio.serialization.save({"epoch": 1}, tmp_path / "plain.afnio")
    with pytest.raises(ValueError, match="not a Trainer checkpoint"):
        read_checkpoint(tmp_path / "plain.afnio")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.ckpt")
    write_checkpoint({"epoch": 0}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="lacks"):
        read_checkpoint(tmp_path / "partial.ckpt")


def test_write_checkpoint_encodes_once_and_writes_every_copy(tmp_path, monkeypatch):
    encodings = []
    real_save = afnio.trainer.checkpoint.save

    def counting_save(obj, f):
        encodings.append(obj["epoch"])
        real_save(obj, f)

    monkeypatch.setattr(afnio.trainer.checkpoint, "save", counting_save)
    paths = [tmp_path / "a" / "epoch=0.ckpt", tmp_path / "b" / "last.ckpt", tmp_path / "best.ckpt"]
    assert write_checkpoint({"epoch": 0}, *paths) == paths[0]
    assert encodings == [0]
    assert len({path.read_bytes() for path in paths}) == 1
    assert afnio.serialization.load(paths[1])["epoch"] == 0


def test_an_epoch_end_writes_one_state_to_its_epoch_last_and_best_files(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(make_agent(trainer), *loaders())
    folder = trainer.checkpoint_dir
    contents = {(folder / name).read_bytes() for name in ("epoch=0.ckpt", "last.ckpt", "best.ckpt")}
    assert len(contents) == 1
    assert trainer.last_checkpoint_path == folder / "last.ckpt"
    assert trainer.best_model_path == folder / "best.ckpt"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 0}, "max_epochs"),
        ({"on_error": "ignore"}, "on_error"),
        ({"score_reduction": "max"}, "score_reduction"),
        ({"mode": "best"}, "mode"),
        ({"checkpoint_every_n_batches": 0}, "checkpoint_every_n_batches"),
    ],
)
def test_bad_trainer_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(**kwargs)


def test_live_progress_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    for terminal in (True, False):
        output = io.StringIO()
        console = Console(file=output, width=160, force_terminal=terminal)
        trainer = Trainer(max_epochs=1, default_root_dir=tmp_path / str(terminal), console=console)
        trainer.fit(make_agent(), *loaders())
        text = output.getvalue()
        assert ("\x1b[" in text) is terminal
        assert "Epoch 0/0" in text and "train_score=0.400 val_score=0.400" in text


def test_budget_spent_during_validation_resumes_with_the_validation(tmp_path):
    class ValidationCalls(Agent):
        def __init__(self, judge):
            super().__init__(ScriptedModel(improve))
            self.judge = judge

        def validation_step(self, batch, batch_idx):
            self.judge.chat([{"role": "user", "content": "judge " + batch[0].data[0]}])
            return self.evaluate(batch)

    run_dir = tmp_path / "val-budget"
    trainer = quiet_trainer(run_dir, max_epochs=1)
    agent = ValidationCalls(ScriptedModel(["ok"], budget_tokens=20, max_tokens=5))  # one call
    trainer.fit(agent, *loaders())
    assert trainer.stop_reason == "budget"
    checkpoint = read_checkpoint(trainer.last_checkpoint_path)
    assert (checkpoint["epoch"], checkpoint["batches_done"]) == (0, 4)  # training was done
    assert agent.judge.calls == 1
    assert trainer.errors[-1]["stage"] == "val"

    resumed_trainer = quiet_trainer(run_dir, max_epochs=1)
    resumed = ValidationCalls(ScriptedModel(["ok"]))
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=trainer.last_checkpoint_path)
    assert resumed.seen == []  # no training batch was repeated
    assert resumed.judge.calls == 3  # the validation ran in full
    assert resumed.prompt.data == agent.prompt.data
    rows = read_rows(run_dir)
    assert [(row["train_score"], row["val_score"]) for row in rows] == [
        (pytest.approx(0.4), pytest.approx(0.4))
    ]


def test_checkpoint_every_n_batches_updates_last_ckpt_mid_epoch(tmp_path):
    class Peek(Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
            path = trainer.checkpoint_dir / "last.ckpt"
            self.steps.append(read_checkpoint(path)["global_step"] if path.exists() else None)

    peek = Peek()
    trainer = quiet_trainer(tmp_path, max_epochs=1, checkpoint_every_n_batches=2, callbacks=[peek])
    trainer.fit(make_agent(), *loaders())
    assert peek.steps == [None, None, 2, 2]
    assert read_checkpoint(trainer.last_checkpoint_path)["reason"] == "epoch"


def test_a_plain_list_of_batches_works_as_a_loader(tmp_path):
    batches = [(afnio.Variable(["q1", "q3"], role="question"), ["a1", "a3"])]
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    agent = make_agent()
    trainer.fit(agent, batches)
    assert agent.prompt.data == "v0|a1|a1"
    assert [row["train_score"] for row in read_rows(tmp_path)] == [0.5, 0.5]


# --------------------------------------------------------------------------- safe resume
class InterruptAfterWrite(TGD):
    """A TGD whose step is interrupted (Ctrl-C) right after it wrote the new prompt."""

    interrupt_at: int | None = None
    steps = 0

    def step(self, closure=None):
        result = super().step(closure)
        InterruptAfterWrite.steps += 1
        if InterruptAfterWrite.steps == InterruptAfterWrite.interrupt_at:
            raise KeyboardInterrupt  # after the write, before the Trainer counts the batch
        return result


class InterruptibleAgent(Agent):
    def configure_optimizers(self):
        return InterruptAfterWrite(self.parameters(), model_client=self.client, momentum=2)


def test_ctrl_c_between_the_optimizer_write_and_the_counter_never_applies_an_update_twice(
    tmp_path,
):
    # Issue 14, defect 8: the update of the interrupted batch was re-applied on resume.
    full_trainer, full_agent = uninterrupted(tmp_path)
    run_dir = tmp_path / "ctrl-c"
    trainer = quiet_trainer(run_dir)
    agent = InterruptibleAgent(ScriptedModel(improve))
    object.__setattr__(agent, "trainer", trainer)
    InterruptAfterWrite.steps, InterruptAfterWrite.interrupt_at = 0, 6
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(agent, *loaders())
    finally:
        InterruptAfterWrite.interrupt_at = None
    checkpoint = read_checkpoint(trainer.last_checkpoint_path)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 1, 5)
    assert agent.prompt.data != checkpoint["agent"]["prompt"].data  # the write was not saved

    resumed_trainer = quiet_trainer(run_dir)
    resumed = make_agent(resumed_trainer)
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=trainer.last_checkpoint_path)
    assert agent.seen[:5] + resumed.seen == full_agent.seen
    assert resumed.prompt.data == full_agent.prompt.data  # each update applied exactly once
    assert resumed.optimizers().state_dict() == full_agent.optimizers().state_dict()
    rows, full_rows = read_rows(run_dir), read_rows(tmp_path / "full")
    usage = {"requests", "prompt_tokens", "completion_tokens", "total_tokens"}
    assert [{k: v for k, v in r.items() if k not in usage} for r in rows] == [
        {k: v for k, v in r.items() if k not in usage} for r in full_rows
    ]
    # The interrupted batch's optimizer request was sent (and paid for), then redone.
    assert [r["requests"] for r in rows] == [full_rows[0]["requests"],
                                             full_rows[1]["requests"] + 1,
                                             full_rows[2]["requests"]]


def _damaged_checkpoints():
    def without(key):
        return lambda state: {k: v for k, v in state.items() if k != key}

    def setting(key, value):
        return lambda state: {**state, key: value}

    return [
        ("epoch 'one'", setting("epoch", "one"), "epoch must be an int >= 0"),
        ("epoch past max_epochs", setting("epoch", 7), "epoch is 7, more than 3"),
        ("negative epoch", setting("epoch", -1), "epoch must be an int >= 0"),
        ("batches_done past the loader", setting("batches_done", 9), "batches_done is 9, more"),
        ("missing train_metrics", without("train_metrics"), "train_metrics is missing"),
        ("bad train_metrics", setting("train_metrics", {"sums": {"score": "x"}, "weights": {}}),
         "train_metrics\\['sums'\\] must map"),
        ("optimizers not a list", setting("optimizers", {"0": {}}), "optimizers must be a list"),
        ("optimizer state malformed", setting("optimizers", [{"state": {}, "param_groups": 3}]),
         "its state of optimizer 0 doesn't load"),
        ("usage malformed", setting("usage", {"total": {"requests": "many"}}),
         "usage\\['total'\\] must map"),
        ("usage unknown counter", setting("usage", {"total": {"dollars": 1}}),
         "usage\\['total'\\] must map"),
        ("agent key missing", lambda state: {**state, "agent": {}},
         "(?s)its state of the agent doesn't load.*Missing key"),
        ("history malformed", setting("history", ["row"]), "history must be a list of dicts"),
    ]


@pytest.mark.parametrize(("name", "damage", "message"), _damaged_checkpoints(),
                         ids=[case[0] for case in _damaged_checkpoints()])
def test_a_bad_checkpoint_is_refused_before_the_agent_is_touched(tmp_path, name, damage, message):
    # Issue 14, defect 8: the agent was overwritten before a raw ValueError/KeyError/TypeError.
    trainer, _ = uninterrupted(tmp_path)
    state = read_checkpoint(trainer.checkpoint_dir / "epoch=0.ckpt")
    path = tmp_path / "damaged.ckpt"
    write_checkpoint(damage(state), path)
    fresh_trainer = quiet_trainer(tmp_path / "fresh")
    agent = make_agent(fresh_trainer, prompt="live prompt")
    with pytest.raises(ValueError, match=message) as raised:
        fresh_trainer.fit(agent, *loaders(), ckpt_path=path)
    assert str(path) in str(raised.value) and "nothing was changed" in str(raised.value)
    assert agent.prompt.data == "live prompt" and agent.seen == []
    assert (fresh_trainer.current_epoch, fresh_trainer.global_step) == (0, 0)


def test_a_tampered_checkpoint_can_neither_run_code_nor_redirect_a_key_nor_create_files(
    tmp_path, monkeypatch
):
    # Issue 14, "done when": through Trainer.fit(ckpt_path=...).
    import sys

    trainer, _ = uninterrupted(tmp_path)
    state = read_checkpoint(trainer.checkpoint_dir / "epoch=0.ckpt")
    (tmp_path / "planted_ckpt.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    attacker = {"class": "afnio.models.openai.AsyncOpenAI", "config": {
        "model": "gpt-4.1-nano", "base_url": "http://attacker.invalid/v1",
        "cache": {"path": str(tmp_path / "planted" / "cache.sqlite"), "mode": "read_write"}}}
    state["agent"]["client"] = attacker
    state["optimizers"][0]["param_groups"][0]["model_client"] = {"__model_client__": {
        "class": "planted_ckpt.Client", "config": {}}}
    path = tmp_path / "tampered.ckpt"
    write_checkpoint(state, path)

    resumed_trainer = quiet_trainer(tmp_path / "resumed")
    resumed = make_agent(resumed_trainer)
    live = resumed.client
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=path)
    assert resumed.client is live
    assert resumed.optimizers().param_groups[0]["model_client"] is live
    assert resumed_trainer.stop_reason == "max_epochs"
    assert "planted_ckpt" not in sys.modules and not (tmp_path / "RAN").exists()
    assert not (tmp_path / "planted").exists()
