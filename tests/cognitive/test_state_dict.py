"""state_dict / load_state_dict: torch's keys, strictness and error text; afnio's registries."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.cognitive import Module, Parameter
from afnio.models.model import ChatCompletionModel, Completion, register_client_class
from afnio.testing import ScriptedModel


class Leaf(Module):
    def __init__(self, text: str = "q") -> None:
        super().__init__()
        self.q = Parameter(text, role="leaf parameter")


class Net(Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Parameter("a", role="a")
        self.sub = Leaf()
        self.register_buffer("buf", afnio.Variable(["x", "y"], role="buffer"))
        shared = Leaf("shared")
        self.shared1 = shared
        self.shared2 = shared


class SecretClient(ChatCompletionModel):
    """A client holding an API key that must never reach a state dict."""

    provider = "secret"

    def __init__(self, model: str = "m", api_key: str = "sk-live-123", **options: Any) -> None:
        super().__init__(model, **options)
        self.api_key = api_key

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        return Completion(text="ok", prompt_tokens=1, completion_tokens=1)


def test_state_dict_keys_values_and_keep_vars() -> None:
    net = Net()
    state = net.state_dict()
    # torch: own parameters, then own buffers, then each child (shared children repeat).
    assert list(state) == ["a", "buf", "sub.q", "shared1.q", "shared2.q"]
    assert type(state).__name__ == "OrderedDict"
    assert state["a"] is not net.a and state["a"].data == "a" and not state["a"].requires_grad
    assert state["buf"].data == ["x", "y"]
    kept = net.state_dict(keep_vars=True)
    assert kept["a"] is net.a and kept["shared1.q"] is kept["shared2.q"]
    assert list(net.state_dict(prefix="model."))[0] == "model.a"
    destination: dict[str, Any] = {}
    assert net.state_dict(destination=destination) is destination


def test_load_state_dict_copies_data_in_place() -> None:
    source, target = Net(), Net()
    source.a.data = "new a"
    source.sub.q.data = "new q"
    param = target.a
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert repr(result) == "<All keys matched successfully>"
    assert target.a is param and param.data == "new a" and target.sub.q.data == "new q"
    assert param.role == "a" and param.requires_grad


def test_strict_errors_use_torch_text_and_key_order() -> None:
    net = Net()
    state = net.state_dict()
    del state["a"]
    del state["sub.q"]
    state["sub.extra"] = afnio.Variable("x")  # visited when loading `sub`: listed second
    state["extra"] = afnio.Variable("x")
    state["nosuch.x"] = afnio.Variable("x")
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(state)
    assert str(info.value) == (
        "Error(s) in loading state_dict for Net:\n"
        '\tMissing key(s) in state_dict: "a", "sub.q". \n'
        '\tUnexpected key(s) in state_dict: "extra", "nosuch.x", "sub.extra". '
    )


def test_non_strict_reports_keys_without_raising() -> None:
    net = Net()
    state = net.state_dict()
    del state["a"]
    state["extra"] = afnio.Variable("x")
    state["sub.q"] = afnio.Variable("loaded")
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["a"] and result.unexpected_keys == ["extra"]
    assert net.sub.q.data == "loaded"


def test_failed_load_changes_nothing() -> None:
    net = Net()
    state = net.state_dict()
    state["a"] = afnio.Variable("would change")
    state["sub.q"] = "not a Variable"
    with pytest.raises(RuntimeError, match='While copying the parameter named "sub.q"'):
        net.load_state_dict(state)
    assert net.a.data == "a"
    state = net.state_dict()
    state["buf"] = afnio.Variable("scalar")
    with pytest.raises(RuntimeError, match="size mismatch for buf"):
        net.load_state_dict(state)
    assert net.buf.data == ["x", "y"]
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
        net.load_state_dict([("a", afnio.Variable("x"))])


def test_assign_replaces_objects() -> None:
    net = Net()
    state = Net().state_dict()
    state["a"] = afnio.Variable("assigned", role="a")
    old = net.a
    net.load_state_dict(state, assign=True)
    assert net.a is not old and isinstance(net.a, Parameter)
    assert net.a.data == "assigned" and net.a.requires_grad
    assert net.a in list(net.parameters())


def test_extra_state_round_trip_and_strictness() -> None:
    class Counter(Module):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def get_extra_state(self) -> Any:
            return {"count": self.count}

        def set_extra_state(self, state: Any) -> None:
            self.count = state["count"]

    net = Module()
    net.counter = Counter()
    net.counter.count = 7
    state = net.state_dict()
    assert list(state) == ["counter._extra_state"]
    fresh = Module()
    fresh.counter = Counter()
    fresh.load_state_dict(state)
    assert fresh.counter.count == 7
    missing = 'Missing key\\(s\\) in state_dict: "counter._extra_state"'
    with pytest.raises(RuntimeError, match=missing):
        fresh.load_state_dict({})
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "_extra_state"'):
        Module().load_state_dict({"_extra_state": 1})


def test_model_client_saved_as_config_without_key_and_kept_on_load() -> None:
    net = Module()
    net.client = SecretClient(model="first")
    state = net.state_dict()
    assert state["client"] == {
        "class": f"{SecretClient.__module__}.SecretClient",
        "config": net.client.get_config(),
    }
    assert state["client"]["config"]["model"] == "first"
    assert "sk-live" not in repr(state)
    same = net.client
    net.load_state_dict(state)
    assert net.client is same
    other = Module()
    other.client = live = SecretClient(model="second")
    other.load_state_dict(state)
    assert other.client is live  # by default the live client stays: a file names no client


def test_load_clients_rebuilds_registered_classes_only() -> None:
    register_client_class(SecretClient)
    net = Module()
    net.client = SecretClient(model="first")
    state = net.state_dict()
    other = Module()
    other.client = SecretClient(model="second")
    other.load_state_dict(state, load_clients=True)
    assert isinstance(other.client, SecretClient) and other.client.model == "first"
    assert other.client.api_key == "sk-live-123"  # re-bound from the environment/defaults
    unregistered = {"class": "tests.cognitive.elsewhere.Client", "config": {}}
    with pytest.raises(RuntimeError, match="is not one afnio knows"):
        other.load_state_dict({"client": unregistered}, load_clients=True)


def test_scripted_model_round_trip_and_bad_class() -> None:
    net = Module()
    net.model = ScriptedModel(model="writer", latency=0.0)
    state = net.state_dict()
    fresh = Module()
    fresh.model = live = ScriptedModel(model="other")
    fresh.load_state_dict(state)
    assert fresh.model is live
    fresh.load_state_dict(state, load_clients=True)
    assert fresh.model.model == "writer"
    state["model"] = {"class": "builtins.dict", "config": {}}
    with pytest.raises(RuntimeError, match="'builtins.dict' is not one afnio knows"):
        fresh.load_state_dict(state, load_clients=True)
    state["model"] = "not a description"
    with pytest.raises(RuntimeError, match="expected a .* description"):
        fresh.load_state_dict(state)


def test_a_tampered_state_dict_can_neither_import_nor_redirect_nor_create_files(
    tmp_path, monkeypatch
) -> None:
    # Issue 14, defects 1 and 2: a planted module, another endpoint, a cache path.
    import sys

    from afnio.models.openai import AsyncOpenAI

    planted = tmp_path / "planted_module.py"
    planted.write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-key-never-leaves-0000")
    net = Module()
    net.client = live = AsyncOpenAI("gpt-4.1-nano")
    state = net.state_dict()
    for tampered in (
        {"class": "planted_module.Client", "config": {}},
        {"class": "afnio.models.openai.AsyncOpenAI",
         "config": {"model": "gpt-4.1-nano", "base_url": "http://attacker.invalid/v1",
                    "cache": {"path": str(tmp_path / "made" / "by-file.sqlite"),
                              "mode": "read_write"}}},
    ):
        state["client"] = tampered
        net.load_state_dict(state)
        assert net.client is live and net.client.base_url is None
    assert "planted_module" not in sys.modules and not (tmp_path / "RAN").exists()
    assert not (tmp_path / "made").exists()


def test_chats_and_completion_configs_round_trip() -> None:
    def build() -> Module:
        module = Module()
        module.messages = [
            {"role": "system", "content": [Parameter("Be brief.", role="system prompt")]},
            {"role": "user", "content": [afnio.Variable("{question}", role="user template")]},
        ]
        module.register_completion_config("completion_args", {"temperature": 0.0})
        return module

    source = build()
    source.messages[0]["content"][0].data = "Be very brief."
    source.completion_args["temperature"] = 0.5
    state = source.state_dict()
    assert list(state) == ["messages", "completion_args"]
    assert state["messages"][0]["content"][0] is not source.messages[0]["content"][0]
    target = build()
    prompt = target.messages[0]["content"][0]
    target.load_state_dict(state)
    assert prompt.data == "Be very brief." and target.messages[0]["content"][0] is prompt
    assert target.completion_args == {"temperature": 0.5}
    state["completion_args"]["temperature"] = 9
    assert target.completion_args == {"temperature": 0.5}  # loaded as a copy
    state["messages"] = state["messages"][:1]
    with pytest.raises(RuntimeError, match="structure mismatch for messages"):
        target.load_state_dict(state)


# ---------------------------------------------------------------------- property


def _tree(draw: st.DrawFn, depth: int) -> Module:
    module = Module()
    for i in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["param", "buffer", "batch"] + (["child"] if depth else [])))
        if kind == "param":
            setattr(module, f"p{i}", Parameter(draw(st.text(max_size=8)), role=f"p{i}"))
        elif kind == "buffer":
            module.register_buffer(f"b{i}", afnio.Variable(draw(st.integers()), role=f"b{i}"))
        elif kind == "batch":
            texts = draw(st.lists(st.text(max_size=5), min_size=1, max_size=3))
            setattr(module, f"p{i}", Parameter(texts, role=f"p{i}"))
        else:
            setattr(module, f"c{i}", _tree(draw, depth - 1))
    return module


@st.composite
def module_trees(draw: st.DrawFn) -> Module:
    return _tree(draw, 2)


def _scramble(module: Module) -> None:
    for _, variable in module.named_parameters():
        variable.data = [v + "!" for v in variable.data] if variable.is_batched else "changed"
    for _, buffer in module.named_buffers():
        buffer.data = buffer.data + 1


@given(module_trees())
def test_state_dict_round_trip_on_random_trees(tree: Module) -> None:
    import copy

    saved = tree.state_dict()
    snapshot = {k: copy.deepcopy(v.data) for k, v in saved.items()}
    clone = copy.deepcopy(tree)
    _scramble(clone)
    result = clone.load_state_dict(saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    reloaded = clone.state_dict()
    assert list(reloaded) == list(saved)
    assert {k: v.data for k, v in reloaded.items()} == snapshot


def test_state_dict_survives_afnio_save_and_load() -> None:
    import io

    from afnio.cognitive import ChatCompletion
    from afnio.serialization import load, save

    class Agent(Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt = Parameter("Be brief.", role="system prompt")
            self.chat = ChatCompletion(ScriptedModel(model="writer"), temperature=0)

    trained = Agent()
    trained.prompt.data = "Be brief and polite."
    buffer = io.BytesIO()
    save(trained.state_dict(), buffer)
    fresh = Agent()
    fresh.chat.forward_model_client = ScriptedModel(model="other")
    result = fresh.load_state_dict(load(io.BytesIO(buffer.getvalue())))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert fresh.prompt.data == "Be brief and polite."
    assert fresh.chat.forward_model_client.model == "other"  # the live client is kept
    assert fresh.chat.completion_args == {"temperature": 0}
    fresh.load_state_dict(load(io.BytesIO(buffer.getvalue())), load_clients=True)
    assert fresh.chat.forward_model_client.model == "writer"
