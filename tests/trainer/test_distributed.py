"""evaluate() and Trainer.validate/test sharded over Ray workers give exactly what one process
gives: the same batches in the same order, metrics, usage and cost; heavy scoring runs as Ray
tasks; parameters travel as data."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import afnio
from afnio import cognitive
from afnio.autodiff.evaluator import DeterministicEvaluator
from afnio.cognitive import Parameter
from afnio.models import track_usage
from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer, ScriptedModel
from afnio.trainer import RayEvaluation, Trainer, evaluate
from afnio.utils.data import DataLoader
from afnio.utils.ray import RayDeterministicEvaluator

ROOT = Path(__file__).resolve().parents[2]
DRIVER_PID = os.getpid()
WORDS = [f"word{i}" for i in range(11)]  # 11 samples: batches of 3, the last one short
TARGETS = [w.upper() if i % 3 else w for i, w in enumerate(WORDS)]
# In a Ray worker, the first sample waits until the last one was answered: the shard holding
# the last batches finishes first, so results arrive out of order and must be put back.
GATE = Path(tempfile.gettempdir()) / f"afnio-test-shard-gate-{DRIVER_PID}"


def wait_for_gate() -> None:
    deadline = time.monotonic() + 60  # a guard against a hang, never part of a result
    while not GATE.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the last shard never answered its last sample")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ray(ray_cluster):
    """The session's cluster; this module's agents and functions travel to it by value."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster
    ray_cluster.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    GATE.unlink(missing_ok=True)


def shout(messages, **_):
    """The scripted model: upper-cases the user text when the system prompt says to, and
    never answers 'boom'."""
    text = messages[-1]["content"]
    if text == "boom":
        raise ValueError("the model refuses 'boom'")
    if os.getpid() != DRIVER_PID and text == WORDS[0]:
        wait_for_gate()
    if os.getpid() != DRIVER_PID and text == WORDS[-1]:
        GATE.touch()
    return text.upper() if "shout" in messages[0]["content"] else text


class Shouter(cognitive.Module):
    """An agent with a prompt, one chat request per sample, exact match and an extra metric."""

    def __init__(self, client=None) -> None:
        super().__init__()
        self.prompt = Parameter("whisper", role="system prompt")
        self.model = client if client is not None else ScriptedModel(shout)
        self.chat = cognitive.ChatCompletion(self.model)
        self.judge = cognitive.ExactMatchEvaluator()

    def validation_step(self, batch, batch_idx):
        words, targets = batch
        replies = self.chat([{"role": "system", "content": [self.prompt]},
                             {"role": "user", "content": ["{w}"]}], inputs={"w": words})
        lengths = afnio.Variable([len(r) for r in replies.data], role="reply lengths")
        return {"loss": self.judge(replies, targets), "length": lengths}

    test_step = validation_step


def sdk_shouter(base_url: str) -> Shouter:
    """The same agent on the real OpenAI SDK, talking to a FakeProviderServer."""
    return Shouter(AsyncOpenAI("gpt-4.1-nano", base_url=base_url, context_window=100_000))


def samples(words=WORDS, targets=TARGETS):
    return [(afnio.Variable(w, role="word"), t) for w, t in zip(words, targets)]


def trained() -> Shouter:
    agent = Shouter()
    agent.prompt.data = "shout"  # not the factory's value: the state must travel
    return agent


def rounded(usage):
    return {**usage, "cost_usd": round(usage["cost_usd"], 10)}


def same(local, remote):
    """Compare two evaluation results batch by batch (costs as the Trainer rounds them)."""
    assert [b.batch_idx for b in remote.batches] == [b.batch_idx for b in local.batches]
    for mine, theirs in zip(local.batches, remote.batches):
        assert (theirs.size, theirs.values, theirs.score, theirs.explanation, theirs.error) == (
            mine.size, mine.values, mine.score, mine.explanation, mine.error)
        assert rounded(theirs.usage) == rounded(mine.usage)
        assert {k: rounded(v) for k, v in theirs.usage_by_model.items()} == {
            k: rounded(v) for k, v in mine.usage_by_model.items()}
    assert remote.metrics == local.metrics
    assert rounded(remote.usage.as_dict()) == rounded(local.usage.as_dict())


# --------------------------------------------------------------------------- evaluate
def test_sharded_evaluation_equals_one_process(ray) -> None:
    GATE.unlink(missing_ok=True)
    agent = trained()
    loader = DataLoader(samples(), batch_size=3)
    with track_usage() as here:
        local = evaluate(agent, loader)
    calls = agent.model.calls
    with track_usage() as there:
        remote = evaluate(agent, loader, distributed=RayEvaluation(Shouter, num_workers=2))
    assert agent.model.calls == calls == 11  # the workers used their own clients
    assert GATE.exists()  # the last shard finished first
    GATE.unlink()
    same(local, remote)
    assert local.metrics == {"score": pytest.approx(7 / 11), "length": pytest.approx(56 / 11)}
    assert [b.score for b in remote.batches] == [2, 2, 2, 1]
    assert remote.batches[0].explanation[0].startswith('Compared with the target "word0"')
    assert here.as_dict() == there.as_dict() and there.requests == 11
    assert remote.usage_by_model == local.usage_by_model
    assert list(remote.usage_by_model) == ["scripted/scripted"]


def test_sharded_evaluation_costs_the_same_through_the_sdk(ray) -> None:
    with FakeProviderServer(reply=lambda body: body["messages"][-1]["content"].upper()) as server:
        agent = sdk_shouter(server.openai_base_url)
        agent.prompt.data = "anything"
        loader = DataLoader(samples(), batch_size=4)
        local = evaluate(agent, loader)
        factory = functools.partial(sdk_shouter, server.openai_base_url)
        remote = evaluate(agent, loader, distributed=RayEvaluation(factory))
        assert len(server.requests) == 22
    same(local, remote)
    assert remote.usage.cost_usd > 0 and remote.usage.requests == 11
    assert agent.model.get_usage()["requests"] == 11  # the driver's client: its own run only


def test_failing_steps_are_skipped_or_raised_like_in_one_process(ray) -> None:
    words = ["a", "b", "boom", "c", "d", "e"]
    loader = DataLoader(samples(words, [w.upper() for w in words]), batch_size=2)
    sharded = RayEvaluation(Shouter, num_workers=3)
    agent = trained()
    local = evaluate(agent, loader, on_error="skip")
    remote = evaluate(agent, loader, on_error="skip", distributed=sharded)
    same(local, remote)
    assert [b.error for b in remote.errors] == ["ValueError: the model refuses 'boom'"]
    assert remote.metrics["score"] == 1.0  # the failed batch is left out
    with pytest.raises(ValueError, match="refuses 'boom'") as raised:
        evaluate(agent, loader, distributed=sharded)
    assert "validation_step failed at batch 1" in str(raised.value.__notes__)


# --------------------------------------------------------------------------- Trainer
def test_trainer_validate_and_test_shard_with_the_same_rows(ray, tmp_path) -> None:
    agent = trained()
    loader = DataLoader(samples(), batch_size=3)
    rows = {}
    for name, distributed in (("local", None), ("ray", RayEvaluation(Shouter))):
        trainer = Trainer(default_root_dir=tmp_path / name, enable_progress_bar=False,
                          enable_report=False, enable_checkpointing=False, logger=False)
        validated = trainer.validate(agent, loader, distributed=distributed)
        tested = trainer.test(agent, loader, distributed=distributed)
        rows[name] = (validated, tested, trainer.metrics_log.rows)
    assert rows["ray"] == rows["local"]
    assert rows["ray"][0] == {"val_score": pytest.approx(7 / 11),
                              "val_length": pytest.approx(56 / 11)}
    assert [row["requests"] for row in rows["ray"][2]] == [11, 11]


def test_trainer_skips_a_failed_remote_step_with_its_batch_index(ray, tmp_path) -> None:
    words = ["a", "boom", "c", "d"]
    loader = DataLoader(samples(words, [w.upper() for w in words]), batch_size=1)
    trainer = Trainer(default_root_dir=tmp_path, enable_progress_bar=False, enable_report=False,
                      enable_checkpointing=False, logger=False, on_error="skip")
    metrics = trainer.validate(trained(), loader, distributed=RayEvaluation(Shouter))
    assert metrics["val_score"] == 1.0
    assert [(e["stage"], e["batch_idx"]) for e in trainer.errors] == [("val", 1)]


# --------------------------------------------------------------------------- Ray tasks
def digit_sum(prediction: str, limit: int) -> int:
    """A 'heavy' scoring function; it refuses to run in the test's own process."""
    if os.getpid() == DRIVER_PID:
        raise RuntimeError("scored in the driver, not in a Ray task")
    return int(sum(int(ch) for ch in prediction if ch.isdigit()) <= limit)


def test_ray_scoring_equals_the_local_evaluator(ray) -> None:
    predictions = ["123", "99", "123", "5", "0"]  # a repeated pair is scored once
    remote_prediction = afnio.Variable(predictions, role="codes", requires_grad=True)
    local_prediction = afnio.Variable(predictions, role="codes", requires_grad=True)
    evaluator = RayDeterministicEvaluator(digit_sum, "digit sum within the limit",
                                          success_fn=lambda s: s == 1, num_cpus=0.5)
    score, explanation = evaluator(remote_prediction, 6)

    def local_digit_sum(prediction, limit):
        return int(sum(int(ch) for ch in prediction if ch.isdigit()) <= limit)

    expected_score, expected_explanation = DeterministicEvaluator.apply(
        local_prediction, 6, local_digit_sum, "digit sum within the limit", lambda s: s == 1)
    assert (score.data, explanation.data) == (expected_score.data, expected_explanation.data)
    assert score.data == 4
    explanation.backward()
    expected_explanation.backward()
    assert [g.data for g in remote_prediction.grad] == [g.data for g in local_prediction.grad]
    with pytest.raises(RuntimeError, match="scored in the driver"):
        digit_sum("1", 1)  # the guard is real: the scores above came from Ray tasks


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"agent_factory": "Shouter"}, TypeError, "agent_factory must be callable"),
        ({"agent_factory": Shouter, "num_workers": 0}, ValueError, "num_workers"),
        ({"agent_factory": Shouter, "num_cpus_per_worker": 0}, ValueError, "num_cpus_per_worker"),
        ({"agent_factory": Shouter, "setup": 3}, TypeError, "setup must be callable"),
    ],
)
def test_ray_evaluation_arguments_are_checked(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        RayEvaluation(**kwargs)


def test_evaluate_and_trainer_refuse_a_wrong_distributed_argument(tmp_path) -> None:
    with pytest.raises(TypeError, match="distributed must be a RayEvaluation"):
        evaluate(Shouter(), [], distributed="ray")
    with pytest.raises(ValueError, match="on_error"):
        evaluate(Shouter(), [], on_error="ignore")
    trainer = Trainer(default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
    with pytest.raises(TypeError, match="Trainer.validate: distributed must be a RayEvaluation"):
        trainer.validate(Shouter(), [], distributed=Shouter)


def test_afnio_imports_without_ray() -> None:
    code = ("import sys, afnio, afnio.trainer, afnio.trainer.tune, afnio.utils.ray, "
            "afnio.models.pool; assert 'ray' not in sys.modules, 'ray was imported'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
