"""GatedOptimizer: a step is kept only if the score does not drop; a rollback is exact."""

import copy
import json

import pytest

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD, GatedOptimizer, Optimizer
from afnio.testing import ScriptedModel


def proposing(*values):
    """An optimizer model proposing ``values`` in turn."""
    return ScriptedModel([f"<IMPROVED_VARIABLE>{v}</IMPROVED_VARIABLE>" for v in values])


class Counter:
    """A closure scoring by a table of values, counting its calls."""

    def __init__(self, params, table):
        self.params, self.table, self.calls = params, table, 0

    def __call__(self):
        self.calls += 1
        return sum(self.table.get(p.data, 0.0) for p in self.params)


def test_a_step_that_lowers_the_score_is_rolled_back_exactly_values_and_momentum():
    a = Parameter("alpha", role="first prompt")
    b = Parameter(["x", "y"], role="a batch of prompts")
    model = ScriptedModel(lambda messages, **_: (
        "<IMPROVED_VARIABLE>alpha two</IMPROVED_VARIABLE>" if "first prompt" in
        messages[-1]["content"] else '<IMPROVED_VARIABLE>["x2", "y2"]</IMPROVED_VARIABLE>'
    ))
    tgd = TGD([{"params": [a], "momentum": 2}, {"params": [b], "momentum": 1}],
              model_client=model)
    tgd.state[a]["momentum_buffer"] = [{"value": "alpha zero", "gradients": ["older"]}]
    gate = GatedOptimizer(tgd)
    state_before = {key: copy.deepcopy(value) for key, value in tgd.state.items()}
    closure = Counter([a], {"alpha": 1.0, "alpha two": 0.5})
    a.append_grad(afnio.Variable("first feedback"))
    b.append_grad(afnio.Variable(["fx", "fy"]))

    assert gate.step(closure) == 1.0

    assert (a.data, b.data) == ("alpha", ["x", "y"])  # both rolled back: judged as one step
    assert model.calls == 2 and closure.calls == 2
    assert tgd.state[a]["momentum_buffer"] == state_before[a]["momentum_buffer"]
    assert "momentum_buffer" not in tgd.state[b]
    assert {key: value for key, value in tgd.state[a].items()
            if key not in ("accepted", "rejected")} == state_before[a]
    assert (tgd.state[a]["accepted"], tgd.state[a]["rejected"]) == (0, 1)
    assert (tgd.state[b]["accepted"], tgd.state[b]["rejected"]) == (0, 1)
    records = gate.last_step
    assert [(r["index"], r["verdict"], r["before"], r["after"]) for r in records] == [
        (0, "rolled_back", "alpha", "alpha two"), (1, "rolled_back", ["x", "y"], ["x2", "y2"]),
    ]  # "after": the proposal that was undone
    assert records[0]["feedback"] == ["first feedback"]
    assert records[0]["score_before"] == 1.0 and records[0]["score_after"] == 0.5
    assert "fell from 1 to 0.5" in records[0]["reason"]
    json.dumps(records)


def test_a_step_that_keeps_or_raises_the_score_is_kept_with_its_momentum():
    p = Parameter("v0", role="prompt")
    tgd = TGD([p], model_client=proposing("v1", "v2"), momentum=3)
    gate = GatedOptimizer(tgd)
    closure = Counter([p], {"v0": 0.5, "v1": 0.5, "v2": 0.9})
    for expected in ("v1", "v2"):
        gate.zero_grad()
        p.append_grad(afnio.Variable(f"improve {expected}"))
        gate.step(closure)
        assert p.data == expected
        assert gate.last_step[0]["verdict"] == "accepted"
    assert [e["value"] for e in gate.state[p]["momentum_buffer"]] == ["v0", "v1"]
    assert (gate.state[p]["accepted"], gate.state[p]["rejected"]) == (2, 0)


def test_tolerance_lets_a_small_drop_through():
    p = Parameter("v0", role="prompt")
    closure = Counter([p], {"v0": 1.0, "v1": 0.95})
    strict = GatedOptimizer(TGD([p], model_client=proposing("v1")))
    p.append_grad(afnio.Variable("change"))
    strict.step(closure)
    assert p.data == "v0"
    lenient = GatedOptimizer(TGD([p], model_client=proposing("v1")), tolerance=0.1)
    lenient.step(closure)
    assert p.data == "v1"


def test_no_change_costs_no_second_evaluation_and_refusals_count_as_rejected():
    p = Parameter("Hi {name}", role="greeting")
    gate = GatedOptimizer(TGD([p], model_client=proposing("Hi"), max_retries=0))
    closure = Counter([p], {})
    p.append_grad(afnio.Variable("drop the placeholder"))
    with pytest.warns(UserWarning, match="placeholder"):
        gate.step(closure)
    assert closure.calls == 1
    assert gate.last_step[0]["verdict"] == "rejected"
    assert gate.state[p]["rejected"] == 1


def test_without_feedback_nothing_is_sent_and_nothing_counted():
    p = Parameter("v0", role="prompt")
    model = proposing("v1")
    gate = GatedOptimizer(TGD([p], model_client=model))
    closure = Counter([p], {})
    gate.step(closure)
    assert (model.calls, closure.calls, gate.last_step, dict(gate.state)) == (0, 1, [], {})


class Boom(Exception):
    pass


def test_a_closure_failing_after_the_step_rolls_everything_back():
    p = Parameter("v0", role="prompt")
    tgd = TGD([p], model_client=proposing("v1"), momentum=1)
    gate = GatedOptimizer(tgd)
    calls = []

    def closure():
        calls.append(p.data)
        if len(calls) == 2:
            raise Boom("evaluation failed")
        return 0.0

    p.append_grad(afnio.Variable("change"))
    with pytest.raises(Boom):
        gate.step(closure)
    assert calls == ["v0", "v1"]
    assert p.data == "v0" and dict(tgd.state) == {}


def test_an_inner_step_failing_rolls_back_and_propagates():
    class HalfDone(Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            with afnio.no_grad():
                self.param_groups[0]["params"][0].copy_("half")
            self.state[self.param_groups[0]["params"][0]]["x"] = 1
            raise Boom("crashed mid-step")

    p = Parameter("whole", role="prompt")
    inner = HalfDone([p])
    with pytest.raises(Boom):
        GatedOptimizer(inner).step(lambda: 1.0)
    assert p.data == "whole" and dict(inner.state) == {}


def test_evaluate_replaces_the_closure_and_its_score_of_unchanged_values_is_reused():
    p = Parameter("v0", role="prompt")
    held_out = Counter([p], {"v0": 0.2, "v1": 0.1, "v2": 0.3})
    gate = GatedOptimizer(TGD([p], model_client=proposing("v1", "v2")), evaluate=held_out)
    minibatch = Counter([p], {})
    p.append_grad(afnio.Variable("change"))
    gate.step(minibatch)  # v1 scores lower on the held-out data: rolled back
    assert (p.data, held_out.calls) == ("v0", 2)
    gate.step(minibatch)  # v0's held-out score is known: only v2 is evaluated
    assert (p.data, held_out.calls, minibatch.calls) == ("v2", 3, 0)
    assert gate.last_step[0]["score_before"] == 0.2


def test_the_closure_may_return_the_evaluators_pair_or_a_batch_score():
    p = Parameter("v0", role="prompt")
    gate = GatedOptimizer(TGD([p], model_client=proposing("v1")))

    def closure():
        good = 1 if p.data == "v0" else 0
        return afnio.Variable([good, good]), afnio.Variable(["why", "why"])

    p.append_grad(afnio.Variable("change"))
    assert gate.step(closure) == 1.0 and p.data == "v0"
    with pytest.raises(TypeError, match="must return a score"):
        gate.step(lambda: "high")


def test_state_dict_is_the_inner_one_and_survives_json_both_ways():
    p = Parameter("v0", role="prompt")
    gate = GatedOptimizer(TGD([p], model_client=proposing("v1"), momentum=2))
    p.append_grad(afnio.Variable("change"))
    gate.step(Counter([p], {"v1": 1.0}))
    saved = json.loads(json.dumps(gate.state_dict()))
    assert saved == json.loads(json.dumps(gate.optimizer.state_dict()))
    assert saved["state"]["0"]["accepted"] == 1

    q = Parameter("v1", role="prompt")
    restored = GatedOptimizer(TGD([q], model_client=proposing("x"), momentum=2))
    restored.load_state_dict(saved)
    assert restored.state[q] == gate.state[p]
    plain = TGD([q], model_client=proposing("x"), momentum=2)
    plain.load_state_dict(saved)  # an ungated optimizer resumes from a gated one's state
    assert plain.state[q]["momentum_buffer"] == gate.state[p]["momentum_buffer"]


def test_param_groups_and_zero_grad_are_the_inner_optimizers():
    p, q = Parameter("a", role="a"), Parameter("b", role="b")
    tgd = TGD([p], model_client=proposing("x"))
    gate = GatedOptimizer(tgd)
    assert gate.param_groups is tgd.param_groups and gate.state is tgd.state
    gate.add_param_group({"params": [q], "momentum": 1})
    assert tgd.param_groups[1]["momentum"] == 1
    q.append_grad(afnio.Variable("f"))
    gate.zero_grad()
    assert q.grad == []
    assert "GatedOptimizer(tolerance=0.0" in repr(gate)


def test_bad_arguments_are_refused_with_clear_errors():
    p = Parameter("a", role="a")
    tgd = TGD([p], model_client=proposing("x"))
    with pytest.raises(ValueError, match="GatedOptimizer.step: needs a closure"):
        GatedOptimizer(tgd).step()
    with pytest.raises(TypeError, match="already gated"):
        GatedOptimizer(GatedOptimizer(tgd))
    with pytest.raises(TypeError, match="has no step"):
        GatedOptimizer(object())
    with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
        GatedOptimizer(tgd, tolerance=-1)
    with pytest.raises(TypeError, match="evaluate must be callable"):
        GatedOptimizer(tgd, evaluate="val")
    with pytest.raises(ValueError, match="not finite"):
        GatedOptimizer(tgd).step(lambda: float("nan"))
