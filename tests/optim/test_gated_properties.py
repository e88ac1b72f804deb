"""Properties of gated steps and of successive halving's schedule."""

import copy
import json

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD, GatedOptimizer
from afnio.optim.selection import halving_plan
from afnio.testing import ScriptedModel

# Each step proposes a distinct value with its own score; the gate must keep a value only when
# its score is not below the score of the value in place, and undo everything else exactly.
steps = st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=12)


@given(scores=steps, momentum=st.integers(min_value=0, max_value=3))
def test_the_kept_score_never_drops_and_every_rollback_restores_the_exact_state(scores, momentum):
    values = [f"value {n}" for n in range(len(scores))]  # distinct per step
    score_of = {"start": 10, **dict(zip(values, scores))}
    proposals = iter(values)
    model = ScriptedModel(lambda messages, **_: (
        f"<IMPROVED_VARIABLE>{next(proposals)}</IMPROVED_VARIABLE>"))
    prompt = Parameter("start", role="prompt")
    gate = GatedOptimizer(TGD([prompt], model_client=model, momentum=momentum))
    kept = [score_of["start"]]
    for number in range(len(values)):
        before_state = {key: copy.deepcopy(value) for key, value in gate.state.items()}
        before_value = prompt.data
        gate.zero_grad()
        prompt.append_grad(afnio.Variable(f"feedback {number}"))
        gate.step(lambda: score_of[prompt.data])
        record = gate.last_step[0]
        if record["verdict"] == "rolled_back":
            assert score_of[values[number]] < kept[-1]
            assert prompt.data == before_value
            after_state = {key: dict(value) for key, value in gate.state.items()}
            rejected = after_state[prompt].pop("rejected")
            assert rejected == before_state.get(prompt, {}).get("rejected", 0) + 1
            before_state.setdefault(prompt, {}).setdefault("accepted", 0)
            before_state[prompt].pop("rejected", None)
            assert after_state[prompt] == before_state[prompt]
        else:
            assert record["verdict"] == "accepted" and prompt.data == values[number]
            kept.append(score_of[prompt.data])
    assert kept == sorted(kept)
    state = gate.state[prompt]
    assert state["accepted"] + state["rejected"] == len(values)
    assert state["accepted"] == len(kept) - 1
    json.dumps(gate.state_dict())


@given(
    candidates=st.integers(min_value=2, max_value=20),
    samples=st.integers(min_value=1, max_value=40),
    extra=st.integers(min_value=0, max_value=400),
)
def test_the_halving_schedule_fits_the_budget_and_halves(candidates, samples, extra):
    budget = candidates + extra  # CandidateSearch guarantees one evaluation per candidate
    plan = halving_plan(candidates, samples, budget)
    assert plan and plan[0][0] == candidates and plan[0][1] >= 1
    spent, previous_seen = 0, 0
    for number, (survivors, seen) in enumerate(plan):
        assert previous_seen < seen <= samples
        if number:
            assert survivors == -(-plan[number - 1][0] // 2)
        spent += survivors * (seen - previous_seen)
        previous_seen = seen
    assert spent <= budget
    if budget >= candidates * samples * 2:  # plenty of budget: the survivors see every sample
        assert plan[-1][1] == samples
