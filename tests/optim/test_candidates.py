"""CandidateSearch: k proposals and paraphrases at once, scored concurrently under a budget,
successive halving or UCB, a beam carried between steps, exact resume."""

import asyncio
import json
import re
import warnings

import pytest

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import CandidateSearch, FunctionScorer
from afnio.optim.selection import halving_plan
from afnio.optim.tgd import ProposalRejectedWarning
from afnio.testing import ScriptedModel


def value_of(messages):
    return re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", messages[-1]["content"], re.S).group(1)


def rewriter(messages, **_):
    """Proposal i of a value v is "v+i"; paraphrase j is "v~j"."""
    user = messages[-1]["content"]
    proposal = re.search(r"proposal (\d+) of", user)
    paraphrase = re.search(r"paraphrase (\d+) of", user)
    suffix = f"+{proposal.group(1)}" if proposal else f"~{paraphrase.group(1)}"
    return f"<IMPROVED_VARIABLE>{value_of(messages)}{suffix}</IMPROVED_VARIABLE>"


class TableScorer(FunctionScorer):
    """Scores values from a table (per sample: table[value][sample], or one number for all),
    recording every call."""

    def __init__(self, params, table, num_samples, default=0.0):
        self.calls = []
        self.table, self.default = table, default

        def score(values, indices):
            self.calls.append((tuple(values[p] for p in params), tuple(indices)))
            key = values[params[0]] if len(params) == 1 else tuple(values[p] for p in params)
            entry = self.table.get(key, self.default)
            if isinstance(entry, list):
                return sum(entry[i] for i in indices) / len(indices)
            return entry

        super().__init__(score, params, num_samples)

    @property
    def evaluations(self):
        return sum(len(indices) for _, indices in self.calls)


def test_k_proposals_and_m_paraphrases_are_requested_at_once_and_differ():
    arrived, total = [], 4
    released = asyncio.Event()

    async def reply(messages, **kwargs):
        arrived.append(messages[-1]["content"])
        if len(arrived) == total:
            released.set()
        await asyncio.wait_for(released.wait(), timeout=10)  # a guard, not the outcome
        return rewriter(messages)

    model = ScriptedModel(reply)
    p = Parameter("v", role="system prompt")
    search = CandidateSearch([p], model_client=model, num_proposals=3, num_paraphrases=1)
    p.append_grad(afnio.Variable("be better"))
    scorer = TableScorer([p], {"v+2": 1.0}, num_samples=4)
    search.step(scorer)
    assert model.calls == total and model.max_in_flight == total
    assert len(set(arrived)) == total
    assert sum("proposal 1 of 3" in text for text in arrived) == 1
    assert sum("This is paraphrase 1 of 1" in text for text in arrived) == 1
    assert p.data == "v+2"


def test_candidates_are_scored_concurrently_by_a_scorer():
    gate = asyncio.Event()
    waiting = []
    p = Parameter("v", role="system prompt")

    async def score(values, indices):
        waiting.append(values[p])
        if len(waiting) == 4:  # current + 3 proposals, first halving round
            gate.set()
        await asyncio.wait_for(gate.wait(), timeout=10)
        return {"v+3": 1.0}.get(values[p], 0.0)

    search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=3,
                             num_paraphrases=0)
    p.append_grad(afnio.Variable("be better"))
    assert search.step(FunctionScorer(score, [p], num_samples=2)) == 1.0
    assert sorted(waiting[:4]) == ["v", "v+1", "v+2", "v+3"]
    assert p.data == "v+3"


def test_halving_spends_its_plan_and_keeps_the_best_beam_with_scores():
    p = Parameter("v", role="system prompt")
    search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=4,
                             num_paraphrases=1, beam_width=2, budget=30)
    table = {"v": 0.5, "v+1": 0.1, "v+2": 0.9, "v+3": 0.7, "v+4": 0.2, "v~1": 0.6}
    scorer = TableScorer([p], table, num_samples=8)
    p.append_grad(afnio.Variable("be better"))
    assert search.step(scorer) == 0.9
    assert p.data == "v+2"
    plan = halving_plan(6, 8, 30)
    spent = sum(s * (seen - previous) for (s, seen), (_, previous)
                in zip(plan, [(0, 0)] + plan[:-1]))
    assert scorer.evaluations == spent <= 30
    beam = search.state[p]["beam"]
    assert [(entry["value"], entry["score"]) for entry in beam] == [("v+2", 0.9), ("v+3", 0.7)]
    record = search.last_step[0]
    assert (record["verdict"], record["before"], record["after"]) == ("accepted", "v", "v+2")
    assert (record["score_before"], record["score_after"], record["candidates"]) == (0.5, 0.9, 6)
    assert (search.state[p]["accepted"], search.state[p]["rejected"], search.state[p]["step"]) == (
        1, 0, 1)


def test_halving_compares_candidates_on_the_same_samples_and_ties_keep_the_current_value():
    p = Parameter("v", role="system prompt")
    search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=3,
                             num_paraphrases=0, budget=12)
    table = {"v": [1, 1, 1, 1], "v+1": [0, 0, 0, 0], "v+2": [1, 1, 1, 1], "v+3": [0, 1, 0, 1]}
    scorer = TableScorer([p], table, num_samples=4)
    p.append_grad(afnio.Variable("be better"))
    search.step(scorer)
    assert halving_plan(4, 4, 12) == [(4, 1), (2, 4)]
    rounds = [scorer.calls[:4], scorer.calls[4:]]
    assert [len(calls) for calls in rounds] == [4, 2]
    for calls in rounds:  # every survivor of a round is scored on the same new samples
        assert len({indices for _, indices in calls}) == 1
    assert {values[0] for values, _ in rounds[1]} == {"v", "v+2"}
    assert p.data == "v"  # tied with v+2 on every sample: the current value wins ties


def test_ucb_spends_the_whole_budget_and_finds_the_best():
    p = Parameter("v", role="system prompt")
    search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=3,
                             num_paraphrases=0, beam_width=2, selection="ucb", budget=20,
                             ucb_exploration=0.5)
    table = {"v": [0.5] * 16, "v+1": [0.2] * 16, "v+2": [0.9] * 16, "v+3": [0.6] * 16}
    scorer = TableScorer([p], table, num_samples=16)
    p.append_grad(afnio.Variable("be better"))
    search.step(scorer)
    assert scorer.evaluations == 20
    assert p.data == "v+2"
    pulled = [values[0] for values, _ in scorer.calls]
    assert pulled.count("v+2") > pulled.count("v+1")  # the bound favours the better arm


def test_the_beam_is_scored_again_next_step_and_no_better_candidate_keeps_the_value():
    p = Parameter("v", role="system prompt")
    search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=2,
                             num_paraphrases=0, beam_width=2)
    p.append_grad(afnio.Variable("be better"))
    search.step(TableScorer([p], {"v+1": 0.8, "v+2": 0.6}, num_samples=2))
    assert [e["value"] for e in search.state[p]["beam"]] == ["v+1", "v+2"]
    second = TableScorer([p], {"v+1": 0.5, "v+2": 0.7}, num_samples=2)
    search.zero_grad()
    p.append_grad(afnio.Variable("again"))
    search.step(second)
    seen = {values[0] for values, _ in second.calls}
    assert seen == {"v+1", "v+2", "v+1+1", "v+1+2"}
    assert p.data == "v+2"  # the beam's runner-up wins on this minibatch
    search.zero_grad()
    p.append_grad(afnio.Variable("once more"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every candidate was usable: no warning
        search.step(TableScorer([p], {}, num_samples=2))
    assert p.data == "v+2"
    assert search.last_step[0]["verdict"] == "rejected"
    assert "no candidate scored higher" in search.last_step[0]["reason"]


def test_unusable_proposals_are_not_candidates_and_all_failing_warns():
    p = Parameter("Hi {name}", role="greeting")
    model = ScriptedModel(["<IMPROVED_VARIABLE>Hi</IMPROVED_VARIABLE>"])
    search = CandidateSearch([p], model_client=model, num_proposals=2, num_paraphrases=1,
                             max_retries=0)
    scorer = TableScorer([p], {}, num_samples=3)
    p.append_grad(afnio.Variable("shorter"))
    with pytest.warns(ProposalRejectedWarning, match="placeholder"):
        assert search.step(scorer) is None
    assert scorer.calls == [] and p.data == "Hi {name}"
    assert search.last_step[0]["verdict"] == "rejected"


def test_without_feedback_nothing_is_sent_or_scored():
    p = Parameter("v", role="prompt")
    model = ScriptedModel(rewriter)
    scorer = TableScorer([p], {}, num_samples=2)
    assert CandidateSearch([p], model_client=model).step(scorer) is None
    assert (model.calls, scorer.calls) == (0, [])


def test_several_parameters_form_joint_candidates():
    a, b = Parameter("a", role="first"), Parameter("b", role="second")
    search = CandidateSearch([a, b], model_client=ScriptedModel(rewriter), num_proposals=2,
                             num_paraphrases=0)
    scorer = TableScorer([a, b], {("a+2", "b+2"): 1.0, ("a+1", "b+1"): 0.5}, num_samples=2)
    a.append_grad(afnio.Variable("fa"))
    b.append_grad(afnio.Variable("fb"))
    search.step(scorer)
    assert (a.data, b.data) == ("a+2", "b+2")
    assert {values for values, _ in scorer.calls} == {("a", "b"), ("a+1", "b+1"), ("a+2", "b+2")}
    assert [r["index"] for r in search.last_step] == [0, 1]


def run_steps(search, p, steps, seed_tables):
    for number in range(steps):
        search.zero_grad()
        p.append_grad(afnio.Variable(f"feedback {number}"))
        scorer = TableScorer([p], seed_tables[number], num_samples=6)
        search.step(scorer)
    return scorer


def test_state_dict_survives_json_and_resume_is_exact():
    tables = [
        {"v+1": [1, 0, 1, 0, 1, 0], "v+2": [0, 1, 0, 1, 1, 1]},
        {"v+2+1": [1] * 6, "v+1": [1, 1, 1, 0, 0, 0]},
        {"v+2+1+2": [1] * 6},
    ]

    def fresh():
        p = Parameter("v", role="system prompt")
        return p, CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=2,
                                  num_paraphrases=1, momentum=2, seed=5)

    p, straight = fresh()
    last = run_steps(straight, p, 3, tables)

    q, first = fresh()
    run_steps(first, q, 2, tables)
    saved = json.loads(json.dumps(first.state_dict()))
    r, resumed = fresh()
    with afnio.no_grad():
        r.copy_(q.data)
    resumed.load_state_dict(saved)
    resumed.zero_grad()
    r.append_grad(afnio.Variable("feedback 2"))
    resumed_last = TableScorer([r], tables[2], num_samples=6)
    resumed.step(resumed_last)

    assert r.data == p.data == "v+2+1+2"
    assert resumed.state[r] == straight.state[p]
    assert resumed_last.calls == last.calls  # same candidates, same sample order
    assert len(straight.state[p]["momentum_buffer"]) == 2


def test_the_seed_decides_the_sample_order():
    def orders(seed):
        p = Parameter("v", role="system prompt")
        search = CandidateSearch([p], model_client=ScriptedModel(rewriter), num_proposals=1,
                                 num_paraphrases=0, seed=seed, budget=8)
        p.append_grad(afnio.Variable("f"))
        scorer = TableScorer([p], {}, num_samples=8)
        search.step(scorer)
        return [indices for _, indices in scorer.calls]

    assert orders(1) == orders(1)
    assert orders(1) != orders(2)


def test_bad_options_and_closures_are_refused():
    p = Parameter("v", role="prompt")
    model = ScriptedModel(rewriter)
    with pytest.raises(ValueError, match="budget must be None or an int >= 7"):
        CandidateSearch([p], model_client=model, num_proposals=4, num_paraphrases=1,
                        beam_width=2, budget=6)
    with pytest.raises(TypeError, match="did you mean 'beam_width'"):
        CandidateSearch([p], model_client=model, beam_widht=3)
    with pytest.raises(ValueError, match="selection must be one of"):
        CandidateSearch([p], model_client=model, selection="greedy")
    with pytest.raises(ValueError, match="num_proposals must be an int >= 1"):
        CandidateSearch([p], model_client=model, num_proposals=0)
    search = CandidateSearch([p], model_client=model)
    p.append_grad(afnio.Variable("f"))
    with pytest.raises(TypeError, match="needs a Scorer"):
        search.step(lambda: 1.0)
    assert model.calls == 0
