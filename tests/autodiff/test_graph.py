"""Graph pieces: leaf sinks, edges, gradient roles, empty gradients and fan-in combination."""

from afnio import Variable
from afnio.autodiff.graph import (
    AccumulateGrad,
    combine_gradients,
    empty_gradient,
    gradient_edge,
    gradient_role,
)


def test_a_leaf_sink_appends_only_real_gradients():
    x = Variable("x", role="draft", requires_grad=True)
    sink = gradient_edge(x).node
    assert isinstance(sink, AccumulateGrad) and sink.variable is x
    first, second = Variable("shorter"), Variable("politer")
    assert sink.apply([first]) == ()
    sink.apply([None])
    sink.apply([])
    sink(second)
    assert x.grad == [first, second]


def test_edges_name_output_zero_of_a_leaf_sink_or_none_like_torch():
    x = Variable("x", requires_grad=True)
    constant = Variable("c")
    y = x + constant
    assert y.grad_fn.next_functions == ((gradient_edge(x).node, 0), (None, 0))
    assert gradient_edge(x) == (x._grad_accumulator, 0)
    assert gradient_edge(constant) == (None, 0)
    assert gradient_edge(y) == (y.grad_fn, 0)


def test_gradient_roles_and_empty_gradients():
    assert gradient_role("draft") == "feedback to draft"
    assert gradient_role("") == "feedback"
    scalar, batch = empty_gradient("draft", None), empty_gradient("drafts", 3)
    assert (scalar.data, scalar.role) == ("", "feedback to draft")
    assert (batch.data, batch.role) == (["", "", ""], "feedback to drafts")
    x = Variable(["a", "b"], role="drafts", requires_grad=True)
    y = x + "!"
    y.retain_grad()
    y.backward(["fix a", ""])  # raw root feedback gets the root's gradient role
    assert y.grad[0].role == f"feedback to {y.role}"


def test_combining_keeps_a_single_piece_and_joins_several():
    only = Variable("be brief", role="feedback to answer")
    assert combine_gradients([only], "answer", None) is only
    none = combine_gradients([], "answer", None)
    assert (none.data, none.role) == ("", "feedback to answer")
    assert combine_gradients([], "answers", 2).data == ["", ""]
    numbers = combine_gradients([Variable(1), Variable(""), Variable("two")], "count", None)
    assert (numbers.data, numbers.role) == ("1\n\ntwo", "feedback to count")
    batches = combine_gradients(
        [Variable(["a", ""]), Variable([3, 4])], "answers", 2, separator=" | "
    )
    assert batches.data == ["a | 3", "4"]

