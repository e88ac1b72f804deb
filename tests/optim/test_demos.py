"""DemoOptimizer: demonstrations bootstrapped from passing training samples, chosen by
validation score with a seeded random search; no optimizer model, no textual gradients.

The task: each word belongs to one of five categories, and each category has a secret code.
The scripted forward model answers a word with its category's code only when the prompt shows
a demonstration of a word of the same category with the right code; otherwise it answers
"unknown". "Easy" training inputs carry the code as a hint, so the program gets them right from
the start: they are what the demonstrations are bootstrapped from. Validation holds hard inputs
only, so its score is the share of categories the chosen demonstrations cover.
"""

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio import cognitive
from afnio.cognitive.parameter import ParameterType
from afnio.optim import (
    DemoOptimizer,
    FunctionScorer,
    ModuleScorer,
    demos_parameter,
    render_demos,
)
from afnio.optim.selection import racing_plan
from afnio.testing import ScriptedModel
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader

CATEGORIES = {
    "fruit": ("K7", ["apple", "banana", "cherry", "grape", "mango", "pear"]),
    "tool": ("Q2", ["hammer", "wrench", "saw", "drill", "chisel", "pliers"]),
    "animal": ("M5", ["otter", "heron", "lynx", "badger", "gecko", "moose"]),
    "color": ("Z9", ["teal", "amber", "crimson", "ochre", "violet", "beige"]),
    "city": ("R4", ["lyon", "porto", "oslo", "quito", "perth", "cusco"]),
}
CATEGORY_OF = {word: name for name, (_, words) in CATEGORIES.items() for word in words}
CODE_OF = {word: CATEGORIES[name][0] for word, name in CATEGORY_OF.items()}
TRAIN = [
    (f"{words[0]} (hint: {code})", code) for code, words in CATEGORIES.values()
] + [
    (f"{words[1]} (hint: {code})", code) for code, words in CATEGORIES.values()
] + [(word, CODE_OF[word]) for _, words in CATEGORIES.values() for word in words[2:4]]
VALIDATION = [(word, CODE_OF[word]) for _, words in CATEGORIES.values() for word in words[4:]]
DEMO = re.compile(r"Word: (\w+).*?\nCode: (\w+)")


def word_of(text):
    return text.split()[0]


def forward_reply(messages, **_):
    system, query = messages[0]["content"], messages[-1]["content"]
    hint = re.search(r"\(hint: (\w+)\)", query)
    if hint:
        return hint.group(1)
    category = CATEGORY_OF[word_of(query)]
    for word, code in DEMO.findall(system):
        if CATEGORY_OF.get(word) == category and CODE_OF[word] == code:
            return code
    return "unknown"


class Coder(cognitive.Module):
    def __init__(self, model):
        super().__init__()
        self.instruction = afnio.Variable("Answer with the word's code.\n\n", role="instruction")
        self.demos = demos_parameter("examples of words and their codes")
        self.answer = cognitive.ChatCompletion(model)
        self.evaluator = cognitive.DeterministicEvaluator(
            eval_fn=lambda prediction, target: int(prediction == target),
            eval_fn_purpose="exact match with the code",
        )
        self.demo_optimizer = None

    def forward(self, words):
        messages = [
            {"role": "system", "content": [self.instruction, self.demos]},
            {"role": "user", "content": [afnio.Variable("{word}", role="query template")]},
        ]
        return self.answer(messages, inputs={"word": words})

    def training_step(self, batch, batch_idx):
        words, codes = batch
        predictions = self(words)
        self.demo_optimizer.record(
            words, predictions, passed=[p == c for p, c in zip(predictions.data, codes)]
        )
        return self.evaluator(predictions, codes)

    validation_step = training_step

    def configure_optimizers(self):
        return self.demo_optimizer


def as_data(samples):
    return [(afnio.Variable(word, role="word"), code) for word, code in samples]


def validation_batch():
    return (afnio.Variable([w for w, _ in VALIDATION], role="word"), [c for _, c in VALIDATION])


def test_the_demonstration_optimizer_reaches_90_percent_within_3_epochs(tmp_path):
    model = ScriptedModel(forward_reply, model="forward")
    agent = Coder(model)
    agent.demo_optimizer = DemoOptimizer(
        [agent.demos],
        evaluate=ModuleScorer(agent, validation_batch(), step="validation_step"),
        max_demos=5, num_candidates=6, seed=0, template="Word: {input}\nCode: {output}",
    )
    trainer = Trainer(max_epochs=3, enable_progress_bar=False, default_root_dir=tmp_path)
    baseline = trainer.validate(agent, DataLoader(as_data(VALIDATION), batch_size=5))
    trainer.fit(agent, DataLoader(as_data(TRAIN), batch_size=4, shuffle=True, seed=0),
                DataLoader(as_data(VALIDATION), batch_size=5))
    scores = [baseline["val_score"]] + [row["val_score"] for row in trainer.metrics_log.rows
                                        if row["stage"] == "fit"]
    print(f"\nvalidation score per epoch (0 = before): {scores}")
    print(f"demonstrations:\n{agent.demos.data}")
    assert scores[0] == 0.0
    assert scores == sorted(scores), "the validation score never drops"
    assert scores[-1] >= 0.9
    state = agent.demo_optimizer.state[agent.demos]
    # Only training samples that passed became demonstrations; validation never did.
    validation_words = {word for word, _ in VALIDATION}
    assert state["pool"] and all(demo["input"] not in validation_words for demo in state["pool"])
    assert all(CODE_OF[word_of(demo["input"])] == demo["output"] for demo in state["pool"])
    assert len(state["chosen"]) <= 5
    fit_rows = [row for row in trainer.metrics_log.rows if row["stage"] == "fit"]
    assert sum(row["accepted"] for row in fit_rows) == state["accepted"] > 0


def test_no_backward_is_run_and_no_optimizer_model_is_needed(tmp_path):
    model = ScriptedModel(forward_reply, model="forward")
    agent = Coder(model)
    agent.demo_optimizer = DemoOptimizer([agent.demos], evaluate=lambda: 0.0)
    Trainer(max_epochs=1, enable_progress_bar=False, default_root_dir=tmp_path).fit(
        agent, DataLoader(as_data(TRAIN[:4]), batch_size=4)
    )
    # Without the Trainer skipping it, backward() on an output that needs no gradient raises.
    assert model.calls == 4 and afnio.get_backward_model_client() is None


def score_table(param, table):
    """A plain closure reading the demonstrations' text: the sum of the table's entries present."""
    calls = []

    def closure():
        calls.append(param.data)
        return sum(value for key, value in table.items() if key in param.data)

    closure.calls = calls
    return closure


def test_record_keeps_only_new_passing_samples_and_ignores_no_grad_calls():
    demos = demos_parameter()
    optimizer = DemoOptimizer([demos], evaluate=lambda: 0.0, max_pool=3)
    assert optimizer.record(afnio.Variable(["a", "b", "c"]), ["A", "B", "C"],
                            afnio.Variable([1, 0, 1])) == 2
    assert optimizer.record(["a", "d", "e", "f"], ["A", "D", "E", "F"], [True] * 4) == 1
    with afnio.no_grad():
        assert optimizer.record(["g"], ["G"], [True]) == 0
    assert [d["input"] for d in optimizer.state[demos]["pool"]] == ["a", "c", "d"]
    with pytest.raises(ValueError, match="same length, got 2, 1 and 2"):
        optimizer.record(["a", "b"], ["A"], [1, 1])
    with pytest.raises(TypeError, match="passed must hold bools or numbers"):
        optimizer.record(["a"], ["A"], ["yes"])


def test_a_search_keeps_the_best_set_the_current_one_winning_ties():
    demos = demos_parameter()
    closure = score_table(demos, {"in: a": 1.0, "in: c": 2.0, "in: d": 0.5, "in: e": 2.0})
    optimizer = DemoOptimizer([demos], evaluate=closure, max_demos=1, num_candidates=4,
                              template="in: {input} out: {output}", separator=" | ")
    optimizer.record(["a", "b", "c", "d"], ["A", "B", "C", "D"], [1, 1, 1, 1])
    assert optimizer.step() == 2.0
    assert demos.data == "in: c out: C"
    state = optimizer.state[demos]
    assert (state["chosen"], state["score"], state["searches"]) == ([2], 2.0, 1)
    assert closure.calls[0] == ""  # the current (empty) set is scored first
    assert len(closure.calls) == 5 and len(set(closure.calls)) == 5
    record = optimizer.last_step[0]
    assert (record["verdict"], record["before"], record["after"]) == ("accepted", "",
                                                                     "in: c out: C")
    assert record["feedback"] == [] and record["score_before"] == 0
    # No new demonstrations: nothing to search, nothing scored.
    assert optimizer.step() is None and len(closure.calls) == 5 and optimizer.last_step == []
    # A new demonstration that is only as good: the current set stays.
    optimizer.record(["e"], ["E"], [1])
    optimizer.step()
    assert demos.data == "in: c out: C"
    assert optimizer.last_step[0]["verdict"] == "rejected"
    assert (state["accepted"], state["rejected"]) == (1, 1)


def test_a_scorer_scores_the_sets_without_touching_the_parameter():
    demos = demos_parameter()
    seen = []

    def score(values, indices):
        seen.append((values[demos], demos.data))
        return float("in: b" in values[demos])

    optimizer = DemoOptimizer([demos], max_demos=1, num_candidates=3, selection="full",
                              template="in: {input} out: {output}")
    optimizer.record(["a", "b", "c"], ["A", "B", "C"], [1, 1, 1])
    optimizer.step(FunctionScorer(score, [demos], num_samples=2))
    assert demos.data == "in: b out: B"
    assert all(live == "" for _, live in seen)  # the live parameter was never rewritten
    assert len(seen) == 4
    assert optimizer.last_step[0]["evaluations"] == 4 * 2  # every set on every sample


def racing_scorer(demos, pool_vectors, empty_vector):
    """A scorer of sets of words w0, w1, ...: sample i scores 1 when a word of the set has a 1
    at position i of its vector (the empty set: ``empty_vector``). Logs every evaluation."""
    log = []

    def words(text):
        return [int(word) for word in re.findall(r"in: w(\d+) ", text)]

    def per_sample(text, i):
        chosen = words(text)
        if not chosen:
            return empty_vector[i]
        return max(pool_vectors[word][i] for word in chosen)

    def score(values, indices):
        log.append((values[demos], list(indices)))
        return sum(per_sample(values[demos], i) for i in indices) / len(indices)

    scorer = FunctionScorer(score, [demos], num_samples=len(empty_vector))
    scorer.log = log
    scorer.true_mean = lambda text: sum(
        per_sample(text, i) for i in range(len(empty_vector))
    ) / len(empty_vector)
    return scorer


def test_halving_races_the_sets_and_scores_the_winner_and_the_current_set_in_full():
    demos = demos_parameter()
    samples = 16
    # w2 helps on every sample; w0, w1, w3 on a few, so they fall behind in the first round.
    vectors = [[int(i % 4 == k) for i in range(samples)] for k in range(4)]
    vectors[2] = [1] * samples
    scorer = racing_scorer(demos, vectors, [0] * samples)
    optimizer = DemoOptimizer([demos], evaluate=scorer, max_demos=1, num_candidates=4,
                              template="in: {input} out: {output}")
    optimizer.record([f"w{k}" for k in range(4)], ["x"] * 4, [1] * 4)
    assert optimizer.step() == 1.0
    assert demos.data == "in: w2 out: x"
    by_set: dict[str, list[int]] = {}
    for text, indices in scorer.log:
        by_set.setdefault(text, []).extend(indices)
    assert sorted(by_set[""]) == list(range(samples))  # the current set, in full
    assert sorted(by_set[demos.data]) == list(range(samples))  # the winner, in full
    assert len(by_set) == 5  # the current set and 4 others
    # The race: 4 sets x 4 samples, 2 x 4 more, 1 x 8 more; plus the current set's 16.
    record = optimizer.last_step[0]
    assert record["evaluations"] == sum(len(indices) for _, indices in scorer.log) == 16 + 32
    assert racing_plan(4, samples) == [(4, 4), (2, 8), (1, 16)]


@given(
    data=st.data(),
    pool=st.integers(2, 6),
    samples=st.integers(1, 12),
    seed=st.integers(0, 3),
)
def test_halving_never_keeps_a_set_that_scores_lower_than_the_current_one(
    data, pool, samples, seed
):
    bits = st.lists(st.integers(0, 1), min_size=samples, max_size=samples)
    vectors = [data.draw(bits) for _ in range(pool + 1)]
    demos = demos_parameter()
    scorer = racing_scorer(demos, vectors[:pool], vectors[pool])
    optimizer = DemoOptimizer([demos], evaluate=scorer, max_demos=2, num_candidates=4,
                              seed=seed, template="in: {input} out: {output} ")
    words = [f"w{k}" for k in range(pool)]
    optimizer.record(words[:-1], ["x"] * (pool - 1), [1] * (pool - 1))
    optimizer.step()
    first = demos.data
    optimizer.record(words[-1:], ["x"], [1])  # a second search starts from a non-empty set
    optimizer.step()
    assert scorer.true_mean(first) >= scorer.true_mean("")
    assert scorer.true_mean(demos.data) >= scorer.true_mean(first)
    assert optimizer.state[demos]["score"] == pytest.approx(scorer.true_mean(demos.data))


@pytest.mark.parametrize("racing", [False, True], ids=["plain closure", "racing scorer"])
def test_candidates_are_seeded_and_resume_is_exact(racing):
    def closure_for(demos):
        if racing:  # word k helps on the samples i with (i + 1) * (k + 1) % 3 == 0
            vectors = [[int((i + 1) * (k + 1) % 3 == 0) for i in range(10)] for k in range(12)]
            scorer = racing_scorer(demos, vectors, [0] * 10)
            return scorer, scorer.log
        closure = score_table(demos, {f"in: w{i} ": i % 5 for i in range(12)})
        return closure, closure.calls

    def run(seed, resume=False):
        demos = demos_parameter()
        closure, calls = closure_for(demos)
        optimizer = DemoOptimizer([demos], evaluate=closure, max_demos=3, num_candidates=4,
                                  seed=seed, template="in: {input} out: {output}")
        for batch in range(3):
            if resume and batch == 2:
                saved = json.loads(json.dumps(optimizer.state_dict()))
                value = demos.data
                demos = demos_parameter(data=value)
                closure, calls = closure_for(demos)
                optimizer = DemoOptimizer([demos], evaluate=closure, max_demos=3,
                                          num_candidates=4, seed=seed,
                                          template="in: {input} out: {output}")
                optimizer.load_state_dict(saved)
            words = [f"w{i}" for i in range(batch * 4, batch * 4 + 4)]
            optimizer.record(words, [w.upper() for w in words], [1] * 4)
            start = len(calls)
            optimizer.step()
        # What the last search scored (a scorer's evaluations run concurrently: any order).
        return demos.data, optimizer.state[demos], sorted(map(str, calls[start:]))

    assert run(0) == run(0, resume=True)
    assert run(0)[2] != run(1)[2]


def test_render_demos_and_the_parameter_helper():
    assert render_demos([]) == ""
    text = render_demos([{"input": "a {x}", "output": "b"}, {"input": "c", "output": "d"}],
                        template="{input} => {output}", separator="; ", header="E.g. ")
    assert text == "E.g. a {x} => b; c => d"
    demos = demos_parameter("examples")
    assert (demos.param_type, demos.requires_grad, demos.data) == (ParameterType.DEMOS, False, "")


def test_bad_arguments_are_refused():
    demos = demos_parameter()
    with pytest.raises(ValueError, match=r"exactly the placeholders \{input\} and \{output\}"):
        DemoOptimizer([demos], template="{input} only")
    with pytest.raises(TypeError, match="unknown options"):
        DemoOptimizer([demos], max_demo=3)
    with pytest.raises(ValueError, match=r"selection must be one of \('halving', 'full'\)"):
        DemoOptimizer([demos], selection="ucb")
    with pytest.raises(TypeError, match="must hold a string"):
        DemoOptimizer([afnio.Parameter(["a", "b"], role="batch")])
    optimizer = DemoOptimizer([demos, demos_parameter("other")])
    with pytest.raises(ValueError, match="say which pool"):
        optimizer.record(["a"], ["A"], [1])
    with pytest.raises(ValueError, match="needs a validation closure"):
        optimizer.step()
    assert optimizer.needs_closure and not DemoOptimizer([demos], evaluate=lambda: 0).needs_closure


def test_search_every_spaces_the_searches_from_the_first_step_with_demonstrations():
    demos = demos_parameter()
    closure = score_table(demos, {})
    optimizer = DemoOptimizer([demos], evaluate=closure, search_every=3, num_candidates=1,
                              template="in: {input} out: {output}")
    searched_at = []
    for step in range(1, 9):
        if step >= 2:  # the pool is empty at step 1 and grows at every later step
            optimizer.record([f"w{step}"], ["x"], [1])
        optimizer.step()
        if optimizer.last_step:
            searched_at.append(step)
    assert searched_at == [2, 5, 8]
    assert optimizer.state[demos]["searches"] == 3


@pytest.mark.parametrize("racing", [False, True], ids=["plain closure", "racing scorer"])
def test_a_search_that_finds_no_other_set_keeps_the_current_one(monkeypatch, racing):
    demos = demos_parameter()
    scorer = racing_scorer(demos, [[1, 0], [0, 1]], [1, 1])
    closure = scorer if racing else (lambda: scorer.true_mean(demos.data))
    optimizer = DemoOptimizer([demos], evaluate=closure, template="in: {input} out: {output} ")
    monkeypatch.setattr(DemoOptimizer, "_candidates",
                        staticmethod(lambda current, size, opts, rng: [sorted(current)]))
    optimizer.record(["w0", "w1"], ["x", "x"], [1, 1])
    assert optimizer.step() == 1.0
    record = optimizer.last_step[0]
    assert (demos.data, record["verdict"], record["candidates"]) == ("", "rejected", 1)
