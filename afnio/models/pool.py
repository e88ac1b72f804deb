"""EndpointPool: one logical model served by several OpenAI-compatible endpoints.

When one server can't take the load (vLLM, llama.cpp or Ollama replicas on several GPU nodes),
an :class:`EndpointPool` spreads the requests of a single client over all of them:

- **routing**: each request goes to the healthy endpoint with the fewest requests outstanding
  (waiting for or holding one of its slots); ties go round-robin, so a sequential workload
  still uses every replica;
- **per-endpoint limits**: concurrency, requests per minute and tokens per minute of each
  endpoint (:class:`PoolEndpoint`), on top of the pool's own pipeline options (cache, budget,
  retries, pool-wide concurrency);
- **failover**: a request whose endpoint fails with a transient error (connection refused or
  dropped, timeout, 5xx, 429, a malformed reply) is sent at once to the next best endpoint it
  has not tried; only when every endpoint failed it does the pool's usual retry with backoff
  start. A request is answered once: the reply of the endpoint that answered is the only one
  counted, in the endpoint's usage, in the pool's usage and in the run-wide totals;
- **health checks**: an endpoint that failed ``failure_threshold`` times in a row (429s don't
  count: a busy server is alive) leaves the rotation; every ``health_check_interval`` seconds
  the next request probes it (``GET /models``) and a passing probe brings it back.
  :meth:`EndpointPool.check_health` probes every endpoint on demand. When no endpoint is
  healthy, a request probes them all before giving up with a
  :class:`~afnio.models.errors.TransientError` (which the pool's retries then handle).

The pool is a :class:`~afnio.models.model.ChatCompletionModel`, so it works wherever a client
does: ``ChatCompletion``, evaluators, optimizers, the backward client. Its response cache is
keyed per **logical model**: provider ``openai-compatible``, the model name and the endpoint
marker :data:`POOL_CACHE_ENDPOINT`, never a replica's URL — a reply is valid whichever replica
wrote it, and adding or removing a replica keeps the cache. (A single-endpoint client keys by its
URL, since two unrelated servers may serve models of the same name; a pool asserts its
endpoints serve the same model.)

Context window, token counting, output reserve and structured outputs are those of an
OpenAI-compatible client of the model (``context_window=`` and ``structured_output=`` as for
:class:`~afnio.models.openai.AsyncOpenAI`). The API key (``api_key=`` or ``OPENAI_API_KEY``,
else a placeholder, as local servers ignore it) is shared by the endpoints and lives only in
their SDK clients: never in :meth:`~EndpointPool.get_config`, reprs or caches.

Build one with ``EndpointPool("llama3", ["http://gpu1:8000/v1", "http://gpu2:8000/v1"])`` or
``afnio.models.get_client("openai-compatible/llama3@http://gpu1:8000/v1,http://gpu2:8000/v1")``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio.models.errors import ModelError, TransientError
from afnio.models.limits import ConcurrencyLimit, RateLimit
from afnio.models.model import ChatCompletionModel, Completion
from afnio.models.options import PipelineOptions
from afnio.models.pricing import cost_usd
from afnio.models.usage import Usage

__all__ = ["POOL_CACHE_ENDPOINT", "EndpointPool", "PoolEndpoint"]

logger = logging.getLogger(__name__)

POOL_CACHE_ENDPOINT = "endpoint-pool"
"""What a pool puts in the ``endpoint`` field of its response-cache keys (see the module docs)."""

_RATE_LIMITED = 429
_PROBE_POLL = 0.01  # seconds between looks at a probe another request is running


@dataclass(frozen=True)
class PoolEndpoint:
    """One endpoint of an :class:`EndpointPool` and its own limits.

    Args:
        base_url: The server's OpenAI-compatible base URL, e.g. ``"http://gpu1:8000/v1"``.
        max_concurrency: Requests in flight at once on this endpoint (``None``: no cap).
        requests_per_minute: Pace this endpoint's requests to this rate.
        tokens_per_minute: Pace this endpoint's tokens (prompt estimate) to this rate.

    Raises:
        ValueError: If ``base_url`` is not an ``http(s)://`` URL or a limit is out of range.
        TypeError: If a limit has the wrong type.

    Example:
        >>> PoolEndpoint("http://127.0.0.1:8000/v1", max_concurrency=4).max_concurrency
        4
    """

    base_url: str
    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"EndpointPool: an endpoint's base_url must be an http:// or https:// URL, got "
                f"{self.base_url!r}"
            )
        # The same checks (and messages) as a client's own limit options.
        PipelineOptions(
            max_concurrency=self.max_concurrency,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )

    def get_config(self) -> str | dict[str, Any]:
        """The URL alone, or a dict with the limits that are set (JSON-safe)."""
        limits = {
            name: getattr(self, name)
            for name in ("max_concurrency", "requests_per_minute", "tokens_per_minute")
            if getattr(self, name) is not None
        }
        return {"base_url": self.base_url, **limits} if limits else self.base_url


class _Endpoint:
    """An endpoint's client, limits, load and health (guarded by the pool's lock)."""

    def __init__(self, index: int, spec: PoolEndpoint, client: Any) -> None:
        self.index = index
        self.spec = spec
        self.client = client
        self.concurrency = ConcurrencyLimit(spec.max_concurrency)
        self.request_rate = (
            None if spec.requests_per_minute is None else RateLimit(spec.requests_per_minute)
        )
        self.token_rate = (
            None if spec.tokens_per_minute is None else RateLimit(spec.tokens_per_minute)
        )
        self.outstanding = 0
        self.healthy = True
        self.consecutive_failures = 0
        self.failures = 0
        self.last_check = 0.0
        self.probing = False
        self.usage = Usage()

    @property
    def full(self) -> bool:
        cap = self.spec.max_concurrency
        return cap is not None and self.outstanding >= cap

    async def pace(self, prompt_tokens: int) -> None:
        delay = 0.0
        if self.request_rate is not None:
            delay = max(delay, self.request_rate.reserve(1))
        if self.token_rate is not None:
            delay = max(delay, self.token_rate.reserve(prompt_tokens))
        if delay > 0:
            await asyncio.sleep(delay)


def _endpoint_spec(value: Any, index: int) -> PoolEndpoint:
    if isinstance(value, PoolEndpoint):
        return value
    if isinstance(value, str):
        return PoolEndpoint(value)
    if isinstance(value, Mapping):
        try:
            return PoolEndpoint(**value)
        except TypeError as error:
            raise TypeError(f"EndpointPool: endpoints[{index}]: {error}") from None
    raise TypeError(
        f"EndpointPool: endpoints[{index}] must be a base URL, a PoolEndpoint or a dict of its "
        f"fields, got {type(value).__name__}"
    )


class EndpointPool(ChatCompletionModel):
    """A client spreading one model's requests over several OpenAI-compatible endpoints.

    See :mod:`afnio.models.pool` for routing, limits, failover, health checks and caching.

    Args:
        model: The model name every endpoint serves.
        endpoints: The endpoints: base URLs, :class:`PoolEndpoint` objects (with per-endpoint
            limits) or dicts of their fields, at least one, no URL twice.
        api_key: The key sent to every endpoint; defaults to ``OPENAI_API_KEY``, else a
            placeholder. Never stored outside the endpoints' SDK clients.
        timeout: Seconds before one HTTP request is abandoned (and failed over).
        structured_output: How the endpoints take a JSON schema, as for
            :class:`~afnio.models.openai.AsyncOpenAI` (``"json_schema"``, ``"llama.cpp"``,
            ``"vllm"`` or ``None``).
        failure_threshold: Consecutive failures (429s aside) that take an endpoint out of the
            rotation.
        health_check_interval: Seconds an unhealthy endpoint waits before the next request
            probes it.
        health_check_timeout: Seconds a probe (``GET /models``) may take.
        **options: The pool's pipeline options of
            :class:`~afnio.models.model.ChatCompletionModel` (``cache``, ``budget_usd``,
            ``max_retries``, ``max_concurrency`` for the whole pool, ...).

    Attributes:
        endpoints: The :class:`PoolEndpoint` specs, in the order given.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``endpoints`` is empty or repeats a URL, a URL or limit is invalid, or
            a threshold or interval is out of range.

    Example:
        >>> from afnio.testing import FakeProviderServer
        >>> with FakeProviderServer(reply=lambda body: "A") as one, \\
        ...         FakeProviderServer(reply=lambda body: "B") as two:
        ...     pool = EndpointPool("llama3", [one.openai_base_url, two.openai_base_url])
        ...     replies = [pool.chat([{"role": "user", "content": "hi"}]) for _ in range(4)]
        >>> replies  # ties between idle endpoints go round-robin
        ['A', 'B', 'A', 'B']
        >>> [usage["requests"] for usage in pool.endpoint_usage().values()]
        [2, 2]
    """

    provider = "openai-compatible"

    def __init__(
        self,
        model: str,
        endpoints: Sequence[str | PoolEndpoint | Mapping[str, Any]],
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        structured_output: str | None = "json_schema",
        failure_threshold: int = 2,
        health_check_interval: float = 10.0,
        health_check_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        from afnio.models.openai import AsyncOpenAI  # the SDK loads only when a pool is built

        name = type(self).__name__
        if not isinstance(model, str) or not model:
            raise ValueError(f"{name}: model must be a non-empty str, got {model!r}")
        if isinstance(endpoints, (str, bytes)) or not isinstance(endpoints, Sequence):
            raise TypeError(
                f"{name}({model!r}): endpoints must be a list of base URLs or PoolEndpoint "
                f"objects, got {type(endpoints).__name__}"
            )
        specs = [_endpoint_spec(value, index) for index, value in enumerate(endpoints)]
        if not specs:
            raise ValueError(f"{name}({model!r}): endpoints is empty; give at least one base URL")
        urls = [spec.base_url.rstrip("/") for spec in specs]
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise ValueError(
                f"{name}({model!r}): endpoints lists {', '.join(repeated)} more than once; list "
                "each replica once (give it max_concurrency= to send it more)"
            )
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or (
            failure_threshold < 1
        ):
            raise ValueError(
                f"{name}({model!r}): failure_threshold must be an int >= 1, got "
                f"{failure_threshold!r}"
            )
        for option, value in (
            ("health_check_interval", health_check_interval),
            ("health_check_timeout", health_check_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < float("inf")
            ):
                raise ValueError(
                    f"{name}({model!r}): {option} must be a finite number of seconds >= 0, "
                    f"got {value!r}"
                )
        super().__init__(model=model, **options)
        self.endpoints = specs
        self.timeout = float(timeout)
        self.structured_output = structured_output
        self.failure_threshold = failure_threshold
        self.health_check_interval = float(health_check_interval)
        self.health_check_timeout = float(health_check_timeout)
        self._lock = threading.Lock()
        self._next = 0  # where the round-robin among equally loaded endpoints starts
        self._endpoints = [
            _Endpoint(
                index,
                spec,
                AsyncOpenAI(
                    model, api_key=api_key, base_url=spec.base_url, timeout=timeout,
                    structured_output=structured_output, max_retries=0,
                ),
            )
            for index, spec in enumerate(specs)
        ]

    # ------------------------------------------------------------------ what it delegates
    @property
    def endpoint(self) -> str:
        """:data:`POOL_CACHE_ENDPOINT`: cache entries belong to the logical model."""
        return POOL_CACHE_ENDPOINT

    def _check_completion_args(self, completion_args: dict[str, Any]) -> None:
        self._endpoints[0].client._check_completion_args(completion_args)

    def _structured_output_args(self, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
        return self._endpoints[0].client._structured_output_args(schema, name)

    # ------------------------------------------------------------------ routing
    def _pick(self, tried: set[int]) -> _Endpoint | None:
        """The healthy, untried endpoint with the fewest outstanding requests (reserved)."""
        with self._lock:
            count = len(self._endpoints)
            order = [self._endpoints[(self._next + i) % count] for i in range(count)]
            candidates = [e for e in order if e.healthy and e.index not in tried]
            if not candidates:
                return None
            chosen = min(candidates, key=lambda e: (e.full, e.outstanding))
            chosen.outstanding += 1
            self._next = chosen.index + 1
            return chosen

    def _due_for_probe(self, tried: set[int], everyone: bool) -> list[_Endpoint]:
        """Unhealthy, untried endpoints to probe now (claimed, so one request probes each)."""
        now = time.monotonic()
        with self._lock:
            due = [
                e for e in self._endpoints
                if not e.healthy and not e.probing and e.index not in tried
                and (everyone or now - e.last_check >= self.health_check_interval)
            ]
            for endpoint in due:
                endpoint.probing = True
            return due

    async def _probe(self, endpoint: _Endpoint) -> bool:
        """``GET /models`` on ``endpoint``; marks it healthy when the server answers."""
        try:
            await endpoint.client._call_sdk(
                lambda sdk: sdk.models.with_raw_response.list(timeout=self.health_check_timeout)
            )
        except ModelError as error:
            logger.info("%r: health check of %s failed: %s", self, endpoint.spec.base_url, error)
            healthy = False
        else:
            healthy = True
        with self._lock:
            endpoint.probing = False
            endpoint.last_check = time.monotonic()
            if healthy and not endpoint.healthy:
                endpoint.healthy = True
                endpoint.consecutive_failures = 0
                logger.warning("%r: %s passed its health check; back in rotation", self,
                               endpoint.spec.base_url)
        return healthy

    async def _choose(self, tried: set[int]) -> _Endpoint | None:
        """Probe what is due, then reserve the best endpoint (``None``: none is left).

        With no healthy endpoint left to try, every untried one is probed; one that another
        request is probing already is waited for (up to the probe timeout)."""
        with self._lock:
            any_healthy = any(e.healthy and e.index not in tried for e in self._endpoints)
        due = self._due_for_probe(tried, everyone=not any_healthy)
        if due:
            await asyncio.gather(*(self._probe(endpoint) for endpoint in due))
        chosen = self._pick(tried)
        deadline = time.monotonic() + self.health_check_timeout + 1.0
        while chosen is None and self._probing(tried) and time.monotonic() < deadline:
            await asyncio.sleep(_PROBE_POLL)
            chosen = self._pick(tried)
        return chosen

    def _probing(self, tried: set[int]) -> bool:
        with self._lock:
            return any(e.probing and e.index not in tried for e in self._endpoints)

    def _release(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.outstanding -= 1

    def _failed(self, endpoint: _Endpoint, error: TransientError) -> None:
        with self._lock:
            endpoint.failures += 1
            if error.status == _RATE_LIMITED:
                return  # busy, not broken
            endpoint.consecutive_failures += 1
            if endpoint.healthy and endpoint.consecutive_failures >= self.failure_threshold:
                endpoint.healthy = False
                endpoint.last_check = time.monotonic()
                left = sum(e.healthy for e in self._endpoints)
                logger.warning(
                    "%r: %s failed %d times in a row (last: %s); out of rotation, %d of %d "
                    "endpoints left", self, endpoint.spec.base_url,
                    endpoint.consecutive_failures, error, left, len(self._endpoints),
                )

    def _answered(self, endpoint: _Endpoint, completion: Completion) -> None:
        usage = Usage(
            requests=1,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cached_tokens=completion.cached_tokens,
            cost_usd=cost_usd(
                self.provider, self.model, prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                cached_tokens=completion.cached_tokens,
                cache_write_tokens=completion.cache_write_tokens,
            ),
        )
        with self._lock:
            endpoint.consecutive_failures = 0
            endpoint.usage += usage

    async def _send(self, messages: list[dict[str, Any]], **completion_args: Any) -> Completion:
        tried: set[int] = set()
        last: TransientError | None = None
        prompt_tokens: int | None = None
        while True:
            endpoint = await self._choose(tried)
            if endpoint is None:
                if last is not None:
                    raise TransientError(
                        f"{self!r}: every endpoint failed this request (tried "
                        f"{len(tried)} of {len(self._endpoints)}); last error: {last}",
                        status=last.status, retry_after=last.retry_after,
                    )
                raise TransientError(
                    f"{self!r}: no endpoint is healthy ({len(self._endpoints)} failed their "
                    f"health checks)"
                )
            tried.add(endpoint.index)
            try:
                async with endpoint.concurrency.slot():
                    if endpoint.token_rate is not None and prompt_tokens is None:
                        prompt_tokens = self.count_message_tokens(messages)
                    await endpoint.pace(prompt_tokens or 0)
                    completion = await endpoint.client._send(messages, **completion_args)
            except TransientError as error:
                self._failed(endpoint, error)
                last = error
                continue
            finally:
                self._release(endpoint)
            self._answered(endpoint, completion)
            return completion

    # ------------------------------------------------------------------ public
    async def acheck_health(self) -> dict[str, bool]:
        """Probe every endpoint now (``GET /models``); a passing one rejoins the rotation.

        Returns:
            ``{base_url: passed}`` in the order of :attr:`endpoints`. An endpoint that fails a
            probe keeps its state (a healthy one is taken out only by failed requests).
        """
        with self._lock:
            targets = [e for e in self._endpoints if not e.probing]
            for endpoint in targets:
                endpoint.probing = True
        results = await asyncio.gather(*(self._probe(endpoint) for endpoint in targets))
        passed = {e.index: ok for e, ok in zip(targets, results)}
        with self._lock:
            return {e.spec.base_url: passed.get(e.index, e.healthy) for e in self._endpoints}

    def check_health(self) -> dict[str, bool]:
        """Synchronous twin of :meth:`acheck_health`.

        Example:
            >>> from afnio.testing import FakeProviderServer
            >>> with FakeProviderServer() as server:
            ...     health = EndpointPool("llama3", [server.openai_base_url]).check_health()
            >>> list(health.values())
            [True]
        """
        from afnio._runtime import run

        return run(self.acheck_health())

    def endpoint_usage(self) -> dict[str, dict[str, int | float]]:
        """What each endpoint answered since the pool was made or :meth:`clear_usage`.

        Returns:
            ``{base_url: usage dict}`` (see :meth:`get_usage`); the dicts add up to the pool's
            own usage, response-cache hits and cancelled requests aside (those count in the
            pool only: no endpoint answered them).
        """
        with self._lock:
            return {e.spec.base_url: e.usage.as_dict() for e in self._endpoints}

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Each endpoint's state: ``base_url``, ``healthy``, ``outstanding`` requests,
        ``failures`` (attempts that failed), ``consecutive_failures`` and ``requests``
        answered."""
        with self._lock:
            return [
                {
                    "base_url": e.spec.base_url,
                    "healthy": e.healthy,
                    "outstanding": e.outstanding,
                    "failures": e.failures,
                    "consecutive_failures": e.consecutive_failures,
                    "requests": e.usage.requests,
                }
                for e in self._endpoints
            ]

    def clear_usage(self) -> None:
        """Set the pool's usage and every endpoint's usage back to zero."""
        super().clear_usage()
        with self._lock:
            for endpoint in self._endpoints:
                endpoint.usage = Usage()

    async def aclose(self) -> None:
        """Close the connections every endpoint opened on the running event loop."""
        for endpoint in self._endpoints:
            await endpoint.client.aclose()

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments without the API key (it comes from the environment again)."""
        config = super().get_config()
        config["endpoints"] = [spec.get_config() for spec in self.endpoints]
        config["timeout"] = self.timeout
        if self.structured_output != "json_schema":
            config["structured_output"] = self.structured_output
        for name, default in (
            ("failure_threshold", 2),
            ("health_check_interval", 10.0),
            ("health_check_timeout", 5.0),
        ):
            if getattr(self, name) != default:
                config[name] = getattr(self, name)
        return config
