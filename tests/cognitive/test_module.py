"""Module conformance with torch.nn.Module (expected values follow torch's documented behaviour)."""

from __future__ import annotations

import pytest

import afnio
from afnio.cognitive import Module, Parameter
from afnio.testing import ScriptedModel


class Leaf(Module):
    def __init__(self, tag: str = "q") -> None:
        super().__init__()
        self.q = Parameter(tag, role="leaf parameter")


class Sub(Module):
    def __init__(self) -> None:
        super().__init__()
        self.p1 = Parameter("p1", role="first")
        self.leaf = Leaf()
        self.p2 = Parameter("p2", role="second")


class Net(Module):
    """Own parameters interleaved with sub-modules, plus one module registered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Parameter("a", role="a")
        self.sub = Sub()
        self.b = Parameter("b", role="b")
        shared = Leaf("shared")
        self.shared1 = shared
        self.shared2 = shared


def test_named_parameters_order_is_module_by_module_own_first() -> None:
    names = [name for name, _ in Net().named_parameters()]
    # torch: the root's own parameters in registration order, then each sub-module depth first.
    assert names == ["a", "b", "sub.p1", "sub.p2", "sub.leaf.q", "shared1.q"]


def test_named_parameters_without_dedup_and_prefix_and_recurse() -> None:
    net = Net()
    names = [name for name, _ in net.named_parameters(remove_duplicate=False)]
    assert names == ["a", "b", "sub.p1", "sub.p2", "sub.leaf.q", "shared1.q", "shared2.q"]
    assert [n for n, _ in net.named_parameters(prefix="model")][:3] == [
        "model.a",
        "model.b",
        "model.sub.p1",
    ]
    assert [n for n, _ in net.named_parameters(recurse=False)] == ["a", "b"]
    assert list(net.parameters()) == [p for _, p in net.named_parameters()]


def test_shared_parameter_object_is_yielded_once_under_its_first_name() -> None:
    net = Net()
    net.sub.leaf.q = net.a
    assert [n for n, _ in net.named_parameters()] == ["a", "b", "sub.p1", "sub.p2", "shared1.q"]
    assert "sub.leaf.q" in [n for n, _ in net.named_parameters(remove_duplicate=False)]


def test_named_modules_children_and_duplicates() -> None:
    net = Net()
    assert [n for n, _ in net.named_modules()] == ["", "sub", "sub.leaf", "shared1"]
    assert [n for n, _ in net.named_modules(remove_duplicate=False)] == [
        "",
        "sub",
        "sub.leaf",
        "shared1",
        "shared2",
    ]
    assert [n for n, _ in net.named_modules(prefix="m")][:2] == ["m", "m.sub"]
    assert [n for n, _ in net.named_children()] == ["sub", "shared1"]
    assert list(net.children()) == [net.sub, net.shared1]
    assert list(net.modules()) == [net, net.sub, net.sub.leaf, net.shared1]


def test_none_slots_are_skipped() -> None:
    net = Net()
    net.register_parameter("empty", None)
    net.register_module("nothing", None)
    assert "empty" not in dict(net.named_parameters())
    assert "nothing" not in dict(net.named_modules())
    assert "empty" not in net.state_dict()
    assert net.empty is None and net.nothing is None


def test_train_eval_propagate_and_return_self() -> None:
    net = Net()
    assert all(m.training for m in net.modules())  # modules start in training mode
    assert net.eval() is net
    assert not any(m.training for _, m in net.named_modules(remove_duplicate=False))
    net.sub.train()
    assert net.sub.training and net.sub.leaf.training and not net.training
    assert net.train() is net and all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        net.train("yes")


def test_requires_grad_and_zero_grad() -> None:
    net = Net()
    assert net.requires_grad_(False) is net
    assert not any(p.requires_grad for p in net.parameters())
    net.requires_grad_()
    x = afnio.Variable(" end", role="suffix")
    (net.a + x).backward(afnio.Variable("shorter"))
    grad_list = net.a.grad
    assert [g.data for g in grad_list] == ["shorter"]
    net.zero_grad()
    # torch's default set_to_none=True: a new (empty) list; the old one keeps its gradients.
    assert net.a.grad == [] and net.a.grad is not grad_list and len(grad_list) == 1
    net.a.append_grad(afnio.Variable("again"))
    grad_list = net.a.grad
    net.zero_grad(set_to_none=False)
    # set_to_none=False: emptied in place, as torch zeroes the tensor in place.
    assert net.a.grad is grad_list and grad_list == []
    assert net.empty_grad == net.zero_grad


def test_apply_visits_children_first() -> None:
    net = Net()
    seen: list[str] = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen == ["Leaf", "Sub", "Leaf", "Net"]


def test_setattr_registration_rules() -> None:
    net = Module()
    net.x = 1
    net.x = Parameter("now a parameter")
    assert "x" not in net.__dict__ and "x" in net._parameters
    with pytest.raises(TypeError, match="cannot assign 'str' as parameter 'x'"):
        net.x = "text"
    net.x = None
    assert net._parameters["x"] is None
    plain = afnio.Variable("plain")
    net.v = plain
    assert "v" not in net._buffers and "v" not in dict(net.named_parameters())
    net.register_buffer("buf", afnio.Variable("b"))
    with pytest.raises(TypeError, match="as buffer 'buf'"):
        net.buf = "raw"
    net.child = Module()
    with pytest.raises(TypeError, match="as child module 'child'"):
        net.child = 3
    with pytest.raises(KeyError, match="attribute 'v' already exists"):
        net.register_parameter("v", Parameter("p"))
    with pytest.raises(KeyError, match="contain"):
        net.register_parameter("a.b", Parameter("p"))
    with pytest.raises(KeyError, match="empty string"):
        net.register_buffer("", None)
    with pytest.raises(TypeError, match="is not a Module subclass"):
        net.add_module("m", "not a module")
    non_leaf = Parameter("p")
    non_leaf.grad_fn = (Parameter("x") + "y").grad_fn
    with pytest.raises(ValueError, match="non-leaf"):
        net.register_parameter("y", non_leaf)


def test_assignment_before_init_is_refused() -> None:
    class Early(Module):
        def __init__(self) -> None:
            self.p = Parameter("too early")
            super().__init__()

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Early()


def test_delattr_and_dir() -> None:
    net = Net()
    net.register_buffer("buf", afnio.Variable("b"))
    names = dir(net)
    for name in ("a", "sub", "buf", "forward", "training"):
        assert name in names
    del net.a
    del net.sub
    del net.buf
    assert [n for n, _ in net.named_parameters()] == ["b", "shared1.q"]
    with pytest.raises(AttributeError, match="'Net' object has no attribute 'a'"):
        getattr(net, "a")  # noqa: B009 - attribute access is what is tested


def test_buffers_and_persistence() -> None:
    net = Module()
    net.register_buffer("kept", afnio.Variable("k", role="kept buffer"))
    net.register_buffer("temp", afnio.Variable("t"), persistent=False)
    assert [n for n, _ in net.named_buffers()] == ["kept", "temp"]
    assert list(net.state_dict()) == ["kept"]
    net.register_buffer("temp", afnio.Variable("t2"), persistent=True)
    assert list(net.state_dict()) == ["kept", "temp"]


def test_repr_tree_with_extra_repr() -> None:
    class WithExtra(Module):
        def extra_repr(self) -> str:
            return "size=3"

    net = Module()
    net.inner = Sub()
    net.tagged = WithExtra()
    assert repr(WithExtra()) == "WithExtra(size=3)"
    assert repr(net) == (
        "Module(\n  (inner): Sub(\n    (leaf): Leaf()\n  )\n  (tagged): WithExtra(size=3)\n)"
    )


def test_model_clients_chats_configs_and_functions_register() -> None:
    net = Module()
    client = ScriptedModel(["hi"])
    net.client = client
    net.chat = [{"role": "system", "content": [Parameter("Be brief.", role="system prompt")]}]
    net.register_completion_config("completion_args", {"temperature": 0})
    net.register_function("score", len)
    assert net._models["client"] is client and net.client is client
    assert "chat" in net._chats
    assert net.completion_args == {"temperature": 0}
    assert net.score("abc") == 3
    with pytest.raises(TypeError, match="model 'client'"):
        net.client = "gpt"
    with pytest.raises(TypeError, match="completion config"):
        net.completion_args = ["not", "a", "dict"]
    with pytest.raises(TypeError, match="function 'score'"):
        net.score = 3
    net.client = None
    assert "client" not in net.state_dict()
    assert "score" not in net.state_dict()  # functions are code, not state


def test_forward_missing_and_trainer_hooks() -> None:
    net = Module()
    with pytest.raises(RuntimeError, match='missing the required "forward"'):
        net("x")
    for hook in ("training_step", "validation_step", "test_step"):
        with pytest.raises(RuntimeError, match=f"override {hook}"):
            getattr(net, hook)([], 0)
    with pytest.raises(RuntimeError, match="override configure_optimizers"):
        net.configure_optimizers()
    with pytest.raises(RuntimeError, match="no optimizers are attached"):
        net.optimizers()
    assert Module.automatic_optimization is True
    net._optimizers = ["only"]
    assert net.optimizers() == "only"
    net._optimizers = ["a", "b"]
    assert net.optimizers() == ["a", "b"]


def test_get_submodule_and_get_parameter() -> None:
    net = Net()
    assert net.get_submodule("") is net and net.get_submodule("sub.leaf") is net.sub.leaf
    assert net.get_parameter("sub.leaf.q") is net.sub.leaf.q and net.get_parameter("a") is net.a
    with pytest.raises(AttributeError, match="Sub has no attribute `nope`"):
        net.get_submodule("sub.nope")
    with pytest.raises(AttributeError, match="`p1` is not an afnio.cognitive.Module"):
        net.get_submodule("sub.p1")
    with pytest.raises(AttributeError, match="`leaf` is not an afnio.cognitive.Parameter"):
        net.get_parameter("sub.leaf")
