"""Clients by name (``"provider/model"``) and the global backward model client.

Paths:

- ``"openai/<model>"``: :class:`afnio.models.openai.AsyncOpenAI` (key from ``OPENAI_API_KEY``).
- ``"anthropic/<model>"``: :class:`afnio.models.anthropic.AsyncAnthropic`
  (key from ``ANTHROPIC_API_KEY``).
- ``"local/smollm2"`` or ``"local/<path to a .gguf file>"``: :class:`afnio.models.local.LocalModel`
  (llama.cpp in process).
- ``"openai-compatible/<model>@<base_url>"``: :class:`afnio.models.openai.AsyncOpenAI` talking to
  any OpenAI-compatible server (vLLM, Ollama, ``llama_cpp.server``), e.g.
  ``"openai-compatible/llama3@http://127.0.0.1:8000/v1"``.
- ``"openai-compatible/<model>@<url1>,<url2>,..."``: an :class:`afnio.models.pool.EndpointPool`
  spreading requests over replicas serving the same model.

Client classes are imported only when a path asks for them, so a missing optional dependency
(``llama-cpp-python``) only matters to the paths that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

from afnio._settings import get_settings, set_settings
from afnio.models.model import ChatCompletionModel

__all__ = [
    "PROVIDERS",
    "get_backward_model_client",
    "get_backward_model_completion_args",
    "get_client",
    "parse_model_path",
    "set_backward_model_client",
]

PROVIDERS: dict[str, str] = {
    "openai": "afnio.models.openai.AsyncOpenAI",
    "anthropic": "afnio.models.anthropic.AsyncAnthropic",
    "local": "afnio.models.local.LocalModel",
    "openai-compatible": "afnio.models.openai.AsyncOpenAI",
}
"""Provider name → the client class a path of that provider builds (``module.Class``)."""

_DEFAULT_LOCAL_MODEL = "smollm2"


def parse_model_path(model_path: str) -> tuple[str, str, dict[str, Any]]:
    """Split a model path into its provider, model and extra client arguments.

    Args:
        model_path: ``"provider/model"`` (see the module docs for the providers).

    Returns:
        ``(provider, model, client_args)``; ``client_args`` holds ``base_url`` for
        ``openai-compatible`` paths (``endpoints``, a list of URLs, when the path names several,
        comma-separated), ``model_path`` for a local GGUF file, and is empty otherwise.

    Raises:
        TypeError: If ``model_path`` is not a str.
        ValueError: If the path has no ``/``, names an unsupported provider, has an empty model,
            or is an ``openai-compatible`` path without ``@<base_url>``.

    Example:
        >>> parse_model_path("openai/gpt-4.1-nano")
        ('openai', 'gpt-4.1-nano', {})
        >>> parse_model_path("openai-compatible/llama3@http://127.0.0.1:8000/v1")
        ('openai-compatible', 'llama3', {'base_url': 'http://127.0.0.1:8000/v1'})
        >>> parse_model_path("openai-compatible/llama3@http://a:8000/v1,http://b:8000/v1")
        ('openai-compatible', 'llama3', {'endpoints': ['http://a:8000/v1', 'http://b:8000/v1']})
    """
    if not isinstance(model_path, str):
        raise TypeError(
            f"get_client: model_path must be a str like 'openai/gpt-4.1-nano', "
            f"got {type(model_path).__name__}"
        )
    provider, slash, model = model_path.partition("/")
    if not slash or not provider or not model:
        raise ValueError(
            f"Invalid model path format: {model_path!r}. Expected 'provider/model', "
            f"e.g. 'openai/gpt-4.1-nano', 'anthropic/claude-haiku-4-5', 'local/smollm2' or "
            f"'openai-compatible/<model>@<base_url>'."
        )
    if provider not in PROVIDERS:
        raise ValueError(
            f"Unsupported provider: {provider!r} in model path {model_path!r}. "
            f"Supported providers: {', '.join(PROVIDERS)}."
        )
    if provider == "local":
        # LocalModel takes a GGUF path; "smollm2" names its default, bundled model.
        return provider, model, {} if model == _DEFAULT_LOCAL_MODEL else {"model_path": model}
    if provider != "openai-compatible":
        return provider, model, {}
    name, at, base_url = model.partition("@")
    if not at or not name or not base_url:
        raise ValueError(
            f"Invalid model path format: {model_path!r}. An openai-compatible path needs the "
            f"server's URL: 'openai-compatible/<model>@<base_url>', "
            f"e.g. 'openai-compatible/llama3@http://127.0.0.1:8000/v1'."
        )
    if "," in base_url:
        urls = [url.strip() for url in base_url.split(",")]
        if not all(urls):
            raise ValueError(
                f"Invalid model path format: {model_path!r}. An endpoint pool path lists its "
                f"servers' URLs separated by single commas: "
                f"'openai-compatible/<model>@<url1>,<url2>'."
            )
        return provider, name, {"endpoints": urls}
    return provider, name, {"base_url": base_url}


def _client_class(provider: str) -> type[ChatCompletionModel]:
    module_name, _, class_name = PROVIDERS[provider].rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def get_client(model_path: str, **client_args: Any) -> ChatCompletionModel:
    """Build the async client a model path names.

    Args:
        model_path: ``"openai/<model>"``, ``"anthropic/<model>"``, ``"local/smollm2"``,
            ``"local/<path.gguf>"``, ``"openai-compatible/<model>@<base_url>"`` or
            ``"openai-compatible/<model>@<url1>,<url2>,..."`` (an endpoint pool).
        **client_args: Constructor arguments of the client (``api_key``, ``max_concurrency``,
            ``budget_usd``, ``cache``, ...).

    Returns:
        The client (a :class:`ChatCompletionModel`).

    Raises:
        ValueError: If the path is malformed or names an unsupported provider.

    Example:
        >>> client = get_client("openai/gpt-4.1-nano", api_key="sk-test", max_concurrency=8)
        >>> client.model, client.limits.max_concurrency
        ('gpt-4.1-nano', 8)
    """
    provider, model, path_args = parse_model_path(model_path)
    clashing = sorted(set(path_args) & set(client_args))
    if clashing:
        raise ValueError(
            f"get_client: {', '.join(clashing)} is given both in the model path {model_path!r} "
            f"and as a client argument; give it once"
        )
    if provider == "local":
        return _client_class(provider)(**path_args, **client_args)
    if "endpoints" in path_args:
        from afnio.models.pool import EndpointPool

        return EndpointPool(model=model, **path_args, **client_args)
    return _client_class(provider)(model=model, **path_args, **client_args)


def set_backward_model_client(
    model_path: str | ChatCompletionModel | None,
    client_args: dict[str, Any] | None = None,
    completion_args: dict[str, Any] | None = None,
) -> None:
    """Set the client that computes textual gradients when an op has none of its own.

    A thin setter of the process-wide settings (:func:`afnio.settings` overrides it locally).
    Ops capture the client when their forward runs, so a graph built before this call keeps
    the client it was built with.

    Args:
        model_path: A client instance, a model path for :func:`get_client`, or ``None`` to
            unset the backward client.
        client_args: Constructor arguments for the client built from a path (not allowed with
            a client instance).
        completion_args: Arguments sent with every backward request (e.g. ``temperature``).

    Raises:
        ValueError: If the path is malformed or names an unsupported provider, or
            ``client_args`` comes with a client instance. Nothing is changed then.

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> set_backward_model_client(ScriptedModel(), completion_args={"temperature": 0})
        >>> get_backward_model_completion_args()
        {'temperature': 0}
        >>> set_backward_model_client(None)
    """
    if model_path is None or isinstance(model_path, ChatCompletionModel):
        if client_args:
            raise ValueError(
                "set_backward_model_client: client_args only applies to a model path; "
                "configure the client instance directly"
            )
        client = model_path
    else:
        client = get_client(model_path, **(client_args or {}))
    set_settings(
        backward_model_client=client, backward_completion_args=dict(completion_args or {})
    )


def get_backward_model_client() -> ChatCompletionModel | None:
    """The backward model client in force here, or ``None`` when none was set."""
    return get_settings().backward_model_client


def get_backward_model_completion_args() -> dict[str, Any]:
    """The completion arguments sent with every backward request."""
    return dict(get_settings().backward_completion_args)
