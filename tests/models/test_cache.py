"""The SQLite response cache: modes, keys, usage of hits, and concurrent/killed writers."""

import asyncio
import multiprocessing
import os
import pickle
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio._runtime import run
from afnio.models import CacheMissError, ResponseCache
from afnio.models.cache import CACHE_FILENAME, CachedResponse
from afnio.models.tokens import count_message_tokens, count_tokens
from afnio.testing import ScriptedModel

HELLO = [{"role": "user", "content": "hello"}]
OTHER = [{"role": "user", "content": "something else"}]


def rows(path):
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT * FROM responses").fetchall()


def integrity(path):
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


# Modes ------------------------------------------------------------------------------------------


def test_hit_is_not_sent_again_and_costs_nothing(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    model = ScriptedModel(["first", "second"], cache=cache)
    assert model.chat(HELLO) == "first"
    after_miss = model.get_usage()
    assert model.chat(HELLO) == "first"
    assert model.calls == 1
    prompt = count_message_tokens(HELLO, "scripted")
    completion = count_tokens("first", "scripted")
    assert after_miss == {
        "requests": 1,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 0,
        "cost_usd": 0.0,
    }
    assert model.get_usage() == {**after_miss, "cached_tokens": prompt + completion}


def test_different_requests_miss(tmp_path):
    model = ScriptedModel(["a", "b", "c", "d"], cache=ResponseCache(tmp_path / "c.sqlite"))
    assert [model.chat(HELLO), model.chat(OTHER), model.chat(HELLO, temperature=0.5)] == [
        "a",
        "b",
        "c",
    ]
    assert model.calls == 3


def test_cache_is_shared_between_clients_of_the_same_model(tmp_path):
    path = tmp_path / "c.sqlite"
    ScriptedModel(["stored"], cache=ResponseCache(path)).chat(HELLO)
    later = ScriptedModel(["fresh"], cache=ResponseCache(path))
    assert later.chat(HELLO) == "stored" and later.calls == 0
    other_model = ScriptedModel(["fresh"], model="other", cache=ResponseCache(path))
    assert other_model.chat(HELLO) == "fresh"


def test_read_only_reads_but_never_writes(tmp_path):
    path = tmp_path / "c.sqlite"
    ScriptedModel(["stored"], cache=ResponseCache(path)).chat(HELLO)
    model = ScriptedModel(["fresh"], cache=ResponseCache(path, mode="read_only"))
    assert model.chat(HELLO) == "stored"
    assert model.chat(OTHER) == "fresh"
    assert model.chat(OTHER) == "fresh" and model.calls == 2
    assert len(rows(path)) == 1


def test_replay_miss_is_an_error_and_sends_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    ScriptedModel(["stored"], cache=ResponseCache(path)).chat(HELLO)
    model = ScriptedModel(["fresh"], cache=ResponseCache(path, mode="replay"))
    assert model.chat(HELLO) == "stored"
    with pytest.raises(CacheMissError, match="mode is 'replay', so nothing was sent"):
        model.chat(OTHER)
    assert model.calls == 0
    assert model.get_usage()["requests"] == 0


def test_off_neither_reads_nor_writes(tmp_path):
    path = tmp_path / "c.sqlite"
    model = ScriptedModel(["a", "b"], cache=ResponseCache(path, mode="off"))
    assert [model.chat(HELLO), model.chat(HELLO)] == ["a", "b"]
    assert not path.exists()


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of off, read_write, read_only, replay"):
        ResponseCache("x.sqlite", mode="write")


def test_default_location_comes_from_afnio_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AFNIO_CACHE_DIR", str(tmp_path / "cache-dir"))
    cache = ResponseCache()
    assert cache.path == str(tmp_path / "cache-dir" / CACHE_FILENAME)
    assert os.path.exists(cache.path)
    monkeypatch.delenv("AFNIO_CACHE_DIR")
    with pytest.raises(ValueError, match="no path given and AFNIO_CACHE_DIR is not set"):
        ResponseCache()


def test_client_config_keeps_the_cache_path_and_mode(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite", mode="read_only")
    model = ScriptedModel(cache=cache)
    assert model.get_config()["cache"] == {"path": str(tmp_path / "c.sqlite"), "mode": "read_only"}
    rebuilt = ScriptedModel.from_config(model.get_config())
    assert (rebuilt.cache.path, rebuilt.cache.mode) == (cache.path, "read_only")
    assert pickle.loads(pickle.dumps(cache)).get_config() == cache.get_config()


def test_client_rejects_a_non_cache():
    with pytest.raises(TypeError, match="cache must be a ResponseCache or None, got str"):
        ScriptedModel(cache="cache.sqlite")


def test_concurrent_requests_through_one_cache(tmp_path):
    model = ScriptedModel(
        lambda messages, **kw: messages[-1]["content"].upper(),
        latency=0.001,
        cache=ResponseCache(tmp_path / "c.sqlite"),
    )
    prompts = [[{"role": "user", "content": f"q{i % 10}"}] for i in range(40)]

    async def ask_all():
        return await asyncio.gather(*(model.achat(p) for p in prompts))

    assert run(ask_all()) == [f"Q{i % 10}" for i in range(40)]
    first_round = model.calls  # concurrent misses of one key may each be sent
    assert 10 <= first_round <= 40
    assert run(ask_all()) == [f"Q{i % 10}" for i in range(40)]
    assert model.calls == first_round
    assert len(rows(tmp_path / "c.sqlite")) == 10


# Keys -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
def test_key_ignores_argument_order(args):
    reordered = dict(reversed(list(args.items())))
    assert ResponseCache.key("p", "m", HELLO, args) == ResponseCache.key("p", "m", HELLO, reordered)


def test_key_depends_on_every_part():
    base = ResponseCache.key("openai", "m", HELLO, {"temperature": 0})
    assert (
        len(
            {
                base,
                ResponseCache.key("anthropic", "m", HELLO, {"temperature": 0}),
                ResponseCache.key("openai", "n", HELLO, {"temperature": 0}),
                ResponseCache.key("openai", "m", OTHER, {"temperature": 0}),
                ResponseCache.key("openai", "m", HELLO, {"temperature": 1}),
                ResponseCache.key("openai", "m", HELLO, {"temperature": 0}, endpoint="http://a"),
                ResponseCache.key("openai", "m", HELLO, {"temperature": 0}, endpoint="http://b"),
            }
        )
        == 7
    )


def test_two_servers_with_the_same_model_name_never_share_answers(tmp_path):
    # Issue 14, defect 6: a second server got the first server's answers and 0 requests.
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import FakeProviderServer

    cache = ResponseCache(tmp_path / "shared.sqlite")
    with FakeProviderServer(reply=lambda body: "from A") as a, \
            FakeProviderServer(reply=lambda body: "from B") as b:
        first = AsyncOpenAI("llama3", base_url=a.openai_base_url, cache=cache, context_window=4096)
        second = AsyncOpenAI("llama3", base_url=b.openai_base_url, cache=cache,
                             context_window=4096)
        assert first.chat(HELLO) == "from A"
        assert second.chat(HELLO) == "from B"
        assert first.chat(HELLO) == "from A"  # and each still hits its own entry
        assert (len(a.requests), len(b.requests)) == (1, 1)
    assert first.endpoint != second.endpoint and len(rows(tmp_path / "shared.sqlite")) == 2


# Damaged and foreign files ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["read_write", "read_only", "replay"])
def test_a_file_that_is_not_sqlite_is_a_clear_error_at_open(tmp_path, mode):
    # Issue 14, defect 6: a raw sqlite3.DatabaseError with no path, sometimes only mid-training.
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is a text file, not a database\n" * 200)
    with pytest.raises(ValueError, match=f"{str(path)!r} is not a usable afnio response cache: "
                                         "it can't be read as SQLite.*Delete or move that file"):
        ResponseCache(path, mode=mode)


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="SQLite database with other tables \\(users\\)"):
        ResponseCache(path)
    assert path.read_bytes() == before
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE responses (key TEXT, other TEXT)")
    with pytest.raises(ValueError, match="its responses table has columns"):
        ResponseCache(path)


def test_a_damaged_cache_page_is_found_at_open(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    for i in range(300):
        cache.put(f"k{i}", CachedResponse("reply " * 50), provider="p", model="m")
    cache.close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data) - page, page):  # scribble over every data page
        data[offset + 100 : offset + 400] = os.urandom(300)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{str(path)!r} is not a usable afnio response cache"):
        ResponseCache(path)


def test_a_cache_damaged_while_in_use_names_its_path(tmp_path):
    from afnio.models import ModelError

    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    model = ScriptedModel(cache=cache)
    model.chat(HELLO)
    cache.close()
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_bytes(b"garbage" * 1000)
    with pytest.raises(ModelError, match=f"{str(path)!r} is not a usable afnio response cache"):
        model.chat(OTHER)


def test_unserializable_argument_is_a_clear_error(tmp_path):
    model = ScriptedModel(cache=ResponseCache(tmp_path / "c.sqlite"))
    with pytest.raises(TypeError, match="value of type object is not JSON-serializable"):
        model.chat(HELLO, response_format=object())
    assert model.calls == 0


def test_pydantic_response_format_is_keyed_by_its_schema():
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        value: int

    class Other(pydantic.BaseModel):
        value: str

    assert ResponseCache.key("p", "m", HELLO, {"response_format": Answer}) != ResponseCache.key(
        "p", "m", HELLO, {"response_format": Other}
    )


# Concurrent and killed writers ------------------------------------------------------------------


def test_threads_write_at_once(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")

    def write(worker):
        for i in range(100):
            cache.put(
                f"k{worker}-{i}", CachedResponse(f"v{worker}-{i}", 1, 1), provider="p", model="m"
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert len(cache) == 800
    assert cache.get("k7-99") == CachedResponse("v7-99", 1, 1)


def _write_keys(path, worker, barrier, count, shared):
    cache = ResponseCache(path)
    barrier.wait()
    for i in range(count):
        key = f"shared-{i}" if i < shared else f"w{worker}-{i}"
        cache.put(key, CachedResponse(f"from {worker}", i, 1), provider="p", model="m")


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ResponseCache(path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_write_keys, args=(path, w, barrier, 300, 100)) for w in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert integrity(path) == "ok"
    cache = ResponseCache(path)
    assert len(cache) == 2 * 200 + 100
    assert cache.get("shared-5").text in {"from 0", "from 1"}
    assert cache.get("w1-299") == CachedResponse("from 1", 299, 1)


def _write_until_killed(path, written, parent):
    """Write rows until killed; bounded (at most 2,000 rows of 20 kB, then idle) and gone once
    the test process is, so an interrupted test can never fill the disk."""
    cache = ResponseCache(path)
    i = 0
    while os.getppid() == parent:
        if i < 2_000:
            cache.put(f"k{i}", CachedResponse("x" * 20_000, i, 1), provider="p", model="m")
            with written.get_lock():
                written.value = i + 1
            i += 1
        else:
            time.sleep(0.05)


def test_killed_writer_leaves_a_readable_cache(tmp_path):
    path = str(tmp_path / "c.sqlite")
    context = multiprocessing.get_context("spawn")
    written = context.Value("i", 0)
    writer = context.Process(target=_write_until_killed, args=(path, written, os.getpid()))
    writer.start()
    try:
        while written.value < 200 and writer.is_alive():
            writer.join(timeout=0.01)
        assert writer.is_alive(), "the writer died on its own"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    assert writer.exitcode == -signal.SIGKILL
    committed = written.value
    assert integrity(path) == "ok"
    cache = ResponseCache(path)
    assert len(cache) >= committed
    assert all(cache.get(f"k{i}") == CachedResponse("x" * 20_000, i, 1) for i in range(committed))
    cache.put("after", CachedResponse("still writable"), provider="p", model="m")
    assert cache.get("after").text == "still writable"


def test_a_locked_database_never_stalls_the_event_loop(tmp_path):
    path = str(tmp_path / "c.sqlite")
    cache = ResponseCache(path)
    cache.put("k", CachedResponse("v"), provider="p", model="m")
    cache.close()  # an exclusive lock can only be taken while no other connection is open
    locked, release, errors = threading.Event(), threading.Event(), []

    def hold_an_exclusive_lock():
        try:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("PRAGMA locking_mode=EXCLUSIVE")
            connection.execute("INSERT INTO responses VALUES ('x', 'p', 'm', 't', 0, 0, 0)")
        except sqlite3.Error as error:
            errors.append(error)
            return
        finally:
            locked.set()
        release.wait()
        connection.close()

    holder = threading.Thread(target=hold_an_exclusive_lock)
    holder.start()
    locked.wait()
    assert errors == []
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(path, timeout=0).execute("SELECT * FROM responses").fetchall()

    async def lookup_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 5:
                    release.set()  # the loop kept running while the lookup waited
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        response = await cache.aget("k")
        ticker.cancel()
        return response, ticks

    response, ticks = run(lookup_while_ticking())
    holder.join()
    assert response == CachedResponse("v")
    assert ticks >= 5
