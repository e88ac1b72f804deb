"""FakeProviderServer: a local HTTP server speaking the OpenAI and Anthropic wire formats.

It lets the real ``openai`` and ``anthropic`` SDK clients (and afnio's clients built on them) run
end to end in tests without a network or an API key. The server runs its own asyncio loop in a
background thread, so hundreds of requests can be in flight at once even with latency.

Endpoints:
    ``POST /v1/chat/completions`` (OpenAI chat completions), ``POST /v1/messages`` (Anthropic
    messages) and ``GET /v1/models``.

Token counts in ``usage`` are words, not real tokens: :meth:`FakeProviderServer.count_tokens`
(``len(text.split())``) of every message content (and the Anthropic ``system`` field) for the
prompt, and of the reply for the completion, so tests can compute the expected numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from afnio.testing.latency import LatencyModel

__all__ = ["DEFAULT_FAULT_MIX", "Fault", "FakeProviderServer", "FakeReply"]

_FAULT_KINDS = (
    "status", "timeout", "truncated_json", "invalid_json", "disconnect", "non_utf8", "html",
    "missing_fields",
)
_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    408: "Request Timeout", 411: "Length Required", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    529: "Overloaded",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    429: "rate_limit_exceeded", 500: "server_error", 503: "server_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}


@dataclass(frozen=True)
class Fault:
    """One injected failure, applied to the next request the server receives.

    Args:
        kind: ``"status"`` (an error response with ``status``), ``"timeout"`` (hold the request
            without answering for ``hang`` seconds or until the client gives up),
            ``"truncated_json"`` (a 200 whose JSON body is cut in half), ``"invalid_json"`` (a
            200 whose body is not JSON), ``"disconnect"`` (close the connection unanswered),
            ``"non_utf8"`` (a 200 JSON body with bytes that are not UTF-8), ``"html"`` (a 200
            HTML page, as a captive portal or misconfigured proxy sends) or
            ``"missing_fields"`` (a 200 JSON reply without its text: no ``message.content``
            for OpenAI, no ``content`` blocks for Anthropic).
        status: The HTTP status of a ``"status"`` fault, e.g. 429 or 500.
        retry_after: Seconds sent in the ``Retry-After`` header (any status fault).
        hang: How long a ``"timeout"`` fault holds the request.
        message: The error message of a ``"status"`` fault, in the provider's error format.
        body: The whole JSON body of a ``"status"`` fault instead (e.g. a FastAPI ``detail``
            list, as some OpenAI-compatible servers send).

    Example:
        >>> Fault.parse(429).status
        429
    """

    kind: str
    status: int = 500
    retry_after: float | None = None
    hang: float = 30.0
    message: str = "injected fault"
    body: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(
                f"FakeProviderServer fault: unknown kind {self.kind!r}; expected one of "
                f"{', '.join(_FAULT_KINDS)}"
            )
        if self.kind == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"FakeProviderServer fault: status must be 4xx/5xx, got {self.status}")

    @classmethod
    def parse(cls, spec: Fault | int | str | dict[str, Any]) -> Fault:
        """Build a fault from a shorthand.

        Args:
            spec: A :class:`Fault`; an HTTP status (``429``); a kind name (``"timeout"``); or a
                dict of :class:`Fault` fields (``{"status": 429, "retry_after": 0.01}``, where
                ``kind`` defaults to ``"status"`` when a status is given).

        Raises:
            ValueError: If the shorthand names no known fault.
        """
        if isinstance(spec, Fault):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"FakeProviderServer fault: cannot use {spec!r} as a fault")
        if isinstance(spec, int):
            return cls("status", status=spec)
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, dict):
            fields = dict(spec)
            fields.setdefault("kind", "status")
            return cls(**fields)
        raise ValueError(
            f"FakeProviderServer fault: expected a Fault, status int, kind str or dict, "
            f"got {type(spec).__name__}"
        )


DEFAULT_FAULT_MIX: tuple[Fault, ...] = (
    Fault("status", status=429, retry_after=0.05),
    Fault("status", status=500),
    Fault("status", status=503),
    Fault("timeout"),
    Fault("invalid_json"),
    Fault("truncated_json"),
    Fault("non_utf8"),
    Fault("html"),
    Fault("missing_fields"),
    Fault("disconnect"),
)
"""The faults a ``fault_rate`` draws from by default: every kind a real provider or proxy
produces, once each (the timeout holds the request until the client gives up)."""


@dataclass(frozen=True)
class FakeReply:
    """A reply with explicit usage numbers, for a ``reply`` function that needs them.

    Fields left as ``None`` are computed with :meth:`FakeProviderServer.count_tokens`.

    Example:
        >>> FakeReply("hi", cached_tokens=3).cached_tokens
        3
    """

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0


ReplyFunction = Callable[[dict[str, Any]], Any]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FakeProviderServer:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI and Anthropic chat wire formats.

    Args:
        reply: ``reply(request_json) -> str | FakeReply`` (may be ``async``), called with the
            parsed request body of every successful request; ``None`` echoes the last user
            message. Exceptions raised by it become a 500 response and are kept in ``errors``.
        latency: Seconds every request waits before it is answered (concurrently, not in turn),
            or a :class:`~afnio.testing.LatencyModel` whose duration grows with the request's
            prompt and reply tokens as ``usage`` counts them (words), like a real provider's
            prefill and decoding: the reply is computed first, then the whole duration passes
            (a faulted request waits ``base`` only).
        faults: Faults applied to the next requests, one each, in order (see :class:`Fault`
            for the shorthands); more can be added with :meth:`inject`.
        api_key: If given, requests must carry it (``Authorization: Bearer`` or ``x-api-key``)
            or get a 401.
        fault_rate: Probability that a request with no queued fault gets a random one.
        fault_mix: The faults ``fault_rate`` draws from, uniformly (shorthands as for
            ``faults``); by default 429, 500, 503, timeout, invalid and truncated JSON,
            non-UTF-8, HTML, missing fields and disconnects.
        seed: Seed of the random faults, so a run's sequence of draws is reproducible.

    Attributes:
        requests: Parsed JSON bodies of every request to a chat endpoint, faulted ones included,
            in arrival order (a body that is not a JSON object is kept as ``{"_raw": text}``).
        paths: The path of every request (any endpoint), in arrival order.
        faults_applied: The faults that have been applied, in order.
        in_flight: Requests currently being handled.
        max_in_flight: The largest number of requests handled at once.
        connections_opened: TCP connections clients have opened to the server.
        errors: Exceptions raised by ``reply``.

    Example:
        >>> import openai
        >>> with FakeProviderServer(reply=lambda body: "pong") as server:
        ...     with openai.OpenAI(base_url=server.openai_base_url, api_key="test") as client:
        ...         completion = client.chat.completions.create(
        ...             model="gpt-4.1-nano", messages=[{"role": "user", "content": "ping"}])
        >>> completion.choices[0].message.content
        'pong'
        >>> len(server.requests)
        1
    """

    def __init__(
        self,
        reply: ReplyFunction | None = None,
        latency: float = 0.0,
        faults: Iterable[Fault | int | str | dict[str, Any]] | None = None,
        api_key: str | None = None,
        fault_rate: float = 0.0,
        fault_mix: Iterable[Fault | int | str | dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        try:
            self._latency = LatencyModel.of(latency)
        except (TypeError, ValueError) as error:
            raise ValueError(f"FakeProviderServer: latency: {error}") from None
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"FakeProviderServer: fault_rate must be in [0, 1], got {fault_rate}")
        self.fault_rate = fault_rate
        self.fault_mix = [Fault.parse(f) for f in (fault_mix or DEFAULT_FAULT_MIX)]
        if not self.fault_mix:
            raise ValueError("FakeProviderServer: fault_mix must name at least one fault")
        self._random = random.Random(seed)
        self.reply = reply
        self.latency = latency
        self._sleep = asyncio.sleep  # how latency passes (a test may record it instead)
        self._api_key = api_key
        self._faults: deque[Fault] = deque(Fault.parse(f) for f in faults or ())
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.faults_applied: list[Fault] = []
        self.errors: list[BaseException] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections_opened = 0
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeProviderServer:
        """Start serving on an ephemeral port (idempotent); returns ``self``."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._on_connection, "127.0.0.1", 0, backlog=512)
                )
                self._port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="FakeProviderServer", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop serving: open connections are dropped, hanging requests end (idempotent)."""
        loop, thread = self._loop, self._thread
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- public helpers

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the server must be started)."""
        if self._port is None:
            raise RuntimeError("FakeProviderServer.url: the server is not started; call start()")
        return f"http://127.0.0.1:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for an OpenAI client: ``<url>/v1``."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The ``base_url`` for an Anthropic client (the SDK appends ``/v1/messages``)."""
        return self.url

    def inject(self, *faults: Fault | int | str | dict[str, Any]) -> None:
        """Queue faults for the next requests, one per request, after those already queued."""
        parsed = [Fault.parse(f) for f in faults]
        with self._lock:
            self._faults.extend(parsed)

    @property
    def pending_faults(self) -> int:
        """How many injected faults have not been applied yet."""
        with self._lock:
            return len(self._faults)

    def reset(self) -> None:
        """Forget recorded requests, statistics, errors and pending faults."""
        with self._lock:
            self.requests.clear()
            self.paths.clear()
            self.faults_applied.clear()
            self.errors.clear()
            self._faults.clear()
            self.max_in_flight = self.in_flight
            self.connections_opened = 0

    @staticmethod
    def count_tokens(text: str) -> int:
        """The fake tokenizer used for ``usage``: the number of whitespace-separated words."""
        return len(text.split())

    # ----------------------------------------------------------------- HTTP

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections_opened += 1
        task = asyncio.ensure_future(self._serve_connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    await _write_json(writer, exc.status, _error_body("openai", exc.status,
                                                                      exc.message))
                    return
                if request is None:
                    return
                keep_alive = await self._handle(reader, writer, *request)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # the client went away mid-request; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        path = path.split("?", 1)[0]
        with self._lock:
            self.paths.append(path)
        if method == "GET" and path == "/v1/models":
            payload = {"object": "list", "data": [{"id": "fake", "object": "model",
                                                   "created": 0, "owned_by": "afnio"}]}
            await _write_json(writer, 200, payload)
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/messages"):
            await _write_json(writer, 404, {"error": {"message": f"no route {method} {path}",
                                                      "type": "not_found"}})
            return True
        api = "openai" if path == "/v1/chat/completions" else "anthropic"
        try:
            request_json = json.loads(body) if body else None
        except ValueError:
            request_json = None
        recorded = request_json if isinstance(request_json, dict) else {"_raw": body.decode(
            "utf-8", "replace")}
        with self._lock:
            self.requests.append(recorded)
            fault = self._faults.popleft() if self._faults else None
            if fault is None and self.fault_rate and self._random.random() < self.fault_rate:
                fault = self._random.choice(self.fault_mix)
            if fault is not None:
                self.faults_applied.append(fault)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._latency.base and (fault is not None or not self._latency.per_token):
                await self._sleep(self._latency.base)
            response = await self._response(reader, api, headers, recorded, fault)
        finally:
            # Counted out before the answer is written, so a client that got its answer never
            # sees its own request still in flight.
            with self._lock:
                self.in_flight -= 1
        if response is None:
            return False  # close the connection unanswered
        await _write_response(writer, *response)
        return True

    async def _response(
        self,
        reader: asyncio.StreamReader,
        api: str,
        headers: dict[str, str],
        request_json: dict[str, Any],
        fault: Fault | None,
    ) -> tuple[int, bytes, dict[str, str]] | None:
        """The (status, body, extra headers) to answer with, or None to close unanswered."""
        if fault is not None and fault.kind == "timeout":
            # Hold the request until the client gives up (EOF) or the hang elapses.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), fault.hang)
            return None
        if fault is not None and fault.kind == "disconnect":
            return None
        if fault is not None and fault.kind == "status":
            extra = {}
            if fault.retry_after is not None:
                extra["retry-after"] = _format_seconds(fault.retry_after)
            if fault.body is not None:
                return fault.status, json.dumps(fault.body).encode(), extra
            return _error(api, fault.status, fault.message, extra)
        if self._api_key is not None and not _has_key(headers, self._api_key):
            return _error(api, 401, "invalid api key")
        try:
            payload = await self._completion(api, request_json)
        except _BadRequest as exc:
            return _error(api, exc.status, exc.message)
        except Exception as exc:  # a reply() bug becomes a visible 500 and is kept in errors
            with self._lock:
                self.errors.append(exc)
            return _error(api, 500, f"reply function failed: {type(exc).__name__}")
        if self._latency.per_token and fault is None:
            await self._sleep(self._modelled_latency(api, request_json, payload))
        kind = fault.kind if fault is not None else None
        if kind == "missing_fields":
            if api == "openai":
                del payload["choices"][0]["message"]["content"]
            else:
                del payload["content"]
        body = json.dumps(payload).encode()
        if kind == "truncated_json":
            body = body[: len(body) // 2]
        elif kind == "invalid_json":
            body = b"{'this is': not json,"
        elif kind == "non_utf8":
            body = body[:-1] + b', "note": "\xff\xfe\xfa"}'  # valid JSON, but not UTF-8
        elif kind == "html":
            page = b"<!DOCTYPE html><html><body><h1>Sign in to the network</h1></body></html>"
            return 200, page, {"content-type": "text/html; charset=utf-8"}
        return 200, body, {}

    def _modelled_latency(
        self, api: str, request_json: dict[str, Any], payload: dict[str, Any]
    ) -> float:
        """A request's duration under a token-dependent latency model."""
        usage = payload["usage"]
        if api == "openai":
            prompt, output = usage["prompt_tokens"], usage["completion_tokens"]
        else:
            prompt = (usage["input_tokens"] + usage["cache_read_input_tokens"]
                      + usage["cache_creation_input_tokens"])
            output = usage["output_tokens"]
        key = LatencyModel.request_key(_prompt_texts(request_json))
        return self._latency.seconds(prompt, output, key)

    async def _completion(self, api: str, request_json: dict[str, Any]) -> dict[str, Any]:
        if "_raw" in request_json:
            raise _BadRequest(400, "request body is not a JSON object")
        messages = request_json.get("messages")
        if not isinstance(messages, list) or not request_json.get("model"):
            raise _BadRequest(400, "'model' and a 'messages' list are required")
        if api == "anthropic" and "max_tokens" not in request_json:
            raise _BadRequest(400, "max_tokens: Field required")
        n = request_json.get("n") or 1
        if api == "anthropic":
            n = 1
        replies = []
        for _ in range(n):
            reply = self.reply(request_json) if self.reply is not None else _echo(request_json)
            if inspect.isawaitable(reply):
                reply = await reply
            if isinstance(reply, str):
                reply = FakeReply(reply)
            if not isinstance(reply, FakeReply):
                raise TypeError(f"reply must return a str or FakeReply, got "
                                f"{type(reply).__name__}")
            replies.append(reply)
        prompt_tokens = sum(self.count_tokens(text) for text in _prompt_texts(request_json))
        if replies[0].prompt_tokens is not None:
            prompt_tokens = replies[0].prompt_tokens
        completion_tokens = sum(
            r.completion_tokens if r.completion_tokens is not None else self.count_tokens(r.text)
            for r in replies
        )
        first = replies[0]
        number = next(self._ids)
        if api == "openai":
            return {
                "id": f"chatcmpl-fake{number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request_json["model"],
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": r.text,
                                             "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}
                    for i, r in enumerate(replies)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": first.cached_tokens,
                                              "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
                },
                "service_tier": "default",
                "system_fingerprint": "fp_afnio_fake",
            }
        # Anthropic reports uncached input separately from cache reads and writes.
        return {
            "id": f"msg_fake{number}",
            "type": "message",
            "role": "assistant",
            "model": request_json["model"],
            "content": [{"type": "text", "text": first.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": max(prompt_tokens - first.cached_tokens
                                    - first.cache_write_tokens, 0),
                "output_tokens": completion_tokens,
                "cache_read_input_tokens": first.cached_tokens,
                "cache_creation_input_tokens": first.cache_write_tokens,
            },
        }


# --------------------------------------------------------------------- wire helpers


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None  # the client closed a kept-alive connection between requests
        raise
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    method, path, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_text = (await reader.readuntil(b"\r\n")).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, f"bad chunk size {size_text[:20]!r}") from None
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return method, path, headers, bytes(body)
    length_text = headers.get("content-length", "0") or "0"
    if not length_text.isdigit():
        raise _BadRequest(400, f"bad content-length {length_text[:40]!r}")
    length = int(length_text)
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


async def _write_response(
    writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str] | None = None
) -> None:
    extra = dict(extra or {})
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"content-type: {extra.pop('content-type', 'application/json')}",
        f"content-length: {len(body)}",
        "connection: keep-alive",
        f"x-request-id: req_fake{time.monotonic_ns()}",
    ]
    head += [f"{name}: {value}" for name, value in extra.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def _write_json(
    writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> None:
    await _write_response(writer, status, json.dumps(payload).encode(), extra)


def _error(
    api: str, status: int, message: str, extra: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(_error_body(api, status, message)).encode(), extra or {}


def _error_body(api: str, status: int, message: str) -> dict[str, Any]:
    if api == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _has_key(headers: dict[str, str], key: str) -> bool:
    return headers.get("authorization") == f"Bearer {key}" or headers.get("x-api-key") == key


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            block.get("text", "") for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
    return ""


def _prompt_texts(request_json: dict[str, Any]) -> list[str]:
    texts = [_content_text(m.get("content")) for m in request_json["messages"]
             if isinstance(m, dict)]
    if "system" in request_json:
        texts.append(_content_text(request_json["system"]))
    return texts


def _echo(request_json: dict[str, Any]) -> str:
    for message in reversed(request_json["messages"]):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""
