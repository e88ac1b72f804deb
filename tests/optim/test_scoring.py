"""Scores and scorers: the closure contract, batch slicing, ModuleScorer and FunctionScorer."""

import asyncio

import pytest

import afnio
from afnio import cognitive
from afnio._runtime import run
from afnio.cognitive import Parameter
from afnio.models.cache import ResponseCache
from afnio.optim import FunctionScorer, ModuleScorer, read_score
from afnio.optim.scoring import count_samples, take_samples
from afnio.testing import ScriptedModel


def test_read_score_accepts_numbers_variables_pairs_and_loss_dicts():
    assert read_score(3) == 3.0
    assert read_score(afnio.Variable(2.5)) == 2.5
    assert read_score(afnio.Variable([1, 0, 0, 1])) == 0.5
    pair = (afnio.Variable(4), afnio.Variable(["a", "b"]))
    assert read_score(pair) == 4.0
    assert read_score({"loss": pair, "length": 3.0}) == 4.0
    assert read_score([0.5, 1]) == 0.75  # a plain list of numbers is a batch of scores
    with pytest.raises(TypeError, match="without a 'loss' entry"):
        read_score({"score": 1})
    with pytest.raises(TypeError, match="must return a score"):
        read_score(None)
    with pytest.raises(ValueError, match="not finite"):
        read_score(float("inf"))


def test_take_samples_indexes_every_per_sample_part_and_keeps_shared_ones():
    questions = afnio.Variable(["q0", "q1", "q2"], role="questions")
    shared = afnio.Variable("context", role="shared context")
    labels = afnio.Variable(["yes", "no"], role="the label set, shared")
    batch = (questions, {"answers": ["a0", "a1", "a2"], "context": shared, "pair": [1, 2],
                         "labels": labels})
    assert count_samples(batch) == 3
    part = take_samples(batch, [2, 0])
    assert part[0].data == ["q2", "q0"] and part[0].role == "questions"
    assert part[1]["answers"] == ["a2", "a0"]
    assert part[1]["context"] is shared and part[1]["pair"] == [1, 2]
    assert part[1]["labels"] is labels
    assert questions.data == ["q0", "q1", "q2"]
    assert count_samples("just one") == 1


class Echo(cognitive.Module):
    """prefix + question; the score counts answers that start with "A:"."""

    def __init__(self, model):
        super().__init__()
        self.prefix = Parameter("Q:", role="answer prefix")
        self.chat = cognitive.ChatCompletion(model)
        self.steps = []

    def training_step(self, batch, batch_idx):
        self.steps.append((batch_idx, afnio.is_grad_enabled(), self.prefix.data))
        questions, _ = batch
        messages = [{"role": "user", "content": [self.prefix,
                                                 afnio.Variable("{q}", role="template")]}]
        answers = self.chat(messages, inputs={"q": questions})
        hits = [int(a.startswith("A:")) for a in answers.data]
        return afnio.Variable(sum(hits)), afnio.Variable(["x"] * len(hits))


def batch_of(n):
    return afnio.Variable([f"q{i}" for i in range(n)], role="questions"), [""] * n


def test_module_scorer_returns_the_known_baseline_until_a_parameter_changes():
    model = ScriptedModel()  # echoes the prompt
    agent = Echo(model)
    scorer = ModuleScorer(agent, batch_of(4), batch_idx=7, baseline=0.25)
    assert scorer() == 0.25 and model.calls == 0
    with afnio.no_grad():
        agent.prefix.copy_("A:")
    assert scorer() == 1.0  # a sum of 4 hits over 4 samples
    assert model.calls == 4 and agent.steps == [(7, False, "A:")]
    assert ModuleScorer(agent, batch_of(4), score_reduction="mean")() == 4.0


def test_module_scorer_scores_other_values_on_a_copy_concurrently_with_shared_clients():
    released = asyncio.Event()
    arrived = []

    async def reply(messages, **_):
        arrived.append(messages[-1]["content"])
        if len(arrived) == 4:
            released.set()
        await asyncio.wait_for(released.wait(), timeout=10)  # a guard, not the outcome
        return messages[-1]["content"]

    model = ScriptedModel(reply)
    agent = Echo(model)
    scorer = ModuleScorer(agent, batch_of(3))

    async def both():
        return await asyncio.gather(
            scorer.ascore({agent.prefix: "A:"}, [0, 2]), scorer.ascore({}, [1, 2])
        )

    assert run(both()) == [1.0, 0.0]
    assert sorted(arrived) == ["A:\nq0", "A:\nq2", "Q:\nq1", "Q:\nq2"]
    assert model.max_in_flight == 4 and model.calls == 4  # one client, shared by the copies
    assert agent.prefix.data == "Q:" and agent.steps == []  # the live agent was not used


def test_scorer_requests_hit_the_response_cache(tmp_path):
    model = ScriptedModel(cache=ResponseCache(tmp_path / "cache.sqlite"))
    agent = Echo(model)
    scorer = ModuleScorer(agent, batch_of(2))
    assert run(scorer.ascore({agent.prefix: "A:"}, [0, 1])) == 1.0
    assert model.calls == 2
    with afnio.no_grad():
        agent.prefix.copy_("A:")
    assert scorer() == 1.0
    assert model.calls == 2 and model.get_usage()["cached_tokens"] > 0


def test_scorers_refuse_unknown_parameters_and_bad_indices():
    agent = Echo(ScriptedModel())
    scorer = ModuleScorer(agent, batch_of(2))
    stranger = Parameter("x", role="a parameter of another program")
    with pytest.raises(ValueError, match="not part of the Echo being scored"):
        run(scorer.ascore({stranger: "y"}, [0]))
    with pytest.raises(ValueError, match=r"ints in \[0, 2\)"):
        run(scorer.ascore({}, [2]))
    with pytest.raises(ValueError, match="at least one sample"):
        run(scorer.ascore({}, []))
    with pytest.raises(TypeError, match="has no method 'score_step'"):
        ModuleScorer(agent, batch_of(2), step="score_step")
    with pytest.raises(ValueError, match="score_reduction must be one of"):
        ModuleScorer(agent, batch_of(2), score_reduction="max")
    function = FunctionScorer(lambda values, indices: 1.0, [agent.prefix], num_samples=2)
    with pytest.raises(ValueError, match="not one of the params"):
        run(function.ascore({stranger: "y"}, [0]))
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        FunctionScorer(lambda values, indices: 1.0, [], num_samples=0)


def test_function_scorer_accepts_async_functions_and_passes_every_value():
    a, b = Parameter("a", role="a"), Parameter("b", role="b")
    received = []

    async def score(values, indices):
        received.append(({p.role: v for p, v in values.items()}, indices))
        return len(indices) / 10

    scorer = FunctionScorer(score, [a, b], num_samples=3)
    assert scorer() == 0.3
    assert run(scorer.ascore({b: "B"}, [1])) == 0.1
    assert received == [({"a": "a", "b": "b"}, [0, 1, 2]), ({"a": "a", "b": "B"}, [1])]


SEEN_BY_COPIES = []


class Holder(Echo):
    """Keeps its optimizer and a scorer of itself, as an agent wiring demonstrations does."""

    def training_step(self, batch, batch_idx):
        SEEN_BY_COPIES.append((self.optimizer, self.scorer))
        return super().training_step(batch, batch_idx)


def test_the_copies_share_the_agents_optimizers_and_scorer_instead_of_copying_them():
    from afnio.optim import DemoOptimizer, demos_parameter

    agent = Holder(ScriptedModel())
    agent.demos = demos_parameter()
    optimizer = DemoOptimizer([agent.demos], evaluate=lambda: 0.0)
    object.__setattr__(agent, "_optimizers", [optimizer])
    object.__setattr__(agent, "optimizer", optimizer)
    scorer = ModuleScorer(agent, batch_of(2))
    object.__setattr__(agent, "scorer", scorer)
    SEEN_BY_COPIES.clear()
    run(scorer.ascore({agent.prefix: "A:"}, [0]))
    assert SEEN_BY_COPIES == [(optimizer, scorer)]
    assert SEEN_BY_COPIES[0][0] is optimizer and SEEN_BY_COPIES[0][1] is scorer
