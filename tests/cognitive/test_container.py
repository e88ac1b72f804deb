"""Sequential / ModuleList / ModuleDict: torch's indexing, slicing and naming."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from afnio.cognitive import Module, ModuleDict, ModuleList, Parameter, Sequential


class Tag(Module):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.p = Parameter(tag, role=f"parameter of {tag}")

    def forward(self, text: str) -> str:
        return text + self.tag


def tags(container: Module) -> list[str]:
    return [module.tag for module in container]


def test_sequential_naming_forward_and_indexing() -> None:
    a, b, c = Tag("a"), Tag("b"), Tag("c")
    seq = Sequential(a, b, c)
    assert [n for n, _ in seq.named_children()] == ["0", "1", "2"]
    assert [n for n, _ in seq.named_parameters()] == ["0.p", "1.p", "2.p"]
    assert seq("") == "abc"
    assert seq[0] is a and seq[-1] is c
    with pytest.raises(IndexError, match="index 3 is out of range"):
        seq[3]
    sliced = seq[1:]
    assert type(sliced) is Sequential and tags(sliced) == ["b", "c"]
    assert [n for n, _ in sliced.named_children()] == ["1", "2"]  # torch keeps the keys on slices
    named = Sequential(OrderedDict([("first", a), ("second", b)]))
    assert [n for n, _ in named.named_children()] == ["first", "second"]
    assert named[1] is b


def test_sequential_mutation_renumbers() -> None:
    seq = Sequential(Tag("a"), Tag("b"), Tag("c"))
    del seq[0]
    assert [n for n, _ in seq.named_children()] == ["0", "1"] and tags(seq) == ["b", "c"]
    seq.append(Tag("d")).insert(0, Tag("z"))
    assert tags(seq) == ["z", "b", "c", "d"]
    seq.insert(-1, Tag("y"))
    assert tags(seq) == ["z", "b", "c", "y", "d"]
    del seq[1:3]
    assert tags(seq) == ["z", "y", "d"] and list(seq._modules) == ["0", "1", "2"]
    seq[-1] = Tag("e")
    assert tags(seq) == ["z", "y", "e"]
    assert tags(seq + Sequential(Tag("f"))) == ["z", "y", "e", "f"]
    assert seq.pop(0).tag == "z" and len(seq) == 2
    seq.extend([Tag("g")])
    assert tags(seq) == ["y", "e", "g"]
    with pytest.raises(IndexError):
        seq.insert(9, Tag("x"))
    with pytest.raises(TypeError, match="not a Module subclass"):
        Sequential("not a module")


def test_module_list_indexing_slicing_and_naming() -> None:
    layers = ModuleList([Tag("a"), Tag("b"), Tag("c")])
    assert len(layers) == 3 and layers[-1].tag == "c"
    assert [n for n, _ in layers.named_parameters()] == ["0.p", "1.p", "2.p"]
    sliced = layers[::2]
    assert type(sliced) is ModuleList and tags(sliced) == ["a", "c"]
    assert [n for n, _ in sliced.named_children()] == ["0", "1"]  # a new list is renumbered
    with pytest.raises(IndexError, match="index -4 is out of range"):
        layers[-4]
    layers.append(Tag("d"))
    layers.insert(1, Tag("x"))
    assert tags(layers) == ["a", "x", "b", "c", "d"]
    del layers[0]
    assert list(layers._modules) == ["0", "1", "2", "3"] and tags(layers) == ["x", "b", "c", "d"]
    del layers[1:3]
    assert tags(layers) == ["x", "d"]
    layers[0] = Tag("y")
    layers += [Tag("e")]
    assert tags(layers) == ["y", "d", "e"]
    assert tags(layers + ModuleList([Tag("f")])) == ["y", "d", "e", "f"]
    assert layers.pop(-1).tag == "e"
    assert "0" not in dir(layers)
    with pytest.raises(TypeError, match="iterable"):
        layers.extend(3)


def test_module_list_insert_clamps_out_of_range_positions_like_list_insert() -> None:
    layers = ModuleList([Tag("a"), Tag("b")])
    layers.insert(-1, Tag("x"))
    layers.insert(-10, Tag("first"))
    layers.insert(10, Tag("last"))
    assert tags(layers) == ["first", "a", "x", "b", "last"]
    assert list(layers._modules) == ["0", "1", "2", "3", "4"]


def test_module_dict_behaves_like_an_ordered_dict() -> None:
    blocks = ModuleDict({"encoder": Tag("e"), "decoder": Tag("d")})
    assert list(blocks) == ["encoder", "decoder"] and "encoder" in blocks
    assert [n for n, _ in blocks.named_parameters()] == ["encoder.p", "decoder.p"]
    blocks["head"] = Tag("h")
    blocks.update([("tail", Tag("t"))])
    assert list(blocks.keys()) == ["encoder", "decoder", "head", "tail"]
    assert blocks.pop("decoder").tag == "d" and len(blocks) == 3
    del blocks["head"]
    assert [k for k, _ in blocks.items()] == ["encoder", "tail"]
    assert [m.tag for m in blocks.values()] == ["e", "t"]
    with pytest.raises(ValueError, match="has length 1"):
        blocks.update([("only",)])
    blocks.clear()
    assert len(blocks) == 0


def test_train_eval_reach_container_members() -> None:
    net = Module()
    net.layers = ModuleList([Tag("a"), Sequential(Tag("b"))])
    net.eval()
    assert not any(m.training for m in net.modules())
    names = [n for n, _ in net.named_modules()]
    assert names == ["", "layers", "layers.0", "layers.1", "layers.1.0"]
