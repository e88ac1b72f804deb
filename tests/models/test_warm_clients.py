"""Clients are warm from their first request: the token encoding loads in the background when a
client is created, and clients of one endpoint share one connection pool per event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from afnio.models import tokens
from afnio.models._sdk import CONNECTIONS
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.openai import AsyncOpenAI
from afnio.testing import FakeProviderServer, ScriptedModel

ASK = [{"role": "user", "content": "two words"}]
KITS = {
    "openai": (AsyncOpenAI, "gpt-4.1-nano", "openai_base_url"),
    "anthropic": (AsyncAnthropic, "claude-haiku-4-5", "anthropic_base_url"),
}


def clients_of(server: FakeProviderServer, api: str, count: int, **kwargs):
    client_class, model, attribute = KITS[api]
    return [client_class(model, base_url=getattr(server, attribute), api_key="test-key", **kwargs)
            for _ in range(count)]


@pytest.mark.parametrize("api", sorted(KITS))
def test_clients_of_one_endpoint_share_its_connections_until_the_last_lets_go(api):
    with FakeProviderServer(reply=lambda body: "hi") as server:
        forward, backward, optimizer = clients_of(server, api, 3)
        before = len(CONNECTIONS)

        async def three_clients_in_turn():
            for client in (forward, backward, optimizer, forward):
                assert await client.achat(ASK) == "hi"
            opened = server.connections_opened
            shared = len(CONNECTIONS) - before
            await forward.aclose()
            # The pool stays open for the clients still using it...
            assert await backward.achat(ASK) == "hi"
            await backward.aclose()
            assert await optimizer.achat(ASK) == "hi"
            await optimizer.aclose()
            # ...and closes with the last of them.
            return opened, shared, len(CONNECTIONS) - before

        assert asyncio.run(three_clients_in_turn()) == (1, 1, 0)
        assert len(server.requests) == 6


@pytest.mark.parametrize("api", sorted(KITS))
def test_a_loop_that_ends_closes_the_shared_pool_without_aclose(api):
    # Nothing is closed explicitly: the loop's shutdown must close the connections, or the
    # suite's ResourceWarning-as-error filter fails this test.
    with FakeProviderServer(reply=lambda body: "hi") as server:
        first, second = clients_of(server, api, 2)
        before = len(CONNECTIONS)

        async def both():
            return await asyncio.gather(first.achat(ASK), second.achat(ASK))

        assert asyncio.run(both()) == ["hi", "hi"]
        assert asyncio.run(both()) == ["hi", "hi"]  # a new loop: a new pool, closed in turn
        assert len(CONNECTIONS) == before


def test_other_endpoints_and_timeouts_get_their_own_connections():
    with FakeProviderServer(reply=lambda body: "a") as one, \
            FakeProviderServer(reply=lambda body: "b") as other:
        here = clients_of(one, "openai", 1)[0]
        there = clients_of(other, "openai", 1)[0]
        patient = clients_of(one, "openai", 1, timeout=123.0)[0]
        before = len(CONNECTIONS)

        async def each():
            replies = [await here.achat(ASK), await there.achat(ASK), await patient.achat(ASK)]
            pools = len(CONNECTIONS) - before
            for client in (here, there, patient):
                await client.aclose()
            return replies, pools

        assert asyncio.run(each()) == (["a", "b", "a"], 3)
        assert (one.connections_opened, other.connections_opened) == (2, 1)


@pytest.fixture
def unloaded_encodings(monkeypatch):
    """No encoding loaded yet; reading one waits for ``gate`` and is recorded in ``reads``."""
    gate, reads = threading.Event(), []
    read = tokens._read_encoding

    def gated_read(name):
        reads.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            gate.wait()
        return read(name)

    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tokens, "_preloading", set())
    monkeypatch.setattr(tokens, "_read_encoding", gated_read)
    yield gate, reads
    gate.set()


def test_a_new_client_loads_its_encoding_in_the_background_once(unloaded_encodings):
    gate, reads = unloaded_encodings
    ScriptedModel(model="gpt-4.1-nano")  # returns while the load waits at the gate
    ScriptedModel(model="gpt-4.1-nano")  # loading already: no second load
    counted: list[int] = []
    counter = threading.Thread(target=lambda: counted.append(
        tokens.count_tokens("hello world", "gpt-4.1-nano")))
    counter.start()
    gate.set()
    counter.join()
    assert counted == [2]
    assert len(reads) == 1 and reads[0] is not threading.main_thread()
    assert reads[0].name.startswith("afnio-tokenizer-")
