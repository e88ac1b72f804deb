"""Routing properties of ChatCompletion: each element's reply and gradient come from that element.

Every Variable's text starts with its own token (``v3``, or ``v3e5`` for element 5 of a batch),
every element's feedback is its own token (``fb5``), the forward model answers with the tokens it
was shown, and the backward model answers ``grad[var=<marked variable token>;fb=<feedback tokens
in the prompt>]``. So a reply or a gradient that reaches the wrong element, a per-element prompt
that shows another element's feedback, or a shared-variable prompt that misses a sample, changes
a value the test predicts exactly. A :class:`~afnio.testing.Turnstile` releases the forward and
the backward calls in reversed, rotated or shuffled order, so results that are collected in
completion order are caught too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel, Turnstile, completion_orders, reference_backward

VAR_TOKEN = re.compile(r"\bv\d+(?:e\d+)?\b")
FB_TOKEN = re.compile(r"\bfb\d+(?:x\d+)?\b")
_before, _after = prompts.MARKED_VARIABLE.split("{text}")
MARKED = re.compile(re.escape(_before) + r"(.*?)" + re.escape(_after), re.DOTALL)


def _unique(tokens):
    return list(dict.fromkeys(tokens))


def forward_reply(messages, **kwargs):
    """The Variable tokens the request showed, in order."""
    text = "\n".join(m["content"] for m in messages)
    return "out[" + ",".join(_unique(VAR_TOKEN.findall(text))) + "]"


def backward_reply(messages, **kwargs):
    """Feedback naming the marked Variable's token and every feedback token in the prompt."""
    prompt = "\n".join(m["content"] for m in messages)
    # The first marked region holding a Variable token (instructions may quote the marker).
    targets = [VAR_TOKEN.search(text) for text in MARKED.findall(prompt)]
    target = next((match.group(0) for match in targets if match), "?")
    tokens = ",".join(_unique(FB_TOKEN.findall(prompt)))
    return f"<FEEDBACK>grad[var={target};fb={tokens}]</FEEDBACK>"


@dataclass
class Call:
    """One random ChatCompletion call and what routing predicts for it."""

    batch: int | None
    messages: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    # (variable, token(s) per element, kind) in flat order; kind: "shared", "batched",
    # ("item", k) for item k of a list input, or "single" in an unbatched call.
    slots: list = field(default_factory=list)
    # Tokens each element's request shows, in order.
    shown: list = field(default_factory=list)


PARTS = ["str", "shared", "batched"]
INPUTS = ["texts", "shared", "batched", "list"]


@st.composite
def calls(draw, max_batch=16):
    """A call whose messages and inputs mix shared, batched and list Variables."""
    shapes = draw(
        st.lists(st.lists(st.sampled_from(PARTS), min_size=1, max_size=3), min_size=1, max_size=3)
    )
    input_kinds = draw(st.lists(st.sampled_from(INPUTS), max_size=3))
    batched = any("batched" in s for s in shapes) or any(k != "shared" for k in input_kinds)
    batch = draw(st.integers(1, max_batch)) if batched else None
    n = batch or 1
    places = [(m, j) for m, shape in enumerate(shapes) for j in range(len(shape))]
    homes = [draw(st.sampled_from(places)) for _ in input_kinds]
    call = Call(batch)
    counter = iter(range(1000))
    # Per element, the tokens of each part / input in rendering order.
    part_tokens: dict[tuple[int, int], list[list[str]]] = {}
    input_tokens: dict[int, list[list[str]]] = {}
    for k, kind in enumerate(input_kinds):
        token = f"v{next(counter)}"
        requires = draw(st.booleans())
        if kind == "texts":
            value = [f"{token}e{i}" for i in range(n)]
        elif kind == "shared":
            value = afnio.Variable(token, role=f"shared input {k}", requires_grad=requires)
            call.slots.append((value, [token] * n, "shared" if batch else "single"))
        elif kind == "batched":
            value = afnio.Variable([f"{token}e{i}" for i in range(n)], role=f"batched input {k}",
                                   requires_grad=requires)
            call.slots.append((value, [f"{token}e{i}" for i in range(n)], "batched"))
        else:
            value = []
            for i in range(n):
                item = afnio.Variable(f"{token}e{i}", role=f"item {i} of list input {k}",
                                      requires_grad=draw(st.booleans()))
                value.append(item)
                call.slots.append((item, [f"{token}e{i}"] * n, ("item", i)))
        call.inputs[f"in{k}"] = value
        if kind == "shared":
            input_tokens[k] = [[token]] * n
        else:
            input_tokens[k] = [[f"{token}e{i}"] for i in range(n)]
    message_slots = []
    for m, shape in enumerate(shapes):
        content = []
        for j, kind in enumerate(shape):
            token = f"v{next(counter)}"
            suffix = "".join(f" {{in{k}}}" for k, home in enumerate(homes) if home == (m, j))
            filled = [k for k, home in enumerate(homes) if home == (m, j)]
            requires = draw(st.booleans())
            if kind == "batched":
                variable = afnio.Variable([f"{token}e{i}{suffix}" for i in range(n)],
                                          role=f"batched part {m}.{j}", requires_grad=requires)
                own = [f"{token}e{i}" for i in range(n)]
                message_slots.append((variable, own, "batched"))
            else:
                own = [token] * n
                if kind == "shared":
                    variable = afnio.Variable(token + suffix, role=f"shared part {m}.{j}",
                                              requires_grad=requires)
                    message_slots.append((variable, own, "shared" if batch else "single"))
                else:
                    variable = token + suffix
            content.append(variable)
            part_tokens[(m, j)] = [
                [own[i], *[t for k in filled for t in input_tokens[k][i]]] for i in range(n)
            ]
        role = draw(st.sampled_from(["system", "user", "assistant"]))
        call.messages.append({"role": role, "content": content})
    call.slots = message_slots + call.slots  # flat order: messages, then inputs
    call.shown = [
        _unique(t for place in places for t in part_tokens[place][i]) for i in range(n)
    ]
    return call


def expected(call, feedback):
    """Per slot: the gradient data routing predicts (None for no gradient), and the call count."""
    live = [i for i, text in enumerate(feedback) if text]
    result, count = [], 0
    for variable, tokens, kind in call.slots:
        if not variable.requires_grad or not live:
            result.append(None)
            continue
        if kind == "batched":
            result.append([
                f"grad[var={tokens[i]};fb={feedback[i]}]" if feedback[i] else ""
                for i in range(len(feedback))
            ])
            count += len(live)
        elif isinstance(kind, tuple):
            i = kind[1]
            result.append(f"grad[var={tokens[i]};fb={feedback[i]}]" if feedback[i] else None)
            count += bool(feedback[i])
        else:
            result.append(f"grad[var={tokens[0]};fb={','.join(feedback[i] for i in live)}]")
            count += 1
    return result, count


def run_call(call, forward_order, backward_order=None):
    forward_gate = Turnstile(forward_order)
    backward_gate = Turnstile(backward_order if backward_order is not None else forward_order)
    forward = ScriptedModel(forward_gate.wrap(forward_reply))
    backward = ScriptedModel(backward_gate.wrap(backward_reply))
    out = ChatCompletion.apply(
        forward, call.messages, inputs=call.inputs or None, backward_model_client=backward
    )
    return out, forward, backward


@given(calls(), completion_orders())
def test_each_element_gets_the_reply_to_its_own_request(call, order):
    out, forward, _ = run_call(call, order)
    replies = [f"out[{','.join(tokens)}]" for tokens in call.shown]
    assert out.data == (replies if call.batch is not None else replies[0])
    assert forward.calls == len(call.shown)


@given(calls(), completion_orders(), st.data())
def test_each_gradient_comes_from_its_own_elements_feedback(call, order, data):
    n = call.batch or 1
    feedback = [
        f"fb{i}" if keep else ""
        for i, keep in enumerate(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    ]
    out, _, backward = run_call(call, order, data.draw(completion_orders()))
    if out.grad_fn is None:
        assert not any(variable.requires_grad for variable, _, _ in call.slots)
        return
    out.backward(afnio.Variable(feedback if call.batch is not None else feedback[0]))
    want, count = expected(call, feedback)
    for (variable, _, _), grad in zip(call.slots, want):
        assert [g.data for g in variable.grad] == ([] if grad is None else [grad])
    assert backward.calls == count


@st.composite
def fan_in_programs(draw):
    """A shared system prompt and a batched draft used by several ChatCompletion consumers, some
    chained, with distinct feedback per root and per element."""
    batch = draw(st.integers(1, 6))
    n_calls = draw(st.integers(2, 4))
    wiring = [draw(st.sampled_from(["draft", "previous", "both"])) for _ in range(n_calls)]
    roots = draw(st.lists(st.integers(0, n_calls - 1), min_size=1, max_size=3, unique=True))
    return batch, wiring, roots


def build_fan_in(program, gate_order=None):
    batch, wiring, root_ids = program
    system = afnio.Variable("v0", role="shared system prompt", requires_grad=True)
    draft = afnio.Variable([f"v1e{i}" for i in range(batch)], role="drafts", requires_grad=True)
    gate = Turnstile(gate_order) if gate_order is not None else None
    backward = ScriptedModel(gate.wrap(backward_reply) if gate else backward_reply)
    forward = ScriptedModel(forward_reply)
    outputs = []
    for k, wire in enumerate(wiring):
        inputs = {}
        if wire in ("draft", "both") or not outputs:
            inputs["d"] = draft
        if wire in ("previous", "both") and outputs:
            inputs["p"] = outputs[-1]
        template = f"v{10 + k} " + " ".join(f"{{{name}}}" for name in inputs)
        outputs.append(ChatCompletion.apply(
            forward,
            [{"role": "system", "content": [system]}, {"role": "user", "content": [template]}],
            inputs=inputs, backward_model_client=backward,
        ))
    roots = [outputs[k] for k in root_ids]
    grads = [
        afnio.Variable([f"fb{i}x{r}" if (i + r) % 3 else "" for i in range(batch)])
        for r in range(len(roots))
    ]
    return (system, draft), roots, grads, backward


@given(fan_in_programs(), completion_orders())
def test_fan_in_over_lm_calls_matches_the_sequential_reference(program, order):
    leaves, roots, grads, backward = build_fan_in(program, order)
    afnio.autodiff.backward(roots, grads)
    ref_leaves, ref_roots, ref_grads, ref_backward = build_fan_in(program)
    reference_backward(ref_roots, ref_grads)
    assert [[g.data for g in leaf.grad] for leaf in leaves] == [
        [g.data for g in leaf.grad] for leaf in ref_leaves
    ]
    assert backward.calls == ref_backward.calls
