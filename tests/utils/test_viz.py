"""Graph drawing: structure and escaping of the DOT, Mermaid and HTML outputs."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.autodiff import Function
from afnio.autodiff.basic_ops import Add, Split, Sum
from afnio.utils.viz import collect_graph, save_html, shorten, to_dot, to_html, to_mermaid

NASTY_ROLE = 'csv "line" <1>'
NASTY_FEEDBACK = 'be "clear" <b>\n{x} & #1; `q`|'


class Shout(Function):
    """A custom Function for the drawings."""

    @staticmethod
    def forward(ctx, text):
        data = [t.upper() for t in text.data] if text.is_batched else text.data.upper()
        return afnio.Variable(data, role=f"shouted {text.role}")

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def build_graph():
    """csv --Split--> part 0 --Sum(with suffix)--> Shout --Add(with part 1)--> out."""
    x = afnio.Variable("a,b", role=NASTY_ROLE, requires_grad=True)
    first, second = Split.apply(x, ",")
    suffix = afnio.Variable("{z}\nw", role="suffix {x}", requires_grad=True)
    total = Sum.apply([first, suffix])
    out = Add.apply(Shout.apply(total), second)
    out.backward(afnio.Variable(NASTY_FEEDBACK))
    return x, suffix, out


# --------------------------------------------------------------------------- DOT
DOT_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')


def dot_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "l" else m.group(1), text)


def parse_dot(dot: str):
    nodes, edges = {}, []
    for line in dot.splitlines()[2:-1]:
        node = re.fullmatch(r'  (n\d+) \[label="((?:[^"\\]|\\.)*)", (.*)\];', line)
        edge = re.fullmatch(r'  (n\d+) -> (n\d+)(?: \[label="((?:[^"\\]|\\.)*)"\])?;', line)
        assert node or edge, f"unexpected DOT line {line!r}"
        if node:
            nodes[node.group(1)] = dot_unescape(node.group(2))
        else:
            label = dot_unescape(edge.group(3)) if edge.group(3) else ""
            edges.append((edge.group(1), edge.group(2), label))
    return nodes, edges


def titled(nodes, edges):
    title = {node_id: label.split("\n")[0] for node_id, label in nodes.items()}
    return sorted((title[a], title[b], label) for a, b, label in edges)


def test_dot_structure_of_basic_ops_and_custom_function():
    x, suffix, out = build_graph()
    dot = to_dot(out)
    assert dot.startswith("digraph afnio {\n") and dot.endswith("}\n")
    nodes, edges = parse_dot(dot)
    assert len(nodes) == 7
    titles = sorted(label.split("\n")[0] for label in nodes.values())
    assert titles == sorted(
        [
            "AddBackward",
            "ShoutBackward",
            "SumBackward",
            "SplitBackward",
            NASTY_ROLE,
            "suffix {x}",
            shorten(out.role),
        ]
    )
    out_title = shorten(out.role)
    total_role = f"sum of part 0 of {NASTY_ROLE}, suffix {{x}}"
    assert titled(nodes, edges) == sorted(
        [
            (NASTY_ROLE, "SplitBackward", ""),
            ("SplitBackward", "SumBackward", f"part 0 of {NASTY_ROLE}"),
            ("SplitBackward", "AddBackward", f"part 1 of {NASTY_ROLE}"),
            ("suffix {x}", "SumBackward", ""),
            ("SumBackward", "ShoutBackward", total_role),
            ("ShoutBackward", "AddBackward", shorten(f"shouted {total_role}")),
            ("AddBackward", out_title, ""),
        ]
    )


def test_dot_labels_escape_quotes_newlines_and_backslashes():
    x, suffix, out = build_graph()
    dot = to_dot(out, max_chars=500)
    for match in DOT_STRING.finditer(dot):
        assert "\n" not in match.group(1)
    nodes, _ = parse_dot(dot)
    leaf = next(label for label in nodes.values() if label.startswith(NASTY_ROLE))
    assert leaf == f"{NASTY_ROLE}\ndata: a,b\ngrad: {x.grad[0].data}\n"
    assert NASTY_FEEDBACK in leaf
    suffix_label = next(label for label in nodes.values() if label.startswith("suffix"))
    assert suffix_label == f"suffix {{x}}\ndata: {{z}}\nw\ngrad: {NASTY_FEEDBACK}\n"

    tricky = afnio.Variable('C:\\new "dir"', role="path\\", requires_grad=True)
    nodes, _ = parse_dot(to_dot(tricky))
    assert list(nodes.values()) == ['path\\\ndata: C:\\new "dir"\n']


# --------------------------------------------------------------------------- Mermaid
def mermaid_unescape(text: str) -> str:
    return re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), text.replace("<br/>", "\n"))


def parse_mermaid(text: str):
    lines = text.splitlines()
    assert lines[0] == "flowchart TB"
    nodes, edges, classes = {}, [], {}
    for line in lines[1:]:
        if line.startswith("  classDef "):
            continue
        node = re.fullmatch(r'  (n\d+)\["([^"]*)"\]', line)
        klass = re.fullmatch(r"  class (n\d+) (leaf|op|variable)", line)
        edge = re.fullmatch(r'  (n\d+) -->(?:\|"([^"]*)"\|)? (n\d+)', line)
        assert node or klass or edge, f"unexpected Mermaid line {line!r}"
        for raw in (node.group(2) if node else "", edge.group(2) or "" if edge else ""):
            # Only entity codes and <br/> may carry special characters inside a label.
            assert not re.search(r'["<>{}\[\]()|`;&]', re.sub(r"#\d+;|<br/>", "", raw))
        if node:
            nodes[node.group(1)] = mermaid_unescape(node.group(2))
        elif klass:
            classes[klass.group(1)] = klass.group(2)
        else:
            edges.append((edge.group(1), edge.group(3), mermaid_unescape(edge.group(2) or "")))
    return nodes, edges, classes


def test_mermaid_structure_and_escaping():
    x, suffix, out = build_graph()
    nodes, edges, classes = parse_mermaid(to_mermaid(out, max_chars=500))
    by_kind = {}
    for node_id, kind in classes.items():
        by_kind.setdefault(kind, []).append(nodes[node_id].split("\n")[0])
    assert sorted(by_kind["op"]) == ["AddBackward", "ShoutBackward", "SplitBackward", "SumBackward"]
    assert sorted(by_kind["leaf"]) == sorted([NASTY_ROLE, "suffix {x}"])
    assert by_kind["variable"] == [out.role]
    leaf = next(label for label in nodes.values() if label.startswith(NASTY_ROLE))
    assert leaf == f"{NASTY_ROLE}\ndata: a,b\ngrad: {x.grad[0].data}"
    assert titled(nodes, edges) == titled(*parse_dot(to_dot(out, max_chars=500)))


# --------------------------------------------------------------------------- HTML
class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.text, self.rects, self.lines, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "rect":
            self.rects.append(attributes)
        elif tag == "line":
            self.lines.append(attributes)
        elif tag not in ("meta", "path", "!doctype"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "rect":
            self.rects.append(dict(attrs))
        elif tag == "line":
            self.lines.append(dict(attrs))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_balanced_and_shows_unescaped_text(tmp_path):
    x, suffix, out = build_graph()
    page = to_html(out, max_chars=500)
    assert page.startswith("<!DOCTYPE html>")
    lowered = page.lower()
    for forbidden in ("http:", "https:", "<script", "src=", "<link", "@import"):
        assert forbidden not in lowered
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    text = "".join(parser.text)
    for expected in (NASTY_ROLE, 'grad: [part 0] be "clear" <b>', "{x} & #1; `q`|", "data: {z}"):
        assert expected in text
    for raw in ('"clear" <b>', "<1>"):
        assert raw not in page  # only the escaped forms appear in the markup
    assert len(parser.rects) == 7
    assert len(parser.lines) == 7

    path = save_html(out, tmp_path / "graph.html")
    assert path.read_text(encoding="utf-8") == to_html(out)


def test_html_layout_points_arrows_down_and_keeps_boxes_apart():
    x, suffix, out = build_graph()
    parser = Collector()
    parser.feed(to_html(out))
    boxes = {}
    for tag, attributes in parser.tags:
        if tag == "g" and "id" in attributes:
            current = attributes["id"]
        if tag == "rect":
            boxes[current] = [float(attributes[k]) for k in ("x", "y", "width", "height")]
    for line in parser.lines:
        source, target = boxes[line["data-source"]], boxes[line["data-target"]]
        assert source[1] + source[3] < target[1]
        assert float(line["y1"]) < float(line["y2"])
    items = list(boxes.values())
    for i, (x1, y1, w1, h1) in enumerate(items):
        for x2, y2, w2, h2 in items[i + 1 :]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


# --------------------------------------------------------------------------- collect_graph
def test_collect_graph_is_deterministic_and_shares_nodes_between_roots():
    x = afnio.Variable(["a b", "c d"], role="pairs", requires_grad=True)
    first, second = Split.apply(x)
    assert to_dot([first, second]) == to_dot([first, second])
    nodes, edges = collect_graph([first, second])
    assert [node.kind for node in nodes] == ["op", "leaf", "variable", "variable"]
    assert [node.title for node in nodes] == [
        "SplitBackward",
        "pairs",
        "part 0 of pairs",
        "part 1 of pairs",
    ]
    assert [(e.source, e.target) for e in edges] == [("n1", "n0"), ("n0", "n2"), ("n0", "n3")]


def test_batch_edges_name_the_batch_size_and_retained_grads_show_on_the_op():
    x = afnio.Variable(["a", "b"], role="letters", requires_grad=True)
    shouted = Shout.apply(x)
    shouted.retain_grad()
    out = Add.apply(shouted, "!")
    out.backward(afnio.Variable(["fine", ""]))
    nodes, edges = collect_graph(out)
    assert ("shouted letters [batch of 2]") in [edge.label for edge in edges]
    shout = next(node for node in nodes if node.title == "ShoutBackward")
    assert shout.fields == [("grad of output 0", ["fine", ""])]
    leaf = next(node for node in nodes if node.kind == "leaf")
    assert leaf.fields == [("data", ["a", "b"]), ("grad", ["fine", ""])]


def test_leaves_and_plain_variables_draw_as_one_node():
    parameter = afnio.Variable("p", role="prompt", requires_grad=True)
    parameter.append_grad(afnio.Variable("one"))
    parameter.append_grad(afnio.Variable("two"))
    nodes, edges = collect_graph(parameter)
    assert [(n.kind, n.title) for n in nodes] == [("leaf", "prompt")]
    assert nodes[0].fields == [("data", "p"), ("grad[0]", "one"), ("grad[1]", "two")]
    assert edges == []
    nodes, _ = collect_graph(afnio.Variable(3, role=""))
    assert [(n.kind, n.title, n.fields) for n in nodes] == [
        ("variable", "(no role)", [("data", 3)])
    ]


def test_inputs_without_grad_are_not_drawn():
    prompt = afnio.Variable("Hi ", role="prompt", requires_grad=True)
    out = prompt + afnio.Variable("Ann", role="name")
    assert [n.title for n in collect_graph(out)[0]] == ["AddBackward", "prompt", out.role]


def test_non_variable_input_is_rejected_with_its_position():
    with pytest.raises(TypeError, match=r"'variables'.*str at position 1"):
        to_dot([afnio.Variable("a"), "b"])


@given(st.text(), st.integers(min_value=1, max_value=80))
def test_shorten_never_exceeds_the_limit(text, limit):
    short = shorten(text, limit)
    assert len(short) <= limit
    assert short == text or (short.endswith("…") and text.startswith(short[:-1]))


def test_grad_component_nodes_show_their_traced_inputs_and_response():
    from afnio.cognitive import fun_to_grad_component

    def shout(text):
        return text.upper() + "!"

    component = fun_to_grad_component(desc="Shouts")(shout)
    x = afnio.Variable("hi <there>", role="greeting", requires_grad=True)
    nodes, edges = collect_graph(component(x))
    assert nodes[0].kind == "op" and nodes[0].title.endswith("Backward")
    assert nodes[0].fields == [("inputs", "arg_0='hi <there>'"), ("response", "HI <THERE>!")]
    assert [(e.source, e.target) for e in edges] == [("n1", "n0"), ("n0", "n2")]
