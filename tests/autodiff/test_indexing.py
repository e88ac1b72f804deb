"""Indexing, slicing, iterating and cloning a Variable, as differentiable ops.

torch's rules mirrored here: ``t[i]`` is ``SelectBackward`` and its gradient is zero except at
``i``; ``t[a:b:c]`` is ``SliceBackward`` and scatters its gradient back into place; negative
indices count from the end; an index out of range raises ``IndexError``; a 0-dim tensor can't be
indexed or iterated; iterating is ``unbind``; ``clone`` is a differentiable copy. Here "zero"
is ``""``, afnio's "nothing to say about this element".
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio import Variable
from afnio.autodiff import Select, Slice


def batch(n, role="answers"):
    return Variable([f"a{i}" for i in range(n)], role=role, requires_grad=True)


@pytest.mark.parametrize("index, position", [(0, 0), (2, 2), (-1, 3), (-4, 0)])
def test_select_sends_feedback_to_its_element_only(index, position):
    x = batch(4)
    y = x[index]
    assert y.data == f"a{position}" and y.batch_size is None
    assert y.grad_fn.name() == "SelectBackward" and y.role == f"element {position} of answers"
    y.backward(Variable("wrong"))
    expected = [""] * 4
    expected[position] = "wrong"
    assert [g.data for g in x.grad] == [expected]
    assert x.grad[0].role == "feedback to answers"


@given(
    st.integers(0, 7),
    st.one_of(st.none(), st.integers(-9, 9)),
    st.one_of(st.none(), st.integers(-9, 9)),
    st.one_of(st.none(), st.integers(-3, 3).filter(bool)),
)
def test_slice_matches_python_and_scatters_feedback_back(size, start, stop, step):
    x = batch(size)
    index = slice(start, stop, step)
    y = x[index]
    assert y.data == x.data[index] and y.grad_fn.name() == "SliceBackward"
    # Distinct feedback per selected element shows any misrouting.
    feedback = [f"about {item}" for item in y.data]
    y.backward(Variable(feedback))
    expected = [""] * size
    for position in range(size)[index]:
        expected[position] = f"about a{position}"
    assert x.grad[0].data == expected


def test_numbers_and_feedback_of_several_elements():
    x = Variable([10, 20, 30], role="scores", requires_grad=True)
    first, last = x[0], x[-1]
    assert (first.data, last.data) == (10, 30)
    afnio.autodiff.backward([first, last], ["too low", "too high"])
    # A leaf gets one entry per gradient (here one per Select), latest producer first.
    assert [g.data for g in x.grad] == [["", "", "too high"], ["too low", "", ""]]


def test_fan_in_into_a_non_leaf_batch_merges_element_wise():
    x = batch(3)
    mid = x + "!"
    mid.retain_grad()
    afnio.autodiff.backward([mid[0], mid[2]], ["first", "third"])
    assert mid.grad[0].data == ["first", "", "third"]
    assert x.grad[0].data == ["first", "", "third"]


def test_iterating_a_batch_is_one_unbind():
    x = batch(3)
    a, b, c = x
    assert (a.data, b.data, c.data) == ("a0", "a1", "a2")
    assert a.grad_fn is b.grad_fn is c.grad_fn and a.grad_fn.name() == "UnbindBackward"
    afnio.autodiff.backward([c, a], ["about c", "about a"])
    assert [g.data for g in x.grad] == [["about a", "", "about c"]]
    assert list(Variable([], role="empty")) == []


def test_indexing_errors_like_torch():
    scalar = Variable("text", role="answer")
    with pytest.raises(IndexError, match="'answer' is a scalar"):
        scalar[0]
    with pytest.raises(IndexError, match="'answer' is a scalar"):
        scalar[1:]
    with pytest.raises(TypeError, match="iteration over a scalar Variable"):
        iter(scalar)
    x = batch(3)
    with pytest.raises(IndexError, match="index 3 is out of range.*'answers' of batch size 3"):
        x[3]
    with pytest.raises(IndexError, match="index -4 is out of range"):
        x[-4]
    with pytest.raises(TypeError, match="integers or slices, got str"):
        x["a"]
    with pytest.raises(TypeError, match="got bool"):
        x[True]
    with pytest.raises(TypeError, match="must be a slice"):
        Slice.apply(x, 1)
    with pytest.raises(TypeError, match="must be a Variable"):
        Select.apply(["a", "b"], 0)


def test_no_graph_without_grad():
    x = Variable(["a", "b"], role="answers")
    assert x[0].is_leaf and not x[0].requires_grad
    y = batch(2)
    with afnio.no_grad():
        assert y[1].is_leaf and y[:1].is_leaf


def test_contains_compares_elements():
    x = Variable(["cat", "dog"], role="labels")
    assert "cat" in x and Variable("dog") in x and "cow" not in x
    with pytest.raises(TypeError, match="substring"):
        "a" in Variable("cat")  # noqa: B015


def test_clone_is_a_differentiable_copy():
    x = Variable(["a", "b"], role="drafts", requires_grad=True)
    y = x.clone()
    assert y.data == x.data and y.data is not x.data and y.role == "drafts"
    assert y.grad_fn.name() == "CloneBackward" and not y.is_leaf
    y.backward(Variable(["one", "two"]))
    assert x.grad[0].data == ["one", "two"]
    plain = Variable("c", role="constant").clone()
    assert plain.is_leaf and not plain.requires_grad
    with afnio.no_grad():
        assert x.clone().is_leaf
