"""Random gradient graphs for the engine's properties (imported by the property tests here).

Every leaf, root and op output carries distinct text, and each op labels the gradient it passes
to input *i* as ``op<k>.<i><...>``, so a gradient delivered to the wrong input, combined in the
wrong order or appended in completion order shows up as a different ``grad`` list.
"""

from hypothesis import strategies as st

from afnio import Variable


def labelled(label, i, size, grad_output):
    """The gradient op ``label`` passes to its input ``i`` (``size``: the input's batch size)."""
    if size is None:
        text = grad_output.data
        if isinstance(text, list):
            text = "|".join(text)
        return Variable(f"{label}.{i}<{text}>")
    return Variable([f"{label}.{i}<{t}>" for t in grad_output.data])


def op_output(label, inputs):
    """The inputs' batch sizes and the op's output, naming the op and its inputs' roles."""
    sizes = [v.batch_size for v in inputs]
    size = next((s for s in sizes if s is not None), None)
    text = f"{label}(" + ",".join(v.role for v in inputs) + ")"
    return sizes, Variable(text if size is None else [f"{text}e{i}" for i in range(size)],
                           role=label)


@st.composite
def graph_recipes(draw, kinds, max_inputs):
    """``(batch, leaf_batched, ops, n_roots)``: each op a kind from ``kinds`` (``"add"`` or an
    op of the caller's) reading 1 to ``max_inputs`` earlier values."""
    batch = draw(st.sampled_from([None, 2, 3]))
    n_leaves = draw(st.integers(1, 4))
    leaf_batched = [draw(st.booleans()) and batch is not None for _ in range(n_leaves)]
    ops = []
    for k in range(draw(st.integers(2, 8))):
        picks = draw(st.lists(st.integers(0, n_leaves + k - 1), min_size=1, max_size=max_inputs))
        ops.append((draw(st.sampled_from(kinds)), picks))
    return batch, leaf_batched, ops, draw(st.integers(1, min(3, len(ops))))


def build(recipe, gate, functions):
    """The recipe's graph: distinct leaves, the ops (``functions[kind].apply(label, gate,
    inputs)``; ``"add"`` is ``+`` of the first two inputs, or the first of ``functions`` when
    it has only one), the last ``n_roots`` values as
    roots (leaves dropped), and distinct feedback per root and per element."""
    batch, leaf_batched, ops, n_roots = recipe
    leaves = [
        Variable([f"l{i}e{k}" for k in range(batch)] if batched else f"l{i}", role=f"leaf{i}",
                 requires_grad=True)
        for i, batched in enumerate(leaf_batched)
    ]
    values = list(leaves)
    for k, (kind, picks) in enumerate(ops):
        chosen = [values[p] for p in picks]
        if kind == "add" and len(chosen) >= 2:
            values.append(chosen[0] + chosen[1])
        else:
            function = functions[kind if kind != "add" else next(iter(functions))]
            values.append(function.apply(f"op{k}", gate, chosen))
    roots = [r for r in values[-n_roots:] if not r.is_leaf] or [values[-1]]
    grads = [
        Variable([f"root{i}e{k}" for k in range(r.batch_size)] if r.is_batched else f"root{i}")
        for i, r in enumerate(roots)
    ]
    return leaves, roots, grads


def grads_of(leaves):
    return [[g.data for g in leaf.grad] for leaf in leaves]
