"""Add, Sum, Split: values, shapes of outputs and gradients, and errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio import Variable
from afnio.autodiff import Add, Split, Sum


def test_add_numbers_strings_and_type_errors():
    assert Add.apply(Variable(2), Variable(3.5)).data == 5.5
    assert Add.apply(Variable("ab"), "cd").data == "abcd"
    with pytest.raises(TypeError, match="'question'.*'count'"):
        Add.apply(Variable("a", role="question"), Variable(1, role="count"))


def test_sum_joins_text_under_role_headers_and_adds_numbers():
    total = Sum.apply([Variable(1), Variable([2, 3]), Variable(4)])
    assert total.data == [7, 8]
    text = Sum.apply([Variable("A", role="first"), Variable("B")])
    assert text.data == "[first]\nA\n\n[item 1]\nB"
    with pytest.raises(TypeError, match="non-empty list"):
        Sum.apply([])


def test_split_gradient_collects_parts_in_order():
    x = Variable(["a b", "c d"], role="pairs", requires_grad=True)
    left, right = Split.apply(x)
    assert left.data == ["a", "c"] and right.data == ["b", "d"]
    afnio.autodiff.backward([right, left], [Variable(["r0", ""]), Variable(["l0", "l1"])])
    assert x.grad[0].data == ["[part 0] l0\n\n[part 1] r0", "[part 0] l1"]
    with pytest.raises(ValueError, match="different numbers of parts"):
        Split.apply(Variable(["a b", "c"], role="ragged"))
    with pytest.raises(TypeError, match="numbers"):
        Split.apply(Variable(3))


def test_broadcast_scalar_gets_scalar_gradient_labelled_by_sample():
    prompt = Variable("Answer: ", role="prefix", requires_grad=True)
    questions = Variable(["q0", "q1", "q2"], role="questions", requires_grad=True)
    out = prompt + questions
    out.backward(Variable(["", "too vague", "wrong"]))
    assert prompt.grad[0].data == "[sample 1] too vague\n\n[sample 2] wrong"
    assert questions.grad[0].data == ["", "too vague", "wrong"]


sizes = st.one_of(st.none(), st.integers(0, 5))


def make(size, text, requires_grad):
    data = text if size is None else [f"{text}{i}" for i in range(size)]
    return Variable(data, role=f"{text} input", requires_grad=requires_grad)


@given(
    st.lists(st.tuples(sizes, st.booleans()), min_size=1, max_size=4),
    st.sampled_from(["add", "sum"]),
)
def test_batching_shapes_and_mismatch_errors(specs, op):
    if op == "add" and len(specs) < 2:
        specs = specs * 2
    inputs = [make(size, f"v{i}", grad) for i, (size, grad) in enumerate(specs)]
    run = (lambda: Add.apply(inputs[0], inputs[1])) if op == "add" else (lambda: Sum.apply(inputs))
    used = inputs[:2] if op == "add" else inputs
    batch_sizes = {v.batch_size for v in used if v.batch_size is not None}
    if len(batch_sizes) > 1:
        with pytest.raises(ValueError, match="batch sizes differ"):
            run()
        return
    out = run()
    expected = batch_sizes.pop() if batch_sizes else None
    assert out.batch_size == expected
    if not out.requires_grad:
        return
    feedback = "fb" if expected is None else [f"fb{i}" for i in range(expected)]
    out.backward(Variable(feedback))
    for variable in used:
        if variable.requires_grad:
            assert len(variable.grad) == 1
            (gradient,) = variable.grad
            assert gradient.batch_size == variable.batch_size
            if variable.batch_size is not None or expected is None:
                assert gradient.data == feedback


@given(st.integers(1, 6), st.integers(1, 4))
def test_split_shapes(batch, parts):
    texts = [" ".join(f"w{i}{j}" for j in range(parts)) for i in range(batch)]
    x = Variable(texts, role="rows", requires_grad=True)
    outputs = Split.apply(x)
    assert len(outputs) == parts and all(o.batch_size == batch for o in outputs)
    outputs[0].backward(Variable(["note"] * batch))
    assert x.grad[0].batch_size == batch
