"""Properties of ChatCompletion: gradient order and shapes for random message/input structures,
and placeholder / batch-size errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel

MARKED = re.compile(r"<VARIABLE>(.*?)</VARIABLE>", re.DOTALL)


def backward_reply(messages, **kwargs):
    """Feedback naming the marked variable by its id (the first word of its text)."""
    marked = MARKED.search(messages[-1]["content"]).group(1)
    return f"<FEEDBACK>fb:{marked.split()[0]}</FEEDBACK>"


@dataclass
class Case:
    """A random ChatCompletion call plus, per flat Variable, what its gradient must be."""

    batch: int | None
    messages: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    # (variable, id, how): how is "single" (scalar, its own requests), "shared", "batched", or
    # ("element", k) for item k of a list-of-Variables input.
    flat: list = field(default_factory=list)


PART_KINDS = ["str", "scalar", "batched"]
INPUT_KINDS = ["str", "texts", "scalar", "batched", "list"]


@st.composite
def cases(draw) -> Case:
    message_shapes = draw(
        st.lists(
            st.lists(st.sampled_from(PART_KINDS), min_size=1, max_size=3), min_size=1, max_size=3
        )
    )
    input_kinds = draw(st.lists(st.sampled_from(INPUT_KINDS), max_size=3))
    batched = any("batched" in shape for shape in message_shapes) or any(
        kind in ("texts", "batched", "list") for kind in input_kinds
    )
    batch = draw(st.integers(1, 3)) if batched else None
    n = batch or 1
    # Each input's placeholder goes into one random part.
    parts = [(m, j) for m, shape in enumerate(message_shapes) for j in range(len(shape))]
    homes = [draw(st.sampled_from(parts)) for _ in input_kinds]
    case = Case(batch)
    for m, shape in enumerate(message_shapes):
        content = []
        for j, kind in enumerate(shape):
            pid = f"m{m}p{j}"
            suffix = "".join(f" {{in{k}}}" for k, home in enumerate(homes) if home == (m, j))
            if kind == "str":
                content.append(pid + suffix)
                continue
            grad = draw(st.booleans())
            if kind == "scalar":
                variable = afnio.Variable(pid + suffix, role=f"part {pid}", requires_grad=grad)
                how = "shared" if batch is not None else "single"
            else:
                variable = afnio.Variable(
                    [f"{pid}e{i}{suffix}" for i in range(n)], role=f"part {pid}", requires_grad=grad
                )
                how = "batched"
            content.append(variable)
            case.flat.append((variable, pid, how))
        case.messages.append(
            {"role": draw(st.sampled_from(["system", "user", "assistant"])), "content": content}
        )
    for k, kind in enumerate(input_kinds):
        iid = f"in{k}"
        grad = draw(st.booleans())
        if kind == "str":
            value = iid
        elif kind == "texts":
            value = [f"{iid}e{i}" for i in range(n)]
        elif kind == "scalar":
            value = afnio.Variable(iid, role=f"input {iid}", requires_grad=grad)
            case.flat.append((value, iid, "shared" if batch is not None else "single"))
        elif kind == "batched":
            value = afnio.Variable(
                [f"{iid}e{i}" for i in range(n)], role=f"input {iid}", requires_grad=grad
            )
            case.flat.append((value, iid, "batched"))
        else:
            value = []
            for i in range(n):
                item = afnio.Variable(
                    f"{iid}e{i}", role=f"input {iid} item {i}", requires_grad=draw(st.booleans())
                )
                value.append(item)
                case.flat.append((item, f"{iid}e{i}", ("element", i)))
        case.inputs[f"in{k}"] = value
    return case


def expected_gradient(variable, vid, how, feedback):
    """The gradient text(s) DESIGN's rules give, or None for no gradient; and the call count."""
    if not variable.requires_grad:
        return None, 0
    if how == "batched":
        if not any(feedback):
            return None, 0
        return [f"fb:{vid}e{i}" if text else "" for i, text in enumerate(feedback)], sum(
            1 for text in feedback if text
        )
    if isinstance(how, tuple):
        return (f"fb:{vid}", 1) if feedback[how[1]] else (None, 0)
    return (f"fb:{vid}", 1) if any(feedback) else (None, 0)


@given(cases(), st.data())
def test_gradients_follow_flat_argument_order(case, data):
    n = case.batch or 1
    feedback = data.draw(st.lists(st.sampled_from(["", "bad"]), min_size=n, max_size=n))
    forward_model = ScriptedModel(lambda messages, **kw: "reply")
    backward_model = ScriptedModel(backward_reply)
    out = ChatCompletion.apply(
        forward_model,
        case.messages,
        inputs=case.inputs or None,
        backward_model_client=backward_model,
    )
    assert out.batch_size == case.batch
    assert forward_model.calls == n
    if not any(variable.requires_grad for variable, _, _ in case.flat):
        assert out.grad_fn is None
        return
    gradient = afnio.Variable(feedback if case.batch is not None else feedback[0])
    grads = out.grad_fn.apply([gradient])
    assert len(grads) == len(case.flat)
    expected_calls = 0
    for (variable, vid, how), grad in zip(case.flat, grads):
        expected, calls = expected_gradient(variable, vid, how, feedback)
        expected_calls += calls
        if expected is None:
            assert grad is None
        else:
            assert grad.data == expected
            assert grad.batch_size == variable.batch_size
            assert grad.role == f"feedback to {variable.role}"
    assert backward_model.calls == expected_calls


@given(cases(), st.data())
def test_engine_backward_delivers_to_the_same_leaves(case, data):
    n = case.batch or 1
    feedback = data.draw(st.lists(st.sampled_from(["", "bad"]), min_size=n, max_size=n))
    if not any(variable.requires_grad for variable, _, _ in case.flat):
        return
    out = ChatCompletion.apply(
        ScriptedModel(["reply"]),
        case.messages,
        inputs=case.inputs or None,
        backward_model_client=ScriptedModel(backward_reply),
    )
    out.backward(afnio.Variable(feedback if case.batch is not None else feedback[0]))
    expected_by_leaf: dict[int, list] = {}
    for variable, vid, how in case.flat:
        expected, _ = expected_gradient(variable, vid, how, feedback)
        if expected is not None:
            expected_by_leaf.setdefault(id(variable), []).append(expected)
    for variable, _, _ in case.flat:
        assert [g.data for g in variable.grad] == expected_by_leaf.get(id(variable), [])


NAMES = st.sampled_from(["a", "b", "c", "d"])


@given(st.lists(NAMES, unique=True, max_size=4), st.lists(NAMES, unique=True, max_size=4))
def test_placeholder_input_mismatch(used, given_names):
    template = " ".join(f"{{{name}}}" for name in used) + ' {"json": 1} {{lit}}'
    model = ScriptedModel(lambda messages, **kw: messages[0]["content"])
    inputs = {name: name.upper() for name in given_names}
    if set(used) == set(given_names):
        out = ChatCompletion.apply(model, [{"role": "user", "content": [template]}], inputs)
        assert out.data == " ".join(name.upper() for name in used) + ' {"json": 1} {lit}'
        return
    try:
        ChatCompletion.apply(model, [{"role": "user", "content": [template]}], inputs)
    except ValueError as exc:
        assert str(sorted(used)) in str(exc) and str(sorted(given_names)) in str(exc)
    else:
        raise AssertionError("a placeholder/input mismatch must raise ValueError")
    assert model.calls == 0


@given(st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_batch_sizes_must_agree(sizes):
    inputs = {
        f"x{k}": afnio.Variable([f"v{i}" for i in range(size)], role=f"batch {k}")
        for k, size in enumerate(sizes)
    }
    template = " ".join(f"{{{name}}}" for name in inputs)
    model = ScriptedModel(["r"])
    if len(set(sizes)) == 1:
        out = ChatCompletion.apply(model, [{"role": "user", "content": [template]}], inputs)
        assert out.batch_size == sizes[0] and model.calls == sizes[0]
        return
    try:
        ChatCompletion.apply(model, [{"role": "user", "content": [template]}], inputs)
    except ValueError as exc:
        first = sizes[0]
        other = next(k for k, size in enumerate(sizes) if size != first)
        assert f"'batch 0' has {first} elements but 'batch {other}' has {sizes[other]}" in str(exc)
    else:
        raise AssertionError("mismatched batch sizes must raise ValueError")
    assert model.calls == 0
