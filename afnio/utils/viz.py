"""Graph drawing: the graph behind a Variable as Graphviz DOT, Mermaid or a standalone HTML page.

The drawing follows the data forward: leaves (Variables that require grad) at the top, one box
per recorded operation (its ``grad_fn.name()``, plus the inputs and response a GradComponent
traced), and the drawn Variable at the bottom. Leaves and
the drawn Variable show their role, a shortened value and the gradients they hold; an edge out of
an operation is labelled with the role of the Variable that flowed along it. Inputs that need no
gradient are not part of the graph and are not drawn.

The HTML page is self-contained: the layout is computed here and written as inline SVG, so it
shows without network access, JavaScript or system packages.

Example:
    >>> import afnio
    >>> from afnio.utils.viz import to_dot, to_mermaid
    >>> x = afnio.Variable("Hello", role="greeting", requires_grad=True)
    >>> y = x + " world"
    >>> print(to_mermaid(y).splitlines()[0])
    flowchart TB
    >>> "AddBackward" in to_dot(y)
    True
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.graph import AccumulateGrad, Node

__all__ = [
    "GraphEdge",
    "GraphNode",
    "collect_graph",
    "save_html",
    "shorten",
    "to_dot",
    "to_html",
    "to_mermaid",
    "to_svg",
]

_ELLIPSIS = "…"

# (fill, stroke) of each kind of box, shared by every output format.
_COLORS = {
    "leaf": ("#dbeafe", "#1d4ed8"),
    "op": ("#e5e7eb", "#374151"),
    "variable": ("#fef3c7", "#b45309"),
}


@dataclass
class GraphNode:
    """One box of a drawing.

    Attributes:
        id: A stable identifier (``n0``, ``n1``, … in discovery order from the drawn Variable).
        kind: ``"leaf"`` (a Variable that collects gradients), ``"op"`` (a recorded operation) or
            ``"variable"`` (the drawn Variable when it is not a leaf requiring grad).
        title: The operation's name, or the Variable's role.
        fields: ``(name, value)`` pairs shown under the title (data, gradients), unshortened.
    """

    id: str
    kind: str
    title: str
    fields: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class GraphEdge:
    """An arrow from the producer of a value to its consumer, labelled with the value's role."""

    source: str
    target: str
    label: str = ""


def _variable_fields(variable: Variable) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [("data", variable.data)]
    if len(variable.grad) == 1:
        fields.append(("grad", variable.grad[0].data))
    else:
        fields.extend((f"grad[{i}]", grad.data) for i, grad in enumerate(variable.grad))
    return fields


def _variable_title(variable: Variable) -> str:
    kind = type(variable).__name__
    role = variable.role or "(no role)"
    return role if kind == "Variable" else f"{kind}: {role}"


def _trace_fields(node: Node) -> list[tuple[str, Any]]:
    """The inputs and response a traced node (e.g. a GradComponent's) recorded in forward."""
    trace = node.trace
    if not isinstance(trace, dict):
        return []
    fields: list[tuple[str, Any]] = []
    if trace.get("input_args"):
        inputs = ", ".join(f"{name}={value!r}" for name, value in trace["input_args"].items())
        fields.append(("inputs", inputs))
    if "full_response" in trace:
        fields.append(("response", trace["full_response"]))
    return fields


def _edge_label(node: Node, output_nr: int) -> str:
    if isinstance(node, AccumulateGrad):
        return ""
    role, batch_size = node.output_info(output_nr)
    return role if batch_size is None else f"{role} [batch of {batch_size}]"


def collect_graph(
    variables: Variable | Sequence[Variable],
) -> tuple[list[GraphNode], list[GraphEdge]]:
    """Walk the graph behind one or more Variables.

    Nodes are found depth-first through ``grad_fn.next_functions`` in argument order, so the
    result (ids included) is the same on every call for the same graph.

    Args:
        variables: The Variable to draw, or several (e.g. all outputs of a ``Split``).

    Returns:
        The nodes and the edges (producer to consumer) of the drawing.

    Raises:
        TypeError: If something other than a Variable is given.
    """
    roots = [variables] if isinstance(variables, Variable) else list(variables)
    for index, root in enumerate(roots):
        if not isinstance(root, Variable):
            raise TypeError(
                f"collect_graph: argument 'variables' must hold Variables, got "
                f"{type(root).__name__} at position {index}"
            )
    nodes: list[GraphNode] = []
    edges: list[GraphEdge] = []
    ids: dict[int, str] = {}
    operations: list[Node] = []

    def add(kind: str, title: str, fields: list[tuple[str, Any]]) -> str:
        node_id = f"n{len(nodes)}"
        nodes.append(GraphNode(node_id, kind, title, fields))
        return node_id

    def visit(start: Node) -> None:
        stack: list[Node] = [start]
        while stack:
            current = stack.pop()
            if id(current) in ids:
                continue
            if isinstance(current, AccumulateGrad):
                leaf = current.variable
                ids[id(current)] = add("leaf", _variable_title(leaf), _variable_fields(leaf))
                continue
            fields = _trace_fields(current)
            fields.extend(
                (f"grad of output {nr}", grad.data)
                for nr, retained in sorted(current.retained.items())
                for grad in retained.grad
            )
            ids[id(current)] = add("op", current.name(), fields)
            operations.append(current)
            upstream = [edge.node for edge in current.next_functions if edge.node is not None]
            stack.extend(reversed(upstream))

    for root in roots:
        if root.grad_fn is not None:
            visit(root.grad_fn)
        elif root._grad_accumulator is not None:
            visit(root._grad_accumulator)
    for operation in operations:
        for edge in operation.next_functions:
            if edge.node is not None:
                label = _edge_label(edge.node, edge.output_nr)
                edges.append(GraphEdge(ids[id(edge.node)], ids[id(operation)], label))
    for root in roots:
        if root.grad_fn is not None:
            root_id = add("variable", _variable_title(root), _variable_fields(root))
            edges.append(GraphEdge(ids[id(root.grad_fn)], root_id, ""))
        elif root._grad_accumulator is None and id(root) not in ids:
            ids[id(root)] = add(
                "leaf" if root.requires_grad else "variable",
                _variable_title(root),
                _variable_fields(root),
            )
    return nodes, edges


# --------------------------------------------------------------------------- text helpers
def shorten(value: Any, max_chars: int = 60) -> str:
    """A display text for a Variable's data: batches as ``[…]`` lists, cut at ``max_chars``.

    Example:
        >>> shorten("a" * 10, max_chars=5)
        'aaaa…'
        >>> shorten(["x", "y"])
        "['x', 'y']"
    """
    if isinstance(value, list):
        text = "[" + ", ".join(repr(item) for item in value) + "]"
    else:
        text = str(value)
    if len(text) <= max_chars:
        return text
    return text[: max(max_chars - 1, 0)] + _ELLIPSIS


def _lines(node: GraphNode, max_chars: int) -> list[str]:
    """Title first, then one ``name: value`` entry per field (values may contain newlines)."""
    entries = [shorten(node.title, max_chars)]
    entries.extend(f"{name}: {shorten(value, max_chars)}" for name, value in node.fields)
    return entries


# --------------------------------------------------------------------------- Graphviz DOT
# Operations are square boxes; Variables have rounded corners.
_DOT_SHAPE = {"leaf": '"rounded,filled"', "op": "filled", "variable": '"rounded,filled"'}
_DOT_STYLE = {
    kind: f'shape=box, style={_DOT_SHAPE[kind]}, fillcolor="{fill}", color="{stroke}"'
    for kind, (fill, stroke) in _COLORS.items()
}


def _dot_quote(text: str) -> str:
    """A DOT double-quoted string; each newline becomes a left-justified line break."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "")
    return '"' + escaped.replace("\n", "\\l") + '"'


def to_dot(variables: Variable | Sequence[Variable], max_chars: int = 60) -> str:
    """The graph behind ``variables`` as Graphviz DOT text.

    Render it with ``dot -Tsvg graph.dot`` or any Graphviz viewer.

    Args:
        variables: The Variable to draw (or several).
        max_chars: Longest value shown before it is cut with ``…``.

    Returns:
        A ``digraph`` whose nodes are ``n0``, ``n1``, … with quoted, escaped labels.

    Example:
        >>> import afnio
        >>> x = afnio.Variable("a", role="letter", requires_grad=True)
        >>> print(to_dot(x + "b").splitlines()[2].split(",")[0])
          n0 [label="AddBackward\\l"
    """
    nodes, edges = collect_graph(variables)
    out = ["digraph afnio {", '  node [fontname="monospace", fontsize=10];']
    for node in nodes:
        label = _dot_quote("\n".join(_lines(node, max_chars)) + "\n")
        out.append(f"  {node.id} [label={label}, {_DOT_STYLE[node.kind]}];")
    for edge in edges:
        attributes = f" [label={_dot_quote(shorten(edge.label, max_chars))}]" if edge.label else ""
        out.append(f"  {edge.source} -> {edge.target}{attributes};")
    out.append("}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- Mermaid
# Characters that end a Mermaid label or are read as markup; written as Mermaid entity codes.
_MERMAID_ENTITIES = {char: f"#{ord(char)};" for char in '"#&<>{}[]()|`;'}


def _mermaid_quote(text: str) -> str:
    escaped = "".join(_MERMAID_ENTITIES.get(char, char) for char in text.replace("\r", ""))
    return '"' + escaped.replace("\n", "<br/>") + '"'


def to_mermaid(variables: Variable | Sequence[Variable], max_chars: int = 60) -> str:
    """The graph behind ``variables`` as a Mermaid flowchart.

    Special characters in labels are written as Mermaid entity codes (``#34;`` for ``"``) and line
    breaks as ``<br/>``, so any role or value is safe to paste into a Markdown ``mermaid`` block.

    Args:
        variables: The Variable to draw (or several).
        max_chars: Longest value shown before it is cut with ``…``.

    Returns:
        The flowchart text (``flowchart TB`` first).
    """
    nodes, edges = collect_graph(variables)
    out = ["flowchart TB"]
    out.extend(
        f"  classDef {kind} fill:{fill},stroke:{stroke}" for kind, (fill, stroke) in _COLORS.items()
    )
    for node in nodes:
        out.append(f"  {node.id}[{_mermaid_quote(chr(10).join(_lines(node, max_chars)))}]")
        out.append(f"  class {node.id} {node.kind}")
    for edge in edges:
        label = f"|{_mermaid_quote(shorten(edge.label, max_chars))}|" if edge.label else ""
        out.append(f"  {edge.source} -->{label} {edge.target}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTML / SVG
_CHAR_WIDTH = 7.0
_LINE_HEIGHT = 15
_PADDING = 8
_ROW_GAP = 56
_COLUMN_GAP = 24


@dataclass
class _Box:
    node: GraphNode
    lines: list[str]
    width: float
    height: float
    x: float = 0.0
    y: float = 0.0


def _rows(nodes: list[GraphNode], edges: list[GraphEdge]) -> list[list[str]]:
    """Layer the DAG so that every arrow points downwards.

    Each node's layer is its longest distance to a node nobody consumes (the drawn Variables).
    Within a row nodes are ordered by the mean position of their
    consumers, which keeps arrows short and mostly uncrossed.
    """
    consumers: dict[str, list[str]] = {node.id: [] for node in nodes}
    producers: dict[str, list[str]] = {node.id: [] for node in nodes}
    for edge in edges:
        consumers[edge.source].append(edge.target)
        producers[edge.target].append(edge.source)
    pending = {node_id: len(targets) for node_id, targets in consumers.items()}
    layer = {node_id: 0 for node_id in consumers}
    queue = [node_id for node_id, count in pending.items() if count == 0]
    while queue:
        current = queue.pop()
        for producer in producers[current]:
            layer[producer] = max(layer[producer], layer[current] + 1)
            pending[producer] -= 1
            if pending[producer] == 0:
                queue.append(producer)
    depth = max(layer.values(), default=0)
    order = {node.id: index for index, node in enumerate(nodes)}
    rows: list[list[str]] = [[] for _ in range(depth + 1)]
    for node in nodes:
        rows[depth - layer[node.id]].append(node.id)
    position: dict[str, float] = {}
    for row in reversed(rows):

        def barycenter(node_id: str) -> tuple[float, int]:
            placed = [position[c] for c in consumers[node_id] if c in position]
            mean = sum(placed) / len(placed) if placed else float(order[node_id])
            return mean, order[node_id]

        row.sort(key=barycenter)
        for index, node_id in enumerate(row):
            position[node_id] = index - (len(row) - 1) / 2
    return rows


def _layout(
    nodes: list[GraphNode], edges: list[GraphEdge], max_chars: int
) -> tuple[dict[str, _Box], float, float]:
    boxes: dict[str, _Box] = {}
    for node in nodes:
        lines = [line for entry in _lines(node, max_chars) for line in entry.split("\n")]
        width = max(len(line) for line in lines) * _CHAR_WIDTH + 2 * _PADDING
        boxes[node.id] = _Box(node, lines, width, len(lines) * _LINE_HEIGHT + 2 * _PADDING)
    rows = _rows(nodes, edges)
    row_widths = [sum(boxes[i].width for i in row) + _COLUMN_GAP * (len(row) - 1) for row in rows]
    total_width = max(row_widths, default=0) + 2 * _COLUMN_GAP
    y = float(_COLUMN_GAP)
    for row, row_width in zip(rows, row_widths):
        x = (total_width - row_width) / 2
        row_height = max(boxes[i].height for i in row)
        for node_id in row:
            box = boxes[node_id]
            box.x, box.y = x, y + (row_height - box.height) / 2
            x += box.width + _COLUMN_GAP
        y += row_height + _ROW_GAP
    return boxes, total_width, y - _ROW_GAP + _COLUMN_GAP


def _svg(nodes: list[GraphNode], edges: list[GraphEdge], max_chars: int, detail_chars: int) -> str:
    boxes, width, height = _layout(nodes, edges, max_chars)
    out = [
        f'<svg class="afnio-graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#4b5563"/></marker></defs>',
    ]
    for edge in edges:
        source, target = boxes[edge.source], boxes[edge.target]
        x1, y1 = source.x + source.width / 2, source.y + source.height
        x2, y2 = target.x + target.width / 2, target.y
        out.append(
            f'<line class="edge" data-source="{edge.source}" data-target="{edge.target}" '
            f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#4b5563" '
            'marker-end="url(#arrow)"/>'
        )
        if edge.label:
            out.append(
                f'<text class="edge-label" x="{(x1 + x2) / 2:.1f}" y="{(y1 + y2) / 2 + 4:.1f}" '
                f'text-anchor="middle">{html.escape(shorten(edge.label, max_chars))}</text>'
            )
    for node in nodes:
        box = boxes[node.id]
        tooltip = "\n".join(_lines(node, detail_chars))
        fill, stroke = _COLORS[node.kind]
        out.append(f'<g class="node {node.kind}" id="{node.id}">')
        out.append(f"<title>{html.escape(tooltip)}</title>")
        out.append(
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" '
            f'height="{box.height:.1f}" rx="6" fill="{fill}" stroke="{stroke}"/>'
        )
        for index, line in enumerate(box.lines):
            weight = ' font-weight="bold"' if index == 0 else ""
            out.append(
                f'<text x="{box.x + _PADDING:.1f}" '
                f'y="{box.y + _PADDING + (index + 0.8) * _LINE_HEIGHT:.1f}"{weight} '
                f'xml:space="preserve">{html.escape(line)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def to_svg(
    variables: Variable | Sequence[Variable], max_chars: int = 60, detail_chars: int = 2000
) -> str:
    """The graph behind ``variables`` as one inline ``<svg>`` element, as :func:`to_html` draws it.

    Embed it in any HTML page (the run report does); style its text with the
    ``.afnio-graph`` CSS class.

    Args:
        variables: The Variable to draw (or several).
        max_chars: Longest value shown inside a box before it is cut with ``…``.
        detail_chars: Longest value shown in a box's hover text.

    Returns:
        The ``<svg class="afnio-graph" …>`` markup.

    Example:
        >>> import afnio
        >>> x = afnio.Variable("a", role="letter", requires_grad=True)
        >>> to_svg(x + "b").startswith('<svg class="afnio-graph"')
        True
    """
    nodes, edges = collect_graph(variables)
    return _svg(nodes, edges, max_chars, detail_chars)


def to_html(
    variables: Variable | Sequence[Variable],
    max_chars: int = 60,
    title: str = "afnio graph",
    detail_chars: int = 2000,
) -> str:
    """A self-contained HTML page drawing the graph behind ``variables``.

    The layout is computed in Python and embedded as inline SVG: the page needs no network, no
    JavaScript and no Graphviz. Hovering a box shows its values at up to ``detail_chars``.

    Args:
        variables: The Variable to draw (or several).
        max_chars: Longest value shown inside a box before it is cut with ``…``.
        title: The page title.
        detail_chars: Longest value shown in a box's hover text.

    Returns:
        The HTML document.
    """
    nodes, edges = collect_graph(variables)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>",
            "body { font-family: sans-serif; margin: 16px; }",
            ".afnio-graph text { font-family: monospace; font-size: 12px; fill: #111827; }",
            ".afnio-graph .edge-label { fill: #374151; font-size: 11px; paint-order: stroke; "
            "stroke: #ffffff; stroke-width: 4px; }",
            ".legend span { display: inline-block; padding: 2px 8px; margin-right: 8px; "
            "border-radius: 4px; border: 1px solid; font-size: 12px; }",
            "</style>",
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            '<p class="legend">'
            + "".join(
                f'<span style="background:{_COLORS[kind][0]};border-color:{_COLORS[kind][1]}">'
                f"{text}</span>"
                for kind, text in (
                    ("leaf", "leaf (collects gradients)"),
                    ("op", "operation"),
                    ("variable", "drawn variable"),
                )
            )
            + "</p>",
            _svg(nodes, edges, max_chars, detail_chars),
            "</body>",
            "</html>",
            "",
        ]
    )


def save_html(
    variables: Variable | Sequence[Variable],
    path: str | Path,
    max_chars: int = 60,
    title: str = "afnio graph",
) -> Path:
    """Write :func:`to_html` of ``variables`` to ``path`` (UTF-8) and return the path.

    Example:
        >>> import afnio, tempfile, os
        >>> x = afnio.Variable("a", role="letter", requires_grad=True)
        >>> path = save_html(x + "b", os.path.join(tempfile.mkdtemp(), "graph.html"))
        >>> path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        True
    """
    target = Path(path)
    target.write_text(to_html(variables, max_chars=max_chars, title=title), encoding="utf-8")
    return target
