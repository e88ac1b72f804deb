"""GradComponent, FunGradComponent and fun_to_grad_component."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import afnio
from afnio.autodiff.graph import AccumulateGrad
from afnio.cognitive import (
    BackwardEngine,
    FunGradComponent,
    GradComponent,
    Parameter,
    ParameterType,
    fun_to_grad_component,
)
from afnio.models import registry
from afnio.testing import ScriptedModel, Turnstile


@pytest.fixture(autouse=True)
def no_global_backward_client() -> Iterator[None]:
    registry.set_backward_model_client(None)
    yield


class Join(GradComponent):
    """Joins a text with a suffix; counts its calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Appends the suffix to the text", **kwargs)
        self.calls = 0

    def call(self, text: str, suffix: str = "!") -> str:
        self.calls += 1
        return text + suffix


def feedback_model(text: str = "be more specific", gate: Turnstile | None = None) -> ScriptedModel:
    if gate is None:
        return ScriptedModel([f"<FEEDBACK>{text}</FEEDBACK>"])
    return ScriptedModel(gate.wrap(lambda messages, **kwargs: f"<FEEDBACK>{text}</FEEDBACK>"))


def user_prompts(model: ScriptedModel) -> list[str]:
    return [messages[-1]["content"] for messages, _ in model.requests]


# ---------------------------------------------------------------------- forward / call


def test_training_mode_traces_and_eval_mode_returns_plain_values() -> None:
    join = Join()
    text = afnio.Variable("hello", role="greeting", requires_grad=True)
    suffix = afnio.Variable("?", role="punctuation")
    out = join(text, suffix=suffix)
    assert isinstance(out, afnio.Variable) and out.data == "hello?"
    assert out.grad_fn.name() == "JoinBackward" and out.requires_grad and not out.is_leaf
    edges = out.grad_fn.next_functions
    assert isinstance(edges[0].node, AccumulateGrad) and edges[0].node.variable is text
    assert edges[1].node is None  # suffix does not require grad
    assert out.trace["input_args"] == {"arg_0": "hello", "suffix": "?"}
    assert out.trace["full_response"] == "hello?"
    assert join.eval() is join
    plain = join(text, suffix=suffix)
    assert plain == "hello?" and not isinstance(plain, afnio.Variable)
    assert join.train()("a", "b").data == "ab"


def test_no_grad_or_no_grad_inputs_give_a_leaf_variable() -> None:
    join = Join()
    out = join(afnio.Variable("x"))
    assert out.data == "x!" and out.grad_fn is None and not out.requires_grad
    with afnio.no_grad():
        out = join(afnio.Variable("x", requires_grad=True))
    assert out.grad_fn is None and not out.requires_grad


def test_variables_inside_containers_are_predecessors_in_flat_order() -> None:
    class Count(GradComponent):
        def call(self, items: list, options: dict, extra: str = "") -> int:
            return len(items) + len(options) + len(extra)

    a, b, c, d = (afnio.Variable(t, role=t, requires_grad=True) for t in "abcd")
    out = Count("Counts")([a, "plain", b], {"k": c}, extra=d)
    assert out.data == 5
    assert [edge.node.variable for edge in out.grad_fn.next_functions] == [a, b, c, d]
    assert out.trace["input_names"] == ["arg_0[0]", "arg_0[2]", "arg_1['k']", "extra"]


def test_batches_run_elementwise_or_whole() -> None:
    join = Join()
    texts = afnio.Variable(["a", "b", "c"], role="texts", requires_grad=True)
    out = join(texts, afnio.Variable("?", role="mark"))
    assert out.data == ["a?", "b?", "c?"] and join.calls == 3
    assert join.eval()(texts) == ["a!", "b!", "c!"]

    class Lengths(GradComponent):
        def call(self, items: list) -> list:
            return [len(item) for item in items]

    whole = Lengths("Lengths of the items", elementwise=False)
    assert whole(afnio.Variable(["ab", "c"])).data == [2, 1]
    with pytest.raises(ValueError, match="'texts' has 3 elements but 'pair' has 2"):
        join(texts, afnio.Variable(["1", "2"], role="pair"))


def test_async_acall_runs_batch_elements_concurrently() -> None:
    class SlowUpper(GradComponent):
        def __init__(self) -> None:
            super().__init__("Upper-cases slowly")
            self.in_flight = 0
            self.max_in_flight = 0
            # The first 4 calls (the batch) are held until all 4 wait: certain overlap.
            self.gate = Turnstile("reverse", expected=[4], timeout=30)

        async def acall(self, text: str) -> str:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await self.gate.wait()
            self.in_flight -= 1
            return text.upper()

    component = SlowUpper()
    out = component(afnio.Variable(["a", "b", "c", "d"], role="letters", requires_grad=True))
    assert out.data == ["A", "B", "C", "D"] and component.max_in_flight == 4
    assert component.call("x") == "X"  # call falls back to acall
    assert component.eval()("y") == "Y"


def test_bad_outputs_and_missing_call_are_clear_errors() -> None:
    class Dicty(GradComponent):
        def call(self, x: Any) -> dict:
            return {"x": x}

    with pytest.raises(TypeError, match="Dicty: in training mode call must return"):
        Dicty("Wraps")(afnio.Variable("v", requires_grad=True))
    assert Dicty("Wraps").eval()(afnio.Variable("v")) == {"x": "v"}
    with pytest.raises(RuntimeError, match="defines neither call nor acall"):
        GradComponent("nothing")("x")


# ---------------------------------------------------------------------- backward


def test_pass_through_without_engine() -> None:
    join = Join()
    text = afnio.Variable(["a", "b"], role="texts", requires_grad=True)
    mark = afnio.Variable("?", role="mark", requires_grad=True)
    join(text, mark).backward(afnio.Variable(["fix a", ""]))
    assert [g.data for g in text.grad] == [["fix a", ""]]
    assert text.grad[0].role == "feedback to texts"
    assert [g.data for g in mark.grad] == ["[sample 0] fix a"]


def test_engine_backward_asks_once_per_predecessor_that_requires_grad() -> None:
    model = feedback_model("use a warmer tone", Turnstile(expected=[2], timeout=30))
    join = Join(model_client=model, model_kwargs={"temperature": 0})
    text = afnio.Variable("hello", role="greeting", requires_grad=True)
    suffix = afnio.Variable("!", role="punctuation", requires_grad=True)
    fixed = afnio.Variable(" and", role="conjunction")
    out = join(text, suffix=suffix)
    join(fixed)  # an unrelated call: no gradient requests from it
    out.backward(afnio.Variable("sounds cold"))
    assert model.calls == 2 and model.max_in_flight == 2
    assert [g.data for g in text.grad] == ["use a warmer tone"]
    assert [g.data for g in suffix.grad] == ["use a warmer tone"]
    assert all(kwargs == {"temperature": 0} for _, kwargs in model.requests)
    prompts_sent = sorted(user_prompts(model))
    assert all("Appends the suffix to the text" in p and "sounds cold" in p for p in prompts_sent)
    assert "(greeting)\n<VALUE>\nhello" in prompts_sent[0] + prompts_sent[1]
    assert "(punctuation)\n<VALUE>\n!" in prompts_sent[0] + prompts_sent[1]


def test_engine_backward_batches_per_element_and_shared_scalar_once() -> None:
    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>noted</FEEDBACK>")
    join = Join(model_client=model)
    texts = afnio.Variable(["a", "b", "c"], role="texts", requires_grad=True)
    mark = afnio.Variable("?", role="mark", requires_grad=True)
    join(texts, mark).backward(afnio.Variable(["bad a", "", "bad c"]))
    # texts: one call per element with feedback (2); mark (shared scalar): one call.
    assert model.calls == 3
    assert [g.data for g in texts.grad] == [["noted", "", "noted"]]
    assert [g.data for g in mark.grad] == ["noted"]
    shared = [p for p in user_prompts(model) if "(mark)\n<VALUE>" in p]
    assert len(shared) == 1 and "bad a" in shared[0] and "bad c" in shared[0]
    model.reset()
    join(texts, mark).backward(afnio.Variable(["", "", ""]))
    assert model.calls == 0 and len(texts.grad) == 1  # empty feedback costs nothing


def test_global_backward_client_is_the_default_engine() -> None:
    model = feedback_model("global says hi")
    registry.set_backward_model_client(model, completion_args={"seed": 1})
    text = afnio.Variable("x", role="text", requires_grad=True)
    Join()(text).backward(afnio.Variable("wrong"))
    assert model.calls == 1 and model.requests[0][1] == {"seed": 1}
    assert text.grad[0].data == "global says hi"


def test_disable_backward_engine_passes_through_even_when_set_after_forward() -> None:
    model = feedback_model()
    join = Join(model_client=model)
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = join(text)
    join.disable_backward_engine()
    assert join.backward_engine_disabled
    out.backward(afnio.Variable("too short"))
    assert model.calls == 0 and [g.data for g in text.grad] == ["too short"]
    join.enable_backward_engine()
    join(text).backward(afnio.Variable("again"))
    assert model.calls == 1


def test_untagged_reply_is_repaired_then_used_as_feedback() -> None:
    model = ScriptedModel(["the text needs a question mark"])
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join(backward_engine=BackwardEngine(model, max_attempts=2))(text)
    with pytest.warns(afnio.autodiff.FeedbackFormatWarning, match="Join backward.*2 attempt"):
        out.backward(afnio.Variable("bad"))
    assert model.calls == 2 and [g.data for g in text.grad] == ["the text needs a question mark"]
    correction = model.requests[1][0]
    assert correction[-2] == {"role": "assistant", "content": "the text needs a question mark"}
    assert "<FEEDBACK>" in correction[-1]["content"]


def test_seed_style_backward_override_and_returned_gradients() -> None:
    class Labeller(GradComponent):
        def call(self, a: str, b: str) -> str:
            return a + b

        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            feedback = response.grad[0].data
            for pred in response.predecessors:
                if pred.requires_grad:
                    pred.grad.append(afnio.Variable(f"{pred.role}: {feedback}"))

    a = afnio.Variable("1", role="left", requires_grad=True)
    b = afnio.Variable("2", role="right", requires_grad=True)
    out = Labeller("Concatenates")(a, b)
    out.backward(afnio.Variable("odd"))
    assert [g.data for g in a.grad] == ["left: odd"] and [g.data for g in b.grad] == ["right: odd"]

    class Returner(Labeller):
        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            return [None, afnio.Variable("only right")]

    a.grad.clear()
    b.grad.clear()
    Returner("Concatenates")(a, b).backward(afnio.Variable("x"))
    assert a.grad == [] and [g.data for g in b.grad] == ["only right"]

    class Wrong(Labeller):
        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            return [afnio.Variable("one")]

    with pytest.raises(RuntimeError, match="one gradient per predecessor"):
        Wrong("Concatenates")(a, b).backward(afnio.Variable("x"))


def test_graph_is_freed_after_backward() -> None:
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join()(text)
    out.backward(afnio.Variable("a"), retain_graph=True)
    out.backward(afnio.Variable("b"))
    assert [g.data for g in text.grad] == ["a", "b"]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(afnio.Variable("c"))


def test_chained_components_deliver_in_engine_order() -> None:
    first, second = Join(), Join()
    text = afnio.Variable("x", role="text", requires_grad=True)
    middle = first(text)
    out = second(middle, suffix=text)
    out.backward(afnio.Variable("fb"))
    # text is reached directly from `second` and through `first`; both gradients arrive.
    assert [g.data for g in text.grad] == ["fb", "fb"]


def test_set_backward_engine_validation() -> None:
    join = Join()
    with pytest.raises(TypeError, match="must be a BackwardEngine"):
        join.set_backward_engine("engine")
    with pytest.raises(ValueError, match="not both"):
        join.set_backward_engine(BackwardEngine(), model_client=ScriptedModel())
    join.set_backward_engine()
    text = afnio.Variable("x", role="text", requires_grad=True)
    with pytest.raises(RuntimeError, match="no model client"):
        join(text).backward(afnio.Variable("fb"))


# ---------------------------------------------------------------------- function components


def test_seed_example_runs_verbatim() -> None:
    @fun_to_grad_component(
        desc="This is a test function",
        doc_string=Parameter(
            data="Finish the task with verbatim short factoid responses from retrieved context.",
            param_type=ParameterType.PROMPT,
            requires_opt=True,
            role_desc="Instruct how the agent creates the final answer from the step history.",
        ),
    )
    def my_function(x):
        return x + 1

    output = my_function(1)
    assert isinstance(output, afnio.Variable) and output.data == 2
    assert output.grad_fn.name() == "MyFunctionGradComponentBackward"
    my_function.eval()
    assert my_function(1) == 2
    my_function.train()
    assert my_function(Parameter(data=1, name="input")).data == 2


def test_doc_string_parameter_receives_a_gradient_that_quotes_it() -> None:
    model = feedback_model("state the format")
    doc = Parameter(
        "Return the answer in upper case.", role="instructions", param_type=ParameterType.PROMPT
    )

    @fun_to_grad_component(desc="Formats the answer", doc_string=doc)
    def format_answer(answer: str) -> str:
        return answer.upper()

    format_answer.set_backward_engine(model_client=model)
    assert dict(format_answer.named_parameters()) == {"doc_string": doc}
    answer = afnio.Variable("paris", role="answer", requires_grad=True)
    out = format_answer(answer)
    assert out.data == "PARIS"
    assert [e.node.variable for e in out.grad_fn.next_functions] == [answer, doc]
    out.backward(afnio.Variable("too loud"))
    assert model.calls == 2
    assert [g.data for g in doc.grad] == ["state the format"]
    doc_prompt = next(p for p in user_prompts(model) if "(instructions, a prompt" in p)
    assert "Return the answer in upper case." in doc_prompt and "too loud" in doc_prompt


def test_fun_to_grad_component_as_a_function_and_async() -> None:
    def add_one(x: int) -> int:
        return x + 1

    component = fun_to_grad_component(desc="Adds one")(add_one)
    assert type(component).__name__ == "AddOneGradComponent" and component.desc == "Adds one"
    x = afnio.Variable([1, 2], role="numbers", requires_grad=True)
    assert component(x).data == [2, 3]
    assert component.eval()(5) == 6

    running = {"now": 0, "max": 0}
    gate = Turnstile("reverse", expected=[3], timeout=30)

    async def slow_double(x: int) -> int:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await gate.wait()
        running["now"] -= 1
        return 2 * x

    doubler = fun_to_grad_component()(slow_double)
    assert doubler.afun is slow_double and doubler.desc == "Function: slow_double"
    assert doubler(afnio.Variable([1, 2, 3], requires_grad=True)).data == [2, 4, 6]
    assert running["max"] == 3
    assert FunGradComponent(afun=slow_double).eval()(4) == 8
    with pytest.raises(TypeError, match="give a function"):
        FunGradComponent()
    with pytest.raises(TypeError, match="must be an async function"):
        FunGradComponent(afun=add_one)


def test_shared_input_over_the_token_budget_is_chunked_then_merged() -> None:
    from afnio.autodiff.feedback import get_gradient_token_budget, set_gradient_token_budget

    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>part</FEEDBACK>")
    join = Join(model_client=model)
    # Each sample carries ~400 tokens of its own text: one sample fits in 800, two don't.
    texts = afnio.Variable([f"{i} " + "word " * 400 for i in range(4)], role="long texts")
    mark = afnio.Variable("?", role="mark", requires_grad=True)
    out = join(texts, mark)
    old_budget = get_gradient_token_budget()
    set_gradient_token_budget(800)
    try:
        out.backward(afnio.Variable(["a", "b", "c", "d"]))
    finally:
        set_gradient_token_budget(old_budget)
    # 4 chunk requests (one sample each) and 1 request merging their 4 answers.
    assert model.calls == 5
    merge = user_prompts(model)[-1]
    assert merge.count("<FEEDBACK_PART") == 4 and "the mark" in merge
    assert [g.data for g in mark.grad] == ["part"]


def test_one_sample_over_the_token_budget_is_sent_whole_in_one_request() -> None:
    from afnio.autodiff.feedback import get_gradient_token_budget, set_gradient_token_budget

    model = feedback_model("shorter")
    join = Join(model_client=model)
    mark = afnio.Variable("?", role="mark", requires_grad=True)
    out = join(afnio.Variable("word " * 400, role="long text"), mark)
    old_budget = get_gradient_token_budget()
    set_gradient_token_budget(50)
    try:
        out.backward(afnio.Variable("too long"))
    finally:
        set_gradient_token_budget(old_budget)
    assert model.calls == 1 and ("word " * 400).strip() in user_prompts(model)[0]
    assert [g.data for g in mark.grad] == ["shorter"]


def test_gradient_requests_use_the_lm_ops_feedback_length_bound() -> None:
    model = feedback_model()
    text = afnio.Variable("x", role="text", requires_grad=True)
    with afnio.settings(max_feedback_sentences=7):
        Join(model_client=model)(text).backward(afnio.Variable("longer"))
    (request,) = [messages for messages, _ in model.requests]
    assert "at most 7 sentences" in request[0]["content"]


def test_inputs_shared_by_all_samples_are_shown_once() -> None:
    model = feedback_model()
    join = Join(model_client=model)
    mark = afnio.Variable("?!", role="mark", requires_grad=True)
    join(afnio.Variable(["a", "b"], role="texts"), mark).backward(afnio.Variable(["x", "y"]))
    (prompt,) = user_prompts(model)
    assert prompt.count("[arg_1] (mark)\n?!") == 1 and "<SHARED_INPUTS>" in prompt
    assert "<SAMPLE 0>" in prompt and "<SAMPLE 1>" in prompt


def test_sync_override_calling_super_still_uses_the_engine() -> None:
    class Recording(Join):
        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            self.seen = (response.grad[0].data, response.trace["full_response"])
            return super().backward(
                response=response, id=id, disable_backward_engine=disable_backward_engine
            )

    model = feedback_model("shorter")
    component = Recording(model_client=model)
    text = afnio.Variable("x", role="text", requires_grad=True)
    component(text).backward(afnio.Variable("long"))
    assert component.seen == ("long", "x!")
    assert model.calls == 1 and [g.data for g in text.grad] == ["shorter"]


def test_sync_backward_overrides_run_off_the_loop_like_sync_functions() -> None:
    import threading

    barrier = threading.Barrier(4, timeout=30)

    class Waiting(Join):
        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            barrier.wait()  # blocks until all four branches' backwards run at the same time
            return [afnio.Variable("met")]

    texts = [afnio.Variable(f"t{i}", role="text", requires_grad=True) for i in range(4)]
    outs = [Waiting()(text) for text in texts]
    afnio.autodiff.Sum.apply(outs).backward(afnio.Variable("fb"))
    assert [text.grad[0].data for text in texts] == ["met"] * 4
    assert not outs[0].grad_fn.is_async  # the same policy as any synchronous node


def test_backward_engine_is_captured_when_the_forward_runs() -> None:
    first, later = feedback_model("from the first"), feedback_model("from later")
    registry.set_backward_model_client(first)
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join()(text)
    registry.set_backward_model_client(later)
    out.backward(afnio.Variable("bad"))
    assert [g.data for g in text.grad] == ["from the first"] and later.calls == 0


def test_component_output_declares_its_trace_and_the_node_exposes_it() -> None:
    from afnio.cognitive import ComponentResponse

    out = Join()(afnio.Variable("a", role="text", requires_grad=True), suffix="?")
    assert isinstance(out, ComponentResponse) and out.grad_fn.trace is out.trace
    assert out.trace["full_response"] == "a?" and out.predecessors[0].data == "a"
    assert Join().id is None


class Summary(GradComponent):
    """Joins a whole batch into one text (a scalar output from a batched input)."""

    def call(self, items: list) -> str:
        return " | ".join(items)


class Upper(GradComponent):
    """Upper-cases a whole batch in one call (a batched output from one call)."""

    def call(self, items: list) -> list:
        return [item.upper() for item in items]


def test_scalar_feedback_on_a_whole_batch_call_reaches_every_element() -> None:
    texts = afnio.Variable(["a", "b", "c"], role="texts", requires_grad=True)
    out = Summary("Joins the texts", elementwise=False)(texts)
    assert out.data == "a | b | c" and out.batch_size is None
    out.backward(afnio.Variable("too terse"))
    assert [g.data for g in texts.grad] == [["too terse"] * 3]  # passed through

    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>say more</FEEDBACK>")
    texts = afnio.Variable(["a", "b", "c"], role="texts", requires_grad=True)
    Summary("Joins the texts", elementwise=False, model_client=model)(texts).backward(
        afnio.Variable("too terse")
    )
    assert model.calls == 1  # one request over the one output
    assert [g.data for g in texts.grad] == [["say more"] * 3]


def test_a_whole_batch_call_shows_its_inputs_with_every_elements_feedback() -> None:
    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>fix it</FEEDBACK>")
    texts = afnio.Variable(["a", "b"], role="texts", requires_grad=True)
    out = Upper("Upper-cases the texts", elementwise=False, model_client=model)(texts)
    assert out.data == ["A", "B"]
    out.backward(afnio.Variable(["A is loud", "B is loud"]))
    assert model.calls == 2 and [g.data for g in texts.grad] == [["fix it", "fix it"]]
    for prompt in user_prompts(model):
        # The whole call's input, shared by both samples.
        assert "<SHARED_INPUTS>\n[arg_0] (texts)\n['a', 'b']\n</SHARED_INPUTS>" in prompt


def test_max_attempts_counts_every_request_for_one_gradient() -> None:
    model = ScriptedModel(["no tags here"])
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join(backward_engine=BackwardEngine(model, max_attempts=3))(text)
    with pytest.warns(afnio.autodiff.FeedbackFormatWarning, match="3 attempt"):
        out.backward(afnio.Variable("bad"))
    assert model.calls == 3


def test_backward_methods_take_the_response_by_keyword_only() -> None:
    join = Join()
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = join(text)
    for method in (join.backward, join.abackward, join.backward_with_pass_through_gradients):
        with pytest.raises(TypeError, match="positional argument"):
            method(out)


def test_each_elements_gradient_request_shows_only_that_samples_inputs() -> None:
    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>fix it</FEEDBACK>")
    texts = afnio.Variable(["a", "b"], role="texts", requires_grad=True)
    marks = afnio.Variable(["?", "."], role="marks")
    Join(model_client=model)(texts, marks).backward(afnio.Variable(["fb0", "fb1"]))
    by_feedback = {
        next(f for f in ("fb0", "fb1") if f"<OUTPUT_FEEDBACK>\n{f}\n" in p): p
        for p in user_prompts(model)
    }
    assert "<INPUTS>\n[arg_0] (texts)\na\n[arg_1] (marks)\n?\n</INPUTS>" in by_feedback["fb0"]
    assert "<INPUTS>\n[arg_0] (texts)\nb\n[arg_1] (marks)\n.\n</INPUTS>" in by_feedback["fb1"]
    for index, value in enumerate("ab"):  # the element under review, not the whole batch
        under_review = f"Input under review: [arg_0] (texts)\n<VALUE>\n{value}\n</VALUE>"
        assert under_review in by_feedback[f"fb{index}"]


def test_a_backward_returning_too_many_gradients_is_an_error() -> None:
    class TooMany(GradComponent):
        def call(self, a: str, b: str) -> str:
            return a + b

        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            return [afnio.Variable("one"), afnio.Variable("two"), afnio.Variable("three")]

    a = afnio.Variable("1", role="left", requires_grad=True)
    b = afnio.Variable("2", role="right", requires_grad=True)
    with pytest.raises(RuntimeError, match=r"one gradient per predecessor \(2\), got list of "
                                           r"length 3"):
        TooMany("Concatenates")(a, b).backward(afnio.Variable("x"))


@pytest.mark.parametrize("extra", [1, -1])
def test_pass_through_feedback_of_another_batch_size_is_an_error(extra) -> None:
    class Resize(GradComponent):
        def call(self, items: list) -> list:
            return items + ["extra"] if extra > 0 else items[:-1]

    texts = afnio.Variable(["a", "b", "c"], role="texts", requires_grad=True)
    out = Resize("Changes the batch", elementwise=False)(texts)
    size = 3 + extra
    with pytest.raises(RuntimeError, match=f"feedback of batch size {size} cannot be passed to the "
                                           "input with role 'texts' of batch size 3"):
        out.backward(afnio.Variable(["fix"] * size))


@pytest.mark.parametrize("max_attempts", [0, True, "2", 1])
def test_max_attempts_must_be_an_int_of_at_least_one(max_attempts) -> None:
    model = ScriptedModel(["no tags here"])
    if max_attempts != 1 or isinstance(max_attempts, bool):
        with pytest.raises(ValueError, match=f"must be at least 1, got {max_attempts}$"):
            BackwardEngine(model, max_attempts=max_attempts)
        return
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join(backward_engine=BackwardEngine(model, max_attempts=1))(text)
    with pytest.warns(afnio.autodiff.FeedbackFormatWarning, match="1 attempt"):
        out.backward(afnio.Variable("bad"))
    assert model.calls == 1 and [g.data for g in text.grad] == ["no tags here"]


def test_gradient_requests_name_inputs_and_show_shared_ones_once() -> None:
    model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>fix it</FEEDBACK>")
    # A scalar call: one sample, its inputs shown in it (no shared block); a constant keeps
    # the role "constant" even when a Variable's name sorts after it.
    suffix = afnio.Variable("!", role="punctuation", requires_grad=True)
    Join(model_client=model)("hello", suffix=suffix).backward(afnio.Variable("too loud"))
    (prompt,) = user_prompts(model)
    assert "<SHARED_INPUTS>" not in prompt
    assert "<INPUTS>\n[arg_0] (constant)\nhello\n[suffix] (punctuation)\n!\n</INPUTS>" in prompt
    assert "Input under review: [suffix] (punctuation)" in prompt

    # A batch: inputs equal in every sample are shared, whatever order the others sort in.
    for values in (["b", "a"], ["a", "b"]):
        model.reset()
        texts = afnio.Variable(values, role="texts", requires_grad=True)
        same = afnio.Variable(["?!", "".join(["?", "!"])], role="marks")  # equal, not identical
        Join(model_client=model)(texts, same).backward(afnio.Variable(["bad 0", "bad 1"]))
        for prompt in user_prompts(model):
            assert "<SHARED_INPUTS>\n[arg_1] (marks)\n?!\n</SHARED_INPUTS>" in prompt
            assert "[arg_0] (texts)\nb\n" in prompt or "[arg_0] (texts)\na\n" in prompt
            assert prompt.count("[arg_0] (texts)") == 2  # in its sample and under review


def test_an_engine_with_its_own_client_ignores_the_settings_completion_arguments() -> None:
    settings_model, own = feedback_model("from settings"), feedback_model("from own client")
    registry.set_backward_model_client(settings_model, completion_args={"seed": 1})
    text = afnio.Variable("x", role="text", requires_grad=True)
    Join(model_client=own, model_kwargs={"temperature": 0})(text).backward(afnio.Variable("bad"))
    assert settings_model.calls == 0 and own.requests[0][1] == {"temperature": 0}
    assert text.grad[0].data == "from own client"


def test_backward_engine_repr_names_the_client_without_secrets() -> None:
    assert repr(BackwardEngine()) == (
        "BackwardEngine(model_client=settings' backward client, completion_args={})"
    )
    engine = BackwardEngine(ScriptedModel(model="m"), {"seed": 2})
    assert repr(engine) == "BackwardEngine(model_client='scripted/m', completion_args={'seed': 2})"


def test_a_plain_function_components_acall_runs_it() -> None:
    component = FunGradComponent(lambda text: text.upper(), desc="Upper-cases")
    assert asyncio.run(component.acall("hi")) == "HI"


def test_an_async_backward_override_is_awaited_and_abackward_wins_when_both_are_given() -> None:
    class AsyncOverride(Join):
        async def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            return [afnio.Variable("from async backward")]

    class Both(AsyncOverride):
        async def abackward(self, *, response, id=None, disable_backward_engine=False, **kw):
            return [afnio.Variable("from abackward")]

    for component, expected in ((AsyncOverride(), "from async backward"),
                                (Both(), "from abackward")):
        text = afnio.Variable("x", role="text", requires_grad=True)
        out = component(text)
        assert out.grad_fn.is_async
        out.backward(afnio.Variable("bad"))
        assert [g.data for g in text.grad] == [expected]


def test_a_backward_returning_a_non_list_names_its_type() -> None:
    class Single(Join):
        def backward(self, *, response, id=None, disable_backward_engine=False, **kwargs):
            return afnio.Variable("one")

    text = afnio.Variable("x", role="text", requires_grad=True)
    with pytest.raises(RuntimeError) as info:
        Single()(text).backward(afnio.Variable("bad"))
    assert str(info.value).endswith("or one gradient per predecessor (1), got Variable")


def test_overrides_calling_super_without_the_flag_still_use_the_engine() -> None:
    seen = []

    class SyncSuper(Join):
        def backward(self, *, response, **kwargs):
            seen.append(response.requires_grad)
            return super().backward(response=response)

    class AsyncSuper(Join):
        async def abackward(self, *, response, **kwargs):
            seen.append(response.requires_grad)
            return await super().abackward(response=response)

    for component_class in (SyncSuper, AsyncSuper):
        model = feedback_model("shorter")
        text = afnio.Variable("x", role="text", requires_grad=True)
        component_class(model_client=model)(text).backward(afnio.Variable("long"))
        assert model.calls == 1 and [g.data for g in text.grad] == ["shorter"]
    assert seen == [True, True]  # the response requires grad, like the output it stands for


def test_a_component_without_backward_overrides_gets_an_async_node() -> None:
    text = afnio.Variable("x", role="text", requires_grad=True)
    assert Join()(text).grad_fn.is_async


def test_an_input_that_stopped_requiring_grad_needs_no_backward_client() -> None:
    text = afnio.Variable("x", role="text", requires_grad=True)
    out = Join(backward_engine=BackwardEngine())(text)  # the settings' client: none is set
    text.requires_grad = False
    out.backward(afnio.Variable("bad"))
    assert text.grad == []


@pytest.mark.parametrize("how", ["appended", "returned"])
def test_a_gradient_shaped_unlike_its_input_is_an_error_naming_the_component(how) -> None:
    class Misshaped(Join):
        def backward(self, *, response, **kwargs):
            wrong = afnio.Variable(["a", "b"], role="feedback")
            if how == "returned":
                return [wrong]
            response.predecessors[0].grad.append(wrong)
            return None

    text = afnio.Variable("x", role="text", requires_grad=True)
    with pytest.raises(ValueError, match="MisshapedBackward: gradient for Variable with role "
                                         "'text' must be"):
        Misshaped()(text).backward(afnio.Variable("bad"))
    assert text.grad == []


def test_call_returning_a_variable_is_refused() -> None:
    class Wrapping(GradComponent):
        def call(self, text: str) -> afnio.Variable:
            return afnio.Variable(text)

    with pytest.raises(TypeError, match="call must return plain values, not Variables"):
        Wrapping()(afnio.Variable("x", requires_grad=True))


def test_the_disable_flag_and_the_component_switch_each_pass_feedback_through() -> None:
    class Flagging(Join):
        def backward(self, *, response, disable_backward_engine=False, **kwargs):
            return super().backward(response=response, disable_backward_engine=self.flag)

    for flag, disabled in ((True, False), (False, True)):
        model = feedback_model("engine says")
        component = Flagging(model_client=model)
        component.flag = flag
        if disabled:
            component.disable_backward_engine()
        text = afnio.Variable("x", role="text", requires_grad=True)
        component(text).backward(afnio.Variable("too short"))
        assert model.calls == 0 and [g.data for g in text.grad] == ["too short"]


def test_a_function_components_doc_is_its_doc_string_else_the_functions() -> None:
    def shout(text: str) -> str:
        """Upper-cases the text."""
        return text.upper()

    assert FunGradComponent(shout, doc_string="Makes it loud.").__doc__ == "Makes it loud."
    assert FunGradComponent(shout).__doc__ == "Upper-cases the text."
