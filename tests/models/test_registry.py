"""Model paths → clients, and the global backward model client."""

import importlib

import pytest

from afnio.models import ChatCompletionModel
from afnio.models.registry import (
    PROVIDERS,
    get_backward_model_client,
    get_backward_model_completion_args,
    get_client,
    parse_model_path,
    set_backward_model_client,
)
from afnio.testing import ScriptedModel


class RecordingModel(ScriptedModel):
    """Stands in for an SDK client: remembers the arguments the registry built it with."""

    def __init__(self, model="", base_url=None, model_path=None, **options):
        super().__init__(model=model or "default", **options)
        self.base_url = base_url
        self.model_path = model_path


@pytest.fixture
def recording_providers(monkeypatch):
    for provider in PROVIDERS:
        monkeypatch.setitem(PROVIDERS, provider, f"{__name__}.RecordingModel")


@pytest.fixture(autouse=True)
def restore_backward_client():
    before = get_backward_model_client(), get_backward_model_completion_args()
    yield
    set_backward_model_client(before[0], completion_args=before[1])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("openai/gpt-4.1-nano", ("openai", "gpt-4.1-nano", {})),
        ("anthropic/claude-haiku-4-5", ("anthropic", "claude-haiku-4-5", {})),
        ("local/smollm2", ("local", "smollm2", {})),
        (
            "local//models/tiny.gguf",
            ("local", "/models/tiny.gguf", {"model_path": "/models/tiny.gguf"}),
        ),
        (
            "openai-compatible/meta-llama/Llama-3.2-1B@http://u:p@127.0.0.1:8000/v1",
            (
                "openai-compatible",
                "meta-llama/Llama-3.2-1B",
                {"base_url": "http://u:p@127.0.0.1:8000/v1"},
            ),
        ),
    ],
)
def test_parse_model_path(path, expected):
    assert parse_model_path(path) == expected


@pytest.mark.parametrize("path", ["gpt-4.1-nano", "openai/", "/gpt-4o", ""])
def test_malformed_path_is_a_clear_error(path):
    with pytest.raises(ValueError, match=r"Invalid model path format: .*Expected 'provider/model'"):
        get_client(path)


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"Unsupported provider: 'mistral' in model path "
        r"'mistral/large'\. Supported providers: openai, "
        r"anthropic, local, openai-compatible\.",
    ):
        get_client("mistral/large")


def test_openai_compatible_needs_a_base_url():
    with pytest.raises(ValueError, match="needs the server's URL"):
        get_client("openai-compatible/llama3")


def test_path_must_be_a_string():
    with pytest.raises(TypeError, match="model_path must be a str"):
        get_client(42)


def test_get_client_builds_the_provider_class(recording_providers):
    client = get_client("openai/gpt-4.1-nano", max_concurrency=4, budget_usd=2.0)
    assert type(client) is RecordingModel
    assert (client.model, client.base_url) == ("gpt-4.1-nano", None)
    assert (client.limits.max_concurrency, client.limits.budget.usd) == (4, 2.0)
    compatible = get_client("openai-compatible/llama3@http://127.0.0.1:9/v1")
    assert (compatible.model, compatible.base_url) == ("llama3", "http://127.0.0.1:9/v1")
    assert get_client("local/smollm2").model_path is None
    assert get_client("local//tmp/x.gguf").model_path == "/tmp/x.gguf"


def test_base_url_given_twice_is_an_error(recording_providers):
    with pytest.raises(ValueError, match="base_url is given both in the model path"):
        get_client("openai-compatible/llama3@http://127.0.0.1:9/v1", base_url="http://other")


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_every_provider_names_a_real_client_class(provider):
    module_name, _, class_name = PROVIDERS[provider].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, ChatCompletionModel)


def test_set_backward_model_client_from_a_client():
    client = ScriptedModel()
    set_backward_model_client(client, completion_args={"temperature": 0})
    assert get_backward_model_client() is client
    assert get_backward_model_completion_args() == {"temperature": 0}
    get_backward_model_completion_args()["temperature"] = 1  # a copy: no effect
    assert get_backward_model_completion_args() == {"temperature": 0}


def test_set_backward_model_client_from_a_path(recording_providers):
    set_backward_model_client("anthropic/claude-haiku-4-5", client_args={"max_retries": 7})
    client = get_backward_model_client()
    assert type(client) is RecordingModel
    assert (client.model, client.limits.max_retries) == ("claude-haiku-4-5", 7)
    assert get_backward_model_completion_args() == {}


def test_a_bad_path_leaves_the_backward_client_unchanged():
    client = ScriptedModel()
    set_backward_model_client(client, completion_args={"seed": 1})
    with pytest.raises(ValueError, match="Unsupported provider"):
        set_backward_model_client("nope/model", completion_args={"seed": 2})
    with pytest.raises(ValueError, match="client_args only applies to a model path"):
        set_backward_model_client(ScriptedModel(), client_args={"max_retries": 1})
    assert get_backward_model_client() is client
    assert get_backward_model_completion_args() == {"seed": 1}


def test_none_unsets_the_backward_client():
    set_backward_model_client(ScriptedModel())
    set_backward_model_client(None)
    assert get_backward_model_client() is None
