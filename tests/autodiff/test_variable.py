"""Variable: data validation, shape, autograd flags, copy/detach, repr."""

import copy

import pytest

import afnio
from afnio import Variable


@pytest.mark.parametrize("bad", [None, {"a": 1}, True, object(), ["a", 1], [None], [["nested"]]])
def test_invalid_data_raises_type_error_naming_the_type(bad):
    with pytest.raises(TypeError) as info:
        Variable(bad, role="system prompt")
    assert "system prompt" in str(info.value)


def test_tuple_becomes_list_and_batch_shape():
    v = Variable(("a", "b"), role="answers")
    assert v.data == ["a", "b"] and v.batch_size == 2 and v.is_batched and len(v) == 2
    scalar = Variable(3.5)
    assert scalar.batch_size is None and scalar.is_floating_point()
    with pytest.raises(TypeError):
        len(scalar)


def test_leaf_flags_and_requires_grad_on_non_leaf():
    x = Variable("a", role="x", requires_grad=True)
    y = x + "b"
    assert x.is_leaf and not y.is_leaf and y.requires_grad
    assert y.grad_fn.name() == "AddBackward"
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad_(False)
    y.requires_grad_(True)


def test_to_converts_types_and_reports_bad_values():
    v = Variable(["1", "2"], role="counts", requires_grad=True)
    ints = v.to(int)
    assert ints.data == [1, 2] and ints.requires_grad and ints.is_leaf
    assert ints.to(int) is ints
    with pytest.raises(ValueError, match="counts"):
        Variable("x", role="counts").to(float)
    with pytest.raises(TypeError):
        v.to(list)


def test_detach_and_copy_():
    x = Variable(["a", "b"], role="x", requires_grad=True)
    d = x.detach()
    assert d.data == x.data and d.data is not x.data and not d.requires_grad
    with pytest.raises(RuntimeError, match="in-place"):
        x.copy_(Variable(["c", "d"]))
    with afnio.no_grad():
        x.copy_(Variable(["c", "d"]))
        x.copy_("z")  # a scalar broadcasts into the batch
        with pytest.raises(ValueError, match="batch size"):
            x.copy_(["only one"])
    assert x.data == ["z", "z"]


def test_copy_keeps_a_scalar_scalar():
    x = Variable("a", role="answer")
    with pytest.raises(ValueError, match=r"'answer' \(a scalar\)"):
        x.copy_(["b", "c"])
    with pytest.raises(ValueError, match=r"'answer' \(a scalar\)"):
        x.copy_(Variable(["b"]))
    assert x.data == "a"
    assert x.copy_(Variable("b")).data == "b"


def test_append_grad_checks_shape():
    x = Variable(["a", "b"], role="answers", requires_grad=True)
    x.append_grad(Variable(["", "shorter"]))
    with pytest.raises(ValueError, match="answers"):
        x.append_grad(Variable("scalar feedback"))
    with pytest.raises(TypeError):
        x.append_grad("not a variable")
    assert [g.data for g in x.grad] == [["", "shorter"]]


def test_retain_grad_keeps_non_leaf_gradient():
    x = Variable("a", role="x", requires_grad=True)
    y = x + "b"
    y.retain_grad()
    z = y + "c"
    z.backward(Variable("feedback"))
    assert [g.data for g in y.grad] == ["feedback"]
    with pytest.raises(RuntimeError):
        Variable("c").retain_grad()


def test_iadd_in_place_without_grad_and_out_of_place_with_grad():
    plain = Variable("a")
    same = plain
    plain += "b"
    assert plain is same and plain.data == "ab"
    tracked = Variable("a", requires_grad=True)
    before = tracked
    tracked += "b"
    assert tracked is not before and tracked.grad_fn is not None and before.data == "a"


def test_repr_is_short_and_str_is_data():
    v = Variable("x" * 500, role="a very long system prompt " * 5, requires_grad=True)
    assert len(repr(v)) < 160 and "requires_grad=True" in repr(v)
    assert str(Variable(["a"])) == "['a']"
    assert "AddBackward" in repr(v + "y")


def test_deepcopy_of_leaf_and_error_for_non_leaf():
    x = Variable("a", role="x", requires_grad=True)
    x.append_grad(Variable("g"))
    clone = copy.deepcopy(x)
    assert clone.data == "a" and clone.requires_grad and clone.grad[0].data == "g"
    assert clone.grad[0] is not x.grad[0]
    with pytest.raises(RuntimeError, match="leaves"):
        copy.deepcopy(x + "b")


@pytest.mark.parametrize("flag", ["no", "False", 1, 0, None, [True]])
def test_requires_grad_must_be_a_bool(flag):
    # Issue 14, defect 9: Variable('x', requires_grad='no') became True.
    with pytest.raises(TypeError, match="role 'answer': requires_grad must be a bool"):
        Variable("x", role="answer", requires_grad=flag)
    variable = Variable("x", role="answer")
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        variable.requires_grad_(flag)
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        variable.requires_grad = flag
    assert variable.requires_grad is False
