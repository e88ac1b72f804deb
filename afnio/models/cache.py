"""A response cache on SQLite: the same request is answered once and replayed after.

The key of a request is the SHA-256 of the canonical JSON of ``(provider, endpoint, model,
messages, completion_args)`` — the endpoint (a client's base URL) keeps two servers serving a
model of the same name apart; the row holds only that hash, the provider and model names, the
reply text and its token counts — never the messages in clear, and never an API key (clients
don't put keys in any of the hashed fields).

Opening a file that is not an afnio cache (another program's SQLite database, a damaged or
truncated file) raises a ``ValueError`` naming the path and how to start afresh; a cache that
becomes unreadable later raises :class:`~afnio.models.errors.ModelError` the same way.

Modes:

- ``"off"``: the cache is neither read nor written.
- ``"read_write"``: answer from the cache when possible; store every new reply.
- ``"read_only"``: answer from the cache when possible; store nothing.
- ``"replay"``: answer only from the cache; a miss raises :class:`CacheMissError` and nothing
  is sent (reproduce a run exactly, offline).

The database uses WAL journaling, short transactions and a busy timeout, so threads and processes
may read and write it at once, and a writer killed mid-way leaves it readable.

Example:
    >>> import tempfile, os
    >>> cache = ResponseCache(os.path.join(tempfile.mkdtemp(), "cache.sqlite"))
    >>> key = cache.key("openai", "gpt-4.1-nano", [{"role": "user", "content": "hi"}], {},
    ...                 endpoint="https://api.openai.com/v1")
    >>> cache.get(key) is None
    True
    >>> cache.put(key, CachedResponse("hello", prompt_tokens=8, completion_tokens=1),
    ...           provider="openai", model="gpt-4.1-nano")
    >>> cache.get(key).text
    'hello'
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from afnio.models.errors import CacheMissError, ModelError

__all__ = ["CACHE_FILENAME", "CACHE_MODES", "CachedResponse", "ResponseCache", "default_cache_path"]

CACHE_MODES = ("off", "read_write", "read_only", "replay")
CACHE_FILENAME = "afnio_cache.sqlite"
_BUSY_TIMEOUT_MS = 60_000
_LOCKED_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)

_APPLICATION_ID = 0x6166_6E69  # "afni": marks a SQLite file as an afnio response cache
_COLUMNS = ("key", "provider", "model", "text", "prompt_tokens", "completion_tokens", "created")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


@dataclass(frozen=True)
class CachedResponse:
    """A stored reply and the tokens it took to produce.

    Attributes:
        text: The reply.
        prompt_tokens: Prompt tokens of the original request.
        completion_tokens: Completion tokens of the original request.
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def default_cache_path() -> str:
    """``$AFNIO_CACHE_DIR/afnio_cache.sqlite``.

    Raises:
        ValueError: If ``AFNIO_CACHE_DIR`` is not set (afnio never picks a location by itself).
    """
    directory = os.environ.get("AFNIO_CACHE_DIR")
    if not directory:
        raise ValueError(
            "ResponseCache: no path given and AFNIO_CACHE_DIR is not set; pass "
            "ResponseCache(path=...) or set AFNIO_CACHE_DIR to the directory to keep the cache in"
        )
    return os.path.join(directory, CACHE_FILENAME)


def _is_locked(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is None:
        return "locked" in str(error)
    return code & 0xFF in _LOCKED_CODES


def _json_default(value: Any) -> Any:
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return {"__schema__": value.__qualname__, "schema": schema()}
    raise TypeError(
        f"ResponseCache.key: completion argument value of type {type(value).__name__} is not "
        f"JSON-serializable, so the request can't be cached"
    )


class ResponseCache:
    """Replies keyed by request, in a SQLite file shared by threads and processes.

    Args:
        path: The database file (created with its directory if missing); ``None`` uses
            :func:`default_cache_path`.
        mode: One of :data:`CACHE_MODES`.

    Raises:
        ValueError: If ``mode`` is unknown, or no path is given and ``AFNIO_CACHE_DIR`` is unset.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, mode: str = "read_write"
    ) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(
                f"ResponseCache: mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}"
            )
        self.path = os.fspath(path) if path is not None else default_cache_path()
        self.mode = mode
        self._local = threading.local()
        if mode != "off":
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            try:
                self._open()
            except sqlite3.DatabaseError as error:
                self.close()
                raise ValueError(self._unusable(f"it can't be read as SQLite ({error})")) from None
            except ValueError:
                self.close()
                raise

    def _unusable(self, why: str) -> str:
        return (
            f"ResponseCache: {self.path!r} is not a usable afnio response cache: {why}. Delete "
            f"or move that file to start a new, empty cache there (cached replies are only a "
            f"speed-up; they are fetched again), or give another path"
        )

    def _open(self) -> None:
        """Check the file is an afnio cache (creating it if it is new) and set it up."""
        connection = self._connection()
        result = connection.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            raise ValueError(self._unusable(f"SQLite reports damage ({result and result[0]})"))
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        if tables and application_id not in (0, _APPLICATION_ID):
            raise ValueError(self._unusable(
                f"it is another program's SQLite database (application_id {application_id:#x})"))
        if tables and "responses" not in tables:
            raise ValueError(self._unusable(
                f"it is a SQLite database with other tables ({', '.join(sorted(tables))})"))
        if "responses" in tables:
            columns = tuple(row[1] for row in connection.execute("PRAGMA table_info(responses)"))
            if columns != _COLUMNS:
                raise ValueError(self._unusable(
                    f"its responses table has columns {columns}, not {_COLUMNS}"))
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(_SCHEMA)
        if application_id != _APPLICATION_ID:
            connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn damage found while using the file into a ModelError naming it."""
        try:
            yield
        except sqlite3.OperationalError as error:
            if _is_locked(error):
                raise
            raise ModelError(self._unusable(str(error))) from None
        except sqlite3.DatabaseError as error:
            raise ModelError(self._unusable(str(error))) from None

    def __repr__(self) -> str:
        return f"ResponseCache(path={self.path!r}, mode={self.mode!r})"

    def get_config(self) -> dict[str, str]:
        """``{"path": ..., "mode": ...}``, enough to reopen the same cache."""
        return {"path": self.path, "mode": self.mode}

    def __getstate__(self) -> dict[str, str]:
        return self.get_config()

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"], state["mode"])

    @property
    def reads(self) -> bool:
        """Whether lookups are answered from the cache."""
        return self.mode != "off"

    @property
    def writes(self) -> bool:
        """Whether new replies are stored."""
        return self.mode == "read_write"

    def _connection(self, *, wait: bool = True) -> sqlite3.Connection:
        # One connection per thread and process: sqlite3 connections may not cross threads,
        # and a connection inherited through fork must not be used by the child. A second,
        # non-waiting connection lets the event-loop thread try a read without ever blocking.
        attribute = "connection" if wait else "nowait_connection"
        cached = getattr(self._local, attribute, None)
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        timeout_ms = _BUSY_TIMEOUT_MS if wait else 0
        connection = sqlite3.connect(self.path, timeout=timeout_ms / 1000, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={timeout_ms}")
        connection.execute("PRAGMA synchronous=NORMAL")
        setattr(self._local, attribute, (os.getpid(), connection))
        return connection

    @staticmethod
    def key(
        provider: str,
        model: str,
        messages: list[dict[str, Any]],
        completion_args: dict[str, Any],
        *,
        endpoint: str | None = None,
    ) -> str:
        """The SHA-256 hex digest of the canonical JSON of a request.

        Canonical: keys sorted, no insignificant whitespace, Unicode kept as is; a pydantic model
        class (a ``response_format``) stands for its JSON schema.

        Args:
            provider: The client's provider.
            model: The model name.
            messages: The request's messages.
            completion_args: The request's completion arguments.
            endpoint: Where the request goes (a base URL), ``None`` for an in-process model.

        Raises:
            TypeError: If a completion argument can't be represented as JSON.
        """
        canonical = json.dumps(
            {
                "provider": provider,
                "endpoint": endpoint,
                "model": model,
                "messages": messages,
                "completion_args": completion_args,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            default=_json_default,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def get(self, key: str) -> CachedResponse | None:
        """The stored reply for ``key``, or None (also None when the mode is ``off``).

        Waits (up to the busy timeout) while another connection holds the database locked.
        """
        if not self.reads:
            return None
        with self._guard():
            return self._select(self._connection(), key)

    @staticmethod
    def _select(connection: sqlite3.Connection, key: str) -> CachedResponse | None:
        row = connection.execute(
            "SELECT text, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else CachedResponse(*row)

    def put(self, key: str, response: CachedResponse, *, provider: str, model: str) -> None:
        """Store ``response`` under ``key`` (a no-op unless the mode is ``read_write``).

        The first reply stored for a key wins; a concurrent duplicate is ignored.
        """
        if not self.writes:
            return
        with self._guard():
            self._insert(key, response, provider, model)

    def _insert(self, key: str, response: CachedResponse, provider: str, model: str) -> None:
        self._connection().execute(
            "INSERT OR IGNORE INTO responses "
            "(key, provider, model, text, prompt_tokens, completion_tokens, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                provider,
                model,
                response.text,
                response.prompt_tokens,
                response.completion_tokens,
                time.time(),
            ),
        )

    async def aget(self, key: str) -> CachedResponse | None:
        """:meth:`get` that never stalls the event loop.

        A WAL read almost never waits, so it is first tried right here with a zero busy
        timeout (a few microseconds); only if the database is locked does the lookup move to a
        worker thread, where it may wait.

        Raises:
            CacheMissError: In ``replay`` mode, when ``key`` is not stored.
        """
        if not self.reads:
            return None
        try:
            with self._guard():
                response = self._select(self._connection(wait=False), key)
        except sqlite3.OperationalError:  # locked (the guard re-raises only that)
            response = await asyncio.to_thread(self.get, key)
        if response is None and self.mode == "replay":
            raise CacheMissError(
                f"{self!r}: no cached reply for request {key[:16]}… and the mode is 'replay', "
                f"so nothing was sent"
            )
        return response

    async def aput(self, key: str, response: CachedResponse, *, provider: str, model: str) -> None:
        """:meth:`put` in a worker thread."""
        if self.writes:
            await asyncio.to_thread(self.put, key, response, provider=provider, model=model)

    def close(self) -> None:
        """Close the calling thread's connections (they reopen on next use)."""
        for attribute in ("connection", "nowait_connection"):
            cached = getattr(self._local, attribute, None)
            if cached is not None:
                delattr(self._local, attribute)
                if cached[0] == os.getpid():
                    cached[1].close()

    def __len__(self) -> int:
        if not self.reads:
            return 0
        return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def clear(self) -> None:
        """Delete every stored reply.

        Raises:
            ValueError: If the mode doesn't allow writing.
        """
        if not self.writes:
            raise ValueError(f"{self!r}: clear() needs mode 'read_write'")
        self._connection().execute("DELETE FROM responses")
