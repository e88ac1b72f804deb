"""OPRO (scored history): the request shows past values with their scores, best last; a
proposal that scores lower is rolled back but remembered."""

import json
import re

import pytest

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import OPRO
from afnio.optim.tgd import ProposalRejectedWarning
from afnio.testing import ScriptedModel

SCORES = {"v0": 0.2, "v1": 0.5, "v2": 0.1, "v3": 0.9, "v4": 0.4}


def proposer(*values):
    """Proposes ``values`` in turn; keeps the requests."""
    return ScriptedModel([f"<IMPROVED_VARIABLE>{v}</IMPROVED_VARIABLE>" for v in values])


def shown_history(request):
    """``[(score, value)]`` as shown in a request's history block, in order."""
    block = re.search(r"<SCORED_HISTORY>(.*)</SCORED_HISTORY>", request[-1]["content"], re.S)
    return [(float(score), value) for score, value in re.findall(
        r"<SCORE>(.*?)</SCORE>\n<PAST_VALUE>\n(.*?)\n</PAST_VALUE>", block.group(1), re.S)]


def closure_for(*params):
    calls = []

    def closure():
        calls.append(tuple(p.data for p in params))
        return sum(SCORES.get(p.data, 0.0) for p in params)

    closure.calls = calls
    return closure


def test_history_is_shown_worst_first_and_lower_scoring_proposals_roll_back():
    p = Parameter("v0", role="system prompt")
    model = proposer("v1", "v2", "v3")
    opro = OPRO([p], model_client=model, use_feedback=False, history_size=2)
    closure = closure_for(p)
    assert opro.step(closure) == 0.5 and p.data == "v1"
    assert opro.step(closure) == 0.5 and p.data == "v1"  # v2 scores 0.1: rolled back
    assert opro.last_step[0]["verdict"] == "rolled_back"
    assert "fell from 0.5 to 0.1" in opro.last_step[0]["reason"]
    assert (opro.last_step[0]["before"], opro.last_step[0]["after"]) == ("v1", "v2")
    assert opro.step(closure) == 0.9 and p.data == "v3"
    requests = [messages for messages, _ in model.requests]
    assert shown_history(requests[0]) == [(0.2, "v0")]
    assert shown_history(requests[1]) == [(0.2, "v0"), (0.5, "v1")]
    # v1 was scored three times (0.5 each), v2 once at 0.1: the two best, best last
    assert shown_history(requests[2]) == [(0.2, "v0"), (0.5, "v1")]
    history = opro.state[p]["history"]
    assert [(e["value"], e["score"], e["evaluations"]) for e in history] == [
        ("v0", 0.2, 1), ("v1", 0.5, 3), ("v2", 0.1, 1), ("v3", 0.9, 1)
    ]
    assert (opro.state[p]["accepted"], opro.state[p]["rejected"]) == (2, 1)
    assert len(closure.calls) == 6  # one before and one after each step
    json.dumps(opro.last_step)


def test_with_feedback_only_parameters_with_gradients_propose_and_see_them():
    a, b = Parameter("v0", role="first"), Parameter("v4", role="second")
    model = proposer("v3")
    opro = OPRO([a, b], model_client=model)
    closure = closure_for(a, b)
    assert opro.step(closure) is None and closure.calls == [] and model.calls == 0
    b.append_grad(afnio.Variable("name the deadline"))
    opro.step(closure)
    assert model.calls == 1 and (a.data, b.data) == ("v0", "v3")
    request = model.requests[0][0][-1]["content"]
    assert "The variable is the second." in request
    assert "<FEEDBACK>\n1. name the deadline\n</FEEDBACK>" in request
    assert [r["index"] for r in opro.last_step] == [1]
    assert opro.last_step[0]["feedback"] == ["name the deadline"]


def test_the_history_is_fitted_to_the_window_lowest_scores_left_out_first():
    p = Parameter("v0", role="system prompt")
    long_values = {f"value {i} " + "word " * 40: i / 10 for i in range(6)}
    opro = OPRO([p], model_client=proposer("v1"), use_feedback=False, history_size=6)
    opro.state[p]["history"] = [
        {"value": value, "score": score, "evaluations": 1} for value, score in long_values.items()
    ]
    full = opro.param_groups[0]["model_client"]
    opro.step(lambda: 0.0)
    shown_all = shown_history(full.requests[0][0])
    assert len(shown_all) == 6
    tokens = full.count_message_tokens(full.requests[0][0])

    q = Parameter("v0", role="system prompt")
    small = ScriptedModel(["<IMPROVED_VARIABLE>v1</IMPROVED_VARIABLE>"],
                          context_window=tokens - 100 + 64, max_tokens=64)
    tight = OPRO([q], model_client=small, use_feedback=False, history_size=6)
    tight.state[q]["history"] = [dict(entry) for entry in opro.state[p]["history"][:6]]
    tight.step(lambda: 0.0)
    shown = shown_history(small.requests[0][0])
    assert 0 < len(shown) < 6
    assert shown == shown_all[-len(shown):]  # the best ones stay


def test_state_dict_survives_json_and_resume_is_exact():
    def run(steps, resume_after=None):
        p = Parameter("v0", role="system prompt")
        model = proposer("v1", "v2", "v3", "v4")
        opro = OPRO([p], model_client=model, use_feedback=False)
        for number in range(steps):
            if number == resume_after:
                saved = json.loads(json.dumps(opro.state_dict()))
                value = p.data
                p = Parameter(value, role="system prompt")
                opro = OPRO([p], model_client=model, use_feedback=False)
                opro.load_state_dict(saved)
            opro.step(closure_for(p))
        return p.data, opro.state[p], [m for m, _ in model.requests]

    assert run(4) == run(4, resume_after=2)


def test_an_unusable_reply_keeps_the_value_with_a_warning():
    p = Parameter("Hi {name}", role="greeting")
    opro = OPRO([p], model_client=proposer("Hi"), use_feedback=False, max_retries=0)
    closure = closure_for(p)
    with pytest.warns(ProposalRejectedWarning, match="placeholder"):
        opro.step(closure)
    assert p.data == "Hi {name}" and len(closure.calls) == 1
    assert opro.last_step[0]["verdict"] == "rejected"


def test_evaluate_replaces_the_closure_and_a_failing_closure_rolls_back():
    p = Parameter("v0", role="system prompt")
    held_out = closure_for(p)
    opro = OPRO([p], model_client=proposer("v1"), use_feedback=False, evaluate=held_out)
    opro.step(lambda: pytest.fail("the step's closure must not be used"))
    assert p.data == "v1" and len(held_out.calls) == 2

    q = Parameter("v0", role="system prompt")
    calls = []

    def failing():
        calls.append(q.data)
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        OPRO([q], model_client=proposer("v1"), use_feedback=False).step(failing)
    assert calls == ["v0", "v1"] and q.data == "v0"


def test_bad_options_are_refused():
    p = Parameter("v0", role="prompt")
    model = proposer("v1")
    with pytest.raises(ValueError, match="OPRO.step: needs a closure"):
        OPRO([p], model_client=model).step()
    with pytest.raises(ValueError, match="max_history .* must be >= history_size"):
        OPRO([p], model_client=model, history_size=10, max_history=5)
    with pytest.raises(TypeError, match="did you mean 'history_size'"):
        OPRO([p], model_client=model, history_sise=3)
    with pytest.raises(ValueError, match=r"placeholders \['audience'\] that OPRO does not fill"):
        OPRO([p], model_client=model, messages=[{"role": "user", "content": "{audience}"}])
    with pytest.raises(ValueError, match="API keys"):
        OPRO([p], model_client=model, api_key="sk-secret")


def test_a_value_scored_again_keeps_the_mean_of_its_scores():
    p = Parameter("v0", role="system prompt")
    scores = iter([0.2, 0.6, 0.4, 0.3])  # v0, v1 after step 1; v1 again, v2 after step 2
    opro = OPRO([p], model_client=proposer("v1", "v2"), use_feedback=False)
    opro.step(lambda: next(scores))
    opro.step(lambda: next(scores))
    history = {e["value"]: (e["score"], e["evaluations"]) for e in opro.state[p]["history"]}
    assert history == {"v0": (0.2, 1), "v1": (pytest.approx(0.5), 2), "v2": (0.3, 1)}
    assert p.data == "v1"  # 0.3 < 0.4: rolled back
