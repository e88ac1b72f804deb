"""ChatCompletion: rendering, batching, errors, and the rules of its textual backward."""

from __future__ import annotations

import asyncio
import re

import pytest

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.feedback import (
    fill_prompt,
    fill_template,
    get_gradient_token_budget,
    placeholders,
    set_gradient_token_budget,
)
from afnio.autodiff.lm_ops import ChatCompletion, ReplyParseError
from afnio.models import registry
from afnio.models.errors import ContextWindowError
from afnio.models.tokens import count_message_tokens
from afnio.testing import ScriptedModel, Turnstile

GRADIENT_SYSTEM = fill_prompt(prompts.GRADIENT_SYSTEM_PROMPT)
MARKED = re.compile(r"<VARIABLE>(.*?)</VARIABLE>", re.DOTALL)


def is_gradient_request(messages) -> bool:
    return messages[0]["content"] == GRADIENT_SYSTEM


def user_prompt(messages) -> str:
    return messages[-1]["content"]


def echo_marked(messages, **kwargs) -> str:
    """A backward model that names the marked variable in its feedback."""
    return f"<FEEDBACK>change {MARKED.search(user_prompt(messages)).group(1)}</FEEDBACK>"


@pytest.fixture
def no_global_backward():
    registry.set_backward_model_client(None)


@pytest.fixture
def budget():
    saved = get_gradient_token_budget()
    yield
    set_gradient_token_budget(saved)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def system(*parts):
    return {"role": "system", "content": list(parts)}


# --------------------------------------------------------------------------- forward
def test_scalar_call_renders_messages_and_passes_completion_args():
    model = ScriptedModel(["ok"])
    sys_prompt = afnio.Variable("You are terse.", role="system prompt")
    rules = afnio.Variable('Reply as JSON like {"answer": {"text": "..."}}.', role="format")
    question = afnio.Variable("Q: {question} (write {{question}} literally)", role="template")
    history = afnio.Variable("Earlier answer.", role="earlier turn")
    out = ChatCompletion.apply(
        model,
        [
            system(sys_prompt, rules),
            user("Hi"),
            {"role": "assistant", "content": [history]},
            user(question),
        ],
        inputs={"question": "What is {x}?"},
        temperature=0,
        response_format={"type": "json_object"},
        backward_model_client=ScriptedModel(),
        backward_completion_args={"temperature": 1},
    )
    assert out.data == "ok" and out.batch_size is None
    assert out.role.startswith("response of the language model to system prompt")
    ((messages, kwargs),) = model.requests
    assert messages == [
        {
            "role": "system",
            "content": 'You are terse.\nReply as JSON like {"answer": {"text": "..."}}.',
        },
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Earlier answer."},
        {"role": "user", "content": "Q: What is {x}? (write {question} literally)"},
    ]
    assert kwargs == {"temperature": 0, "response_format": {"type": "json_object"}}


def test_placeholder_rule():
    assert placeholders('{a} {{b}} {"c": 1} {d e} {_f1}') == ["a", "_f1"]
    assert fill_template("{a}{a} {{a}} {b}", {"a": "{b}"}) == "{b}{b} {a} {b}"


def test_fill_prompt_adds_the_feedback_length_bound():
    template = "at most {max_sentences} sentences about {what}; {other} stays"
    assert fill_prompt(template, {"what": "x"}) == "at most 4 sentences about x; {other} stays"
    with afnio.settings(max_feedback_sentences=2):  # read at call time
        assert fill_prompt(template) == "at most 2 sentences about {what}; {other} stays"


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: ["a", "b", "c"],
        lambda: afnio.Variable(["a", "b", "c"], role="letters"),
        lambda: [afnio.Variable(x, role=f"letter {x}") for x in "abc"],
    ],
    ids=["list-of-str", "batched-variable", "list-of-variables"],
)
def test_batched_inputs_give_batched_output_in_order(make_input):
    model = ScriptedModel(lambda messages, **kw: messages[-1]["content"].upper())
    template = afnio.Variable("say {x}", role="template")
    out = ChatCompletion.apply(model, [user(template)], inputs={"x": make_input()})
    assert out.data == ["SAY A", "SAY B", "SAY C"]
    assert [m[-1]["content"] for m, _ in model.requests] == ["say a", "say b", "say c"]


def test_batched_content_broadcasts_with_scalar_inputs():
    model = ScriptedModel(lambda messages, **kw: messages[0]["content"])
    content = afnio.Variable(["1 {x}", "2 {x}"], role="lines")
    out = ChatCompletion.apply(model, [user(content)], inputs={"x": "X"})
    assert out.data == ["1 X", "2 X"]


def test_number_inputs_and_empty_batch():
    model = ScriptedModel(lambda messages, **kw: messages[0]["content"])
    out = ChatCompletion.apply(model, [user("n={n}")], inputs={"n": 3})
    assert out.data == "n=3"
    empty = ChatCompletion.apply(model, [user("{n}")], inputs={"n": []})
    assert empty.data == [] and model.calls == 1


def test_batch_size_mismatch_names_roles_and_lengths():
    a = afnio.Variable(["1", "2"], role="first batch")
    b = afnio.Variable(["1", "2", "3"], role="second batch")
    with pytest.raises(ValueError, match=r"'first batch' has 2 .*'second batch' has 3"):
        ChatCompletion.apply(ScriptedModel(), [user(a, "{b}")], inputs={"b": b})
    with pytest.raises(ValueError, match=r"'first batch' has 2 .*input 'c' \(list of values\)"):
        ChatCompletion.apply(ScriptedModel(), [user(a, "{c}")], inputs={"c": ["x"]})
    items = [afnio.Variable("x", role="item")]
    with pytest.raises(ValueError, match=r"'first batch' has 2 .*input 'd' \(list of Variables\)"):
        ChatCompletion.apply(ScriptedModel(), [user(a, "{d}")], inputs={"d": items})


def test_placeholder_input_mismatch_lists_both_sets():
    model = ScriptedModel()
    with pytest.raises(ValueError) as info:
        ChatCompletion.apply(model, [user("{a} {b}")], inputs={"b": "1", "c": "2"})
    message = str(info.value)
    assert "ChatCompletion" in message
    assert "no input for placeholder(s) ['a']" in message
    assert "no placeholder for input(s) ['c']" in message
    assert "['a', 'b']" in message and "['b', 'c']" in message
    assert model.calls == 0


@pytest.mark.parametrize(
    "messages, inputs, error, fragment",
    [
        ([], None, TypeError, "non-empty list"),
        ([{"role": "user"}], None, TypeError, "exactly the keys"),
        ([{"role": "", "content": ["x"]}], None, TypeError, "'role' must be a non-empty str"),
        ([{"role": "user", "content": [3]}], None, TypeError, "content part 0"),
        ([{"role": "user", "content": ["{x}"]}], {"x": {"a": 1}}, TypeError, "inputs['x']"),
        ([{"role": "user", "content": ["{x}"]}], {"x": ["a", 1.5, None]}, TypeError, "NoneType"),
        ([{"role": "user", "content": ["x"]}], ["x"], TypeError, "'inputs' must be a dict"),
        (
            [{"role": "user", "content": ["{x}"]}],
            {"x": [afnio.Variable(["a"], role="b")]},
            TypeError,
            "scalar Variables",
        ),
    ],
)
def test_malformed_messages_and_inputs(messages, inputs, error, fragment):
    with pytest.raises(error) as info:
        ChatCompletion.apply(ScriptedModel(), messages, inputs=inputs)
    assert fragment in str(info.value) and "ChatCompletion" in str(info.value)


def test_clients_and_backward_args_are_checked():
    with pytest.raises(TypeError, match="'forward_model_client' must be a ChatCompletionModel"):
        ChatCompletion.apply("openai/gpt-4o", [user("hi")])
    with pytest.raises(TypeError, match="'backward_model_client' must be a ChatCompletionModel"):
        ChatCompletion.apply(ScriptedModel(), [user("hi")], backward_model_client="gpt")
    with pytest.raises(TypeError, match="'backward_completion_args' must be a dict"):
        ChatCompletion.apply(ScriptedModel(), [user("hi")], backward_completion_args=[1])


def test_output_graph_and_no_grad():
    prompt = afnio.Variable("hi", role="greeting", requires_grad=True)
    out = ChatCompletion.apply(ScriptedModel(["x"]), [user(prompt)])
    assert out.grad_fn.name() == "ChatCompletionBackward" and out.requires_grad
    with afnio.no_grad():
        plain = ChatCompletion.apply(ScriptedModel(["x"]), [user(prompt)])
    assert plain.grad_fn is None and not plain.requires_grad


def test_aapply_from_async_code():
    model = ScriptedModel(["a", "b"])

    async def main():
        return await ChatCompletion.aapply(model, [user("{x}")], inputs={"x": ["1", "2"]})

    assert asyncio.run(main()).data == ["a", "b"]


# --------------------------------------------------------------------------- backward
def test_scalar_backward_one_call_per_variable_in_argument_order():
    backward_model = ScriptedModel(echo_marked)
    sys_prompt = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    fixed = afnio.Variable("Never lie.", role="fixed rule")
    template = afnio.Variable("Q: {q} {ctx}", role="question template", requires_grad=True)
    question = afnio.Variable("why?", role="question", requires_grad=True)
    context = afnio.Variable("ctx0", role="context", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["because"]),
        [system(sys_prompt, fixed), user(template)],
        inputs={"q": question, "ctx": context},
        backward_model_client=backward_model,
    )
    grads = out.grad_fn.apply([afnio.Variable("too short")])
    assert [g.data if g is not None else None for g in grads] == [
        "change Be kind.",
        None,
        "change Q: why? ctx0",
        "change why?",
        "change ctx0",
    ]
    assert backward_model.calls == 4
    prompt = user_prompt(backward_model.requests[0][0])
    assert "system prompt" in prompt and "part 1 of 2 of message 1 of 2" in prompt
    assert "too short" in prompt and "because" in prompt
    # The output role and the feedback requested in a bounded length.
    assert f"at most {afnio.get_settings().max_feedback_sentences} sentences" in prompt
    assert backward_model.requests[0][1] == {}


def test_backward_accumulates_into_leaves():
    backward_model = ScriptedModel(echo_marked)
    prompt = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["ok"]),
        [system(prompt), user("hi")],
        backward_model_client=backward_model,
        backward_completion_args={"temperature": 0.5},
    )
    out.backward(afnio.Variable("rude"))
    assert [g.data for g in prompt.grad] == ["change Be kind."]
    assert prompt.grad[0].role == "feedback to system prompt"
    assert backward_model.requests[0][1] == {"temperature": 0.5}


def test_batched_backward_shared_and_per_element_rules():
    backward_model = ScriptedModel(echo_marked)
    shared = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    questions = afnio.Variable(["q0", "q1", "q2", "q3"], role="questions", requires_grad=True)
    items = [afnio.Variable(f"i{k}", role=f"item {k}", requires_grad=True) for k in range(4)]
    out = ChatCompletion.apply(
        ScriptedModel(lambda m, **kw: "answer to " + m[-1]["content"]),
        [system(shared), user("{q} {item}")],
        inputs={"q": questions, "item": items},
        backward_model_client=backward_model,
    )
    feedback = afnio.Variable(["bad 0", "", "bad 2", ""])
    grads = out.grad_fn.apply([feedback])
    shared_grad, question_grad, *item_grads = grads
    # Shared: one call that sees exactly the samples with feedback.
    assert shared_grad.data == "change Be kind." and shared_grad.batch_size is None
    shared_prompts = [
        user_prompt(m)
        for m, _ in backward_model.requests
        if "shared by every sample" in user_prompt(m)
    ]
    assert len(shared_prompts) == 1
    assert "bad 0" in shared_prompts[0] and "bad 2" in shared_prompts[0]
    assert 'number="2"' not in shared_prompts[0] and "answer to q1" not in shared_prompts[0]
    assert "[input {q} (questions): differs per sample" in shared_prompts[0]
    # Batched: one call per element with feedback, "" elsewhere.
    assert question_grad.data == ["change q0", "", "change q2", ""]
    # List of scalar Variables: each its own scalar gradient; no call for empty feedback.
    assert [g.data if g is not None else None for g in item_grads] == [
        "change i0",
        None,
        "change i2",
        None,
    ]
    assert backward_model.calls == 1 + 2 + 2


def test_empty_feedback_costs_no_call_and_needs_no_client(no_global_backward):
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["a", "b"]), [user(prompt, "{x}")], inputs={"x": ["1", "2"]}
    )
    out.backward(afnio.Variable(["", ""]))
    assert prompt.grad == []


def test_only_variables_requiring_grad_get_calls():
    backward_model = ScriptedModel(echo_marked)
    frozen = afnio.Variable("frozen", role="frozen prompt")
    trained = afnio.Variable("trained", role="trained prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["x"]), [system(frozen), user(trained)], backward_model_client=backward_model
    )
    grads = out.grad_fn.apply([afnio.Variable("meh")])
    assert grads[0] is None and grads[1].data == "change trained"
    assert backward_model.calls == 1


def test_missing_backward_client_is_a_clear_error(no_global_backward):
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    out = ChatCompletion.apply(ScriptedModel(["x"]), [user(prompt)])
    with pytest.raises(RuntimeError, match=r"afnio\.set_backward_model_client") as info:
        out.backward(afnio.Variable("bad"))
    assert "ChatCompletion" in str(info.value) and "'prompt'" in str(info.value)
    assert prompt.grad == []


def test_backward_client_is_captured_at_forward_time(no_global_backward):
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    backward_model = ScriptedModel(echo_marked)
    registry.set_backward_model_client(backward_model, completion_args={"seed": 7})
    out = ChatCompletion.apply(ScriptedModel(["x"]), [user(prompt)])
    later = ScriptedModel(echo_marked)
    registry.set_backward_model_client(later)  # too late for the graph already built
    out.backward(afnio.Variable("bad"))
    assert prompt.grad[0].data == "change p"
    assert backward_model.requests[0][1] == {"seed": 7} and later.calls == 0


def test_json_feedback_is_accepted():
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["x"]),
        [user(prompt)],
        backward_model_client=ScriptedModel(['```json\n{"feedback": "be clear"}\n```']),
    )
    out.backward(afnio.Variable("bad"))
    assert prompt.grad[0].data == "be clear"


def test_malformed_feedback_is_retried_then_accepted():
    backward_model = ScriptedModel(["I think it is fine", "<FEEDBACK>add detail</FEEDBACK>"])
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["x"]), [user(prompt)], backward_model_client=backward_model
    )
    out.backward(afnio.Variable("bad"))
    assert prompt.grad[0].data == "add detail"
    assert backward_model.calls == 2
    retry = backward_model.requests[1][0]
    assert retry[-2] == {"role": "assistant", "content": "I think it is fine"}
    assert "<FEEDBACK>" in retry[-1]["content"]


def test_untagged_feedback_after_repairs_is_used_as_it_is_with_a_counted_warning():
    backward_model = ScriptedModel(["The prompt should ask for one word, sorry"])
    prompt = afnio.Variable("p", role="my prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["x"]), [user(prompt)], backward_model_client=backward_model
    )
    afnio.autodiff.reset_feedback_stats()
    with pytest.warns(afnio.autodiff.FeedbackFormatWarning, match="'my prompt'.*3 attempt"):
        out.backward(afnio.Variable("bad"))
    assert backward_model.calls == 3
    assert [g.data for g in prompt.grad] == ["The prompt should ask for one word, sorry"]
    stats = afnio.autodiff.get_feedback_stats()
    assert stats["salvaged"] == 1 and stats["repairs"] == 2 and stats["unreadable"] == 0


@pytest.mark.parametrize("reply", ["", "   ", "OK.", "```\n<FEEDBACK>\n```"])
def test_empty_or_boilerplate_feedback_counts_as_none_and_never_fails(reply):
    backward_model = ScriptedModel([reply])
    prompt = afnio.Variable("p", role="my prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["x"]), [user(prompt)], backward_model_client=backward_model
    )
    with pytest.warns(afnio.autodiff.FeedbackFormatWarning, match="counts as no feedback"):
        out.backward(afnio.Variable("bad"))
    assert [g.data for g in prompt.grad] == [""]


def test_a_reply_quoted_in_the_error_when_nothing_can_be_salvaged():
    from afnio.autodiff.feedback import Unreadable, ask

    def parse(reply):
        raise Unreadable("never readable")

    model = ScriptedModel(["no tags here, sorry"])
    with pytest.raises(ReplyParseError) as info:
        afnio._runtime.run(ask(model, [{"role": "user", "content": "q"}], parse,
                               what="demo op for 'my prompt'", repair="fix: {reason}"))
    assert "'no tags here, sorry'" in str(info.value) and "'my prompt'" in str(info.value)
    assert "3 attempt" in str(info.value) and isinstance(info.value, ValueError)
    assert info.value.reasons == ["never readable"] * 3 and model.calls == 3


def test_shared_variable_chunked_past_budget_then_condensed(budget):
    batch = 12
    backward_model = ScriptedModel(
        lambda messages, **kw: (
            "<FEEDBACK>merged</FEEDBACK>"
            if "Merge their feedback" in user_prompt(messages)
            else f"<FEEDBACK>chunk {len(re.findall('<SAMPLE', user_prompt(messages)))}</FEEDBACK>"
        )
    )
    shared = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(lambda m, **kw: "answer " * 20),
        [system(shared), user("{q}")],
        inputs={"q": [f"question {i} " * 10 for i in range(batch)]},
        backward_model_client=backward_model,
    )
    set_gradient_token_budget(900)
    feedback = [f"feedback number {i} " * 5 for i in range(batch)]
    out.backward(afnio.Variable(feedback))
    assert shared.grad[0].data == "merged"
    requests = [m for m, _ in backward_model.requests]
    chunks = [m for m in requests if "Merge their feedback" not in user_prompt(m)]
    reduces = [m for m in requests if "Merge their feedback" in user_prompt(m)]
    assert len(chunks) > 1 and len(reduces) == 1
    assert backward_model.calls == len(chunks) + 1
    # Every sample is seen exactly once, and every chunk respects the budget.
    for i in range(batch):
        assert sum(feedback[i] in user_prompt(m) for m in chunks) == 1
    assert all(count_message_tokens(m, "scripted") <= 900 for m in chunks)
    # The condense call sees every chunk's feedback.
    for m in chunks:
        count = len(re.findall("<SAMPLE", user_prompt(m)))
        assert f"chunk {count}" in user_prompt(reduces[0])


def test_shared_variable_under_budget_is_one_call():
    backward_model = ScriptedModel(echo_marked)
    shared = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["a"]),
        [system(shared), user("{q}")],
        inputs={"q": [str(i) for i in range(50)]},
        backward_model_client=backward_model,
    )
    out.backward(afnio.Variable(["wrong"] * 50))
    assert backward_model.calls == 1 and shared.grad[0].data == "change Be kind."


def test_gradient_token_budget_validation(budget):
    with pytest.raises(ValueError, match="positive int"):
        set_gradient_token_budget(0)
    set_gradient_token_budget(1234)
    assert get_gradient_token_budget() == 1234


# --------------------------------------------------------------------------- 3-stage chain
def stage_model(gate: Turnstile | None = None) -> ScriptedModel:
    def reply(messages, **kwargs):
        stage = re.search(r"Stage (\d)", messages[0]["content"]).group(1)
        return f"s{stage}({messages[-1]['content']})"

    return ScriptedModel(gate.wrap(reply) if gate else reply)


def feedback_model(gate: Turnstile | None = None) -> ScriptedModel:
    def reply(messages, **kwargs):
        return "<FEEDBACK>be more careful</FEEDBACK>"

    return ScriptedModel(gate.wrap(reply) if gate else reply)


def run_chain(batch: int, forward_model: ScriptedModel, backward_model: ScriptedModel):
    """Three chained calls, each with its own shared system prompt, then exact match.

    Sample i succeeds when ``i % 3 == 1``; ``batch == 1`` is a scalar (unbatched) chain.
    """
    stage_prompts = [
        afnio.Variable(
            f"Stage {k} instructions.", role=f"system prompt of stage {k}", requires_grad=True
        )
        for k in (1, 2, 3)
    ]
    questions = [f"q{i}" for i in range(batch)]
    x = afnio.Variable(questions if batch > 1 else questions[0], role="questions")
    for prompt in stage_prompts:
        x = ChatCompletion.apply(
            forward_model,
            [system(prompt), user("{x}")],
            inputs={"x": x},
            backward_model_client=backward_model,
        )
    targets = [f"s3(s2(s1({q})))" if i % 3 == 1 else "other" for i, q in enumerate(questions)]
    score, explanation = ExactMatchEvaluator.apply(x, targets if batch > 1 else targets[0])
    return stage_prompts, x, score, explanation


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_three_stage_chain_exact_call_counts(batch):
    forward_model, backward_model = stage_model(), feedback_model()
    stage_prompts, output, score, explanation = run_chain(batch, forward_model, backward_model)
    successes = len(range(1, batch, 3))
    failures = batch - successes
    assert score.data == successes
    assert forward_model.calls == 3 * batch
    explanation.backward()
    # Per stage: one call for its shared prompt; stages 3 and 2 also one call per failed sample
    # for their batched input (the previous stage's output); stage 1's input needs no grad.
    assert backward_model.calls == 3 * 1 + 2 * failures
    assert forward_model.calls == 3 * batch
    for prompt in stage_prompts:
        assert [g.data for g in prompt.grad] == ["be more careful"]
    if batch > 1:
        shared = [
            user_prompt(m)
            for m, _ in backward_model.requests
            if "shared by every sample" in user_prompt(m)
        ]
        assert len(shared) == 3
        assert all(f"Below are the {failures} samples" in p for p in shared)


def test_forward_batch_requests_all_in_flight():
    # Each stage's 32 requests are held until all 32 are waiting: certain, whatever the load.
    gate = Turnstile("reverse", expected=[32, 32, 32], timeout=30)
    forward_model = stage_model(gate)
    run_chain(32, forward_model, feedback_model())
    assert forward_model.max_in_flight == 32


def test_backward_calls_of_a_stage_overlap():
    failures = 32 - len(range(1, 32, 3))
    # Stage 3's shared-prompt call and its per-element calls are all in flight together (the
    # turnstile holds them until all 1 + failures are waiting), then stage 2's, then stage 1's.
    gate = Turnstile("reverse", expected=[1 + failures, 1 + failures, 1], timeout=30)
    forward_model, backward_model = stage_model(), feedback_model(gate)
    *_, explanation = run_chain(32, forward_model, backward_model)
    explanation.backward()
    assert backward_model.max_in_flight == 1 + failures


def test_independent_branches_backward_concurrently():
    gate = Turnstile("reverse", expected=4, timeout=30)
    backward_model = feedback_model(gate)
    prompts_ = [afnio.Variable(f"p{k}", role=f"prompt {k}", requires_grad=True) for k in range(4)]
    outs = [
        ChatCompletion.apply(ScriptedModel(["x"]), [user(p)], backward_model_client=backward_model)
        for p in prompts_
    ]
    total = afnio.autodiff.Sum.apply(outs)
    total.backward(afnio.Variable("needs work"))
    assert backward_model.calls == 4 and backward_model.max_in_flight == 4
    assert all(p.grad[0].data == "be more careful" for p in prompts_)


def test_fan_in_feedback_past_budget_is_condensed_once_per_element(budget):
    def reply(messages, **kwargs):
        prompt = user_prompt(messages)
        if "Several pieces of feedback were given on the same output" in prompt:
            return "<FEEDBACK>condensed</FEEDBACK>"
        return echo_marked(messages)

    backward_model = ScriptedModel(reply)
    sys_prompt = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    template = afnio.Variable("Tell me about {topic}.", role="user template", requires_grad=True)
    out = ChatCompletion.apply(ScriptedModel(["an answer"]), [system(sys_prompt), user(template)],
                               inputs={"topic": "owls"}, backward_model_client=backward_model)
    pieces = [f"piece {i}: " + "the answer should say more about habitats. " * 4
              for i in range(12)]
    set_gradient_token_budget(500)
    out.backward(afnio.Variable("\n\n".join(pieces)))
    assert sys_prompt.grad[0].data == "change Be kind."
    assert template.grad[0].data == "change Tell me about owls."
    requests = [user_prompt(m) for m, _ in backward_model.requests]
    condense = [p for p in requests if "Several pieces of feedback" in p]
    gradient = [p for p in requests if "Several pieces of feedback" not in p]
    assert len(gradient) == 2 and all("condensed" in p and "piece 0" not in p for p in gradient)
    # Condensed once (shared by both variables): each piece reaches exactly one first-round call.
    first_round = [p for p in condense if re.search(r"piece \d+:", p)]
    for piece in pieces:
        assert sum(piece in p for p in first_round) == 1
    assert len(first_round) > 1 and len(condense) == len(first_round) + 1
    assert all(count_message_tokens(m, "scripted") <= 500 for m, _ in backward_model.requests)
    assert backward_model.calls == len(condense) + 2


def test_single_oversized_feedback_is_sent_whole_not_cut(budget):
    backward_model = ScriptedModel(echo_marked)
    prompt = afnio.Variable("p", role="prompt", requires_grad=True)
    out = ChatCompletion.apply(ScriptedModel(["x"]), [user(prompt)],
                               backward_model_client=backward_model)
    set_gradient_token_budget(100)
    long_feedback = "one long unbroken complaint " * 50
    out.backward(afnio.Variable(long_feedback))
    assert backward_model.calls == 1 and long_feedback in user_prompt(backward_model.requests[0][0])


def test_json_feedback_with_raw_newlines_is_parsed():
    from afnio.autodiff.feedback import parse_feedback

    assert parse_feedback('{"feedback": "Name the deadline.\nBe brief."}') == (
        "Name the deadline.\nBe brief."
    )


def test_a_list_input_with_values_of_other_types_names_the_first_bad_one():
    with pytest.raises(TypeError) as info:
        ChatCompletion.apply(ScriptedModel(["x"]), [{"role": "user", "content": "{q}"}],
                             inputs={"q": ["a", None, 1j]})
    assert str(info.value) == (
        "ChatCompletion: argument 'inputs['q']': a list input must hold only str values or only "
        "scalar Variables, got an item of type NoneType"
    )


def test_a_request_over_the_window_names_its_two_largest_parts():
    system = afnio.Variable("Be brief. " * 5, role="system prompt")  # 50 characters
    notes = afnio.Variable("note " * 40, role="notes")  # 200 characters
    model = ScriptedModel(["x"], context_window=200, max_tokens=64)
    with pytest.raises(ContextWindowError) as info:
        ChatCompletion.apply(model, [{"role": "system", "content": [system]},
                                     {"role": "user", "content": [notes, "{q}"]}],
                             inputs={"q": "word " * 300})
    assert "(input {q}: 1500 characters, notes: 200 characters)" in str(info.value)
    assert model.calls == 0
