"""structured_output_args per backend, and the switch to tags when a server rejects the format."""

from __future__ import annotations

import json

import pytest

from afnio.models import StructuredOutputUnsupportedError
from afnio.models.anthropic import AsyncAnthropic
from afnio.models.errors import InvalidRequestError
from afnio.models.model import client_from_config, client_to_config, openai_json_schema
from afnio.models.openai import AsyncOpenAI
from afnio.testing import ScriptedModel

pytestmark = pytest.mark.filterwarnings("ignore:no price known")

ASK = [{"role": "user", "content": "Is the sky blue?"}]
LABEL = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}},
         "required": ["label"], "additionalProperties": False}
LOOSE = {"type": "object", "properties": {"label": {"type": "string"}}}
FAST = {"retry_base_delay": 0.001, "retry_max_delay": 0.005, "max_retries": 3}
# What llama_cpp.server answers to OpenAI's json_schema format (observed, abridged).
LLAMA_SERVER_REJECTION = {
    "status": 500,
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
               "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}",
}


def test_openai_form_is_strict_only_when_the_schema_allows_it():
    assert openai_json_schema(LABEL, "label") == {
        "type": "json_schema",
        "json_schema": {"name": "label", "schema": LABEL, "strict": True},
    }
    assert openai_json_schema(LOOSE, "label")["json_schema"]["strict"] is False
    nested = {"type": "object", "properties": {"inner": LOOSE}, "required": ["inner"],
              "additionalProperties": False}
    assert openai_json_schema(nested, "n")["json_schema"]["strict"] is False


def test_scripted_model_offers_both_paths():
    assert ScriptedModel().structured_output_args(LABEL, "label") is None
    structured = ScriptedModel(['{"label": "yes"}'], structured_output=True)
    args = structured.structured_output_args(LABEL, "label")
    assert args == {"response_format": openai_json_schema(LABEL, "label")}
    assert structured.chat(ASK, **args) == '{"label": "yes"}'
    assert structured.requests[-1][1] == args
    rebuilt = client_from_config(client_to_config(structured))
    assert rebuilt.structured_output_args(LABEL, "label") == args


def test_a_rejected_format_is_not_retried_and_turns_structured_outputs_off():
    def reply(messages, **kwargs):
        if "response_format" in kwargs:
            raise StructuredOutputUnsupportedError("format not supported", status=400)
        return "yes"

    model = ScriptedModel(reply, structured_output=True, **FAST)
    args = model.structured_output_args(LABEL, "label")
    with pytest.raises(StructuredOutputUnsupportedError):
        model.chat(ASK, **args)
    assert model.calls == 1
    assert model.structured_output_args(LABEL, "label") is None
    assert model.chat(ASK) == "yes"  # the caller asks again with tags


@pytest.mark.parametrize("bad", [("not a dict", "label"), (LABEL, ""), (LABEL, 3)])
def test_bad_schema_arguments_are_refused(bad):
    with pytest.raises(TypeError, match="structured_output_args"):
        ScriptedModel(structured_output=True).structured_output_args(*bad)


@pytest.mark.parametrize(
    ("flavour", "sent"),
    [
        ("json_schema", {"response_format": openai_json_schema(LABEL, "label")}),
        ("llama.cpp", {"response_format": {"type": "json_object", "schema": LABEL}}),
        ("vllm", {"guided_json": LABEL}),
    ],
)
def test_openai_compatible_flavours_reach_the_server(server, flavour, sent):
    client = AsyncOpenAI("m", base_url=server.openai_base_url, structured_output=flavour,
                         context_window=4096)
    args = client.structured_output_args(LABEL, "label")
    client.chat(ASK, **args)
    body = server.requests[-1]
    assert {key: body[key] for key in sent} == sent
    assert client_from_config(client_to_config(client)).structured_output == flavour


def test_no_flavour_means_no_structured_outputs(server):
    client = AsyncOpenAI("m", base_url=server.openai_base_url, structured_output=None)
    assert client.structured_output_args(LABEL, "label") is None


def test_flavours_are_checked():
    with pytest.raises(ValueError, match="structured_output must be one of"):
        AsyncOpenAI("m", base_url="http://127.0.0.1:9/v1", structured_output="xml")
    with pytest.raises(ValueError, match="is for an OpenAI-compatible server"):
        AsyncOpenAI("gpt-4.1-nano", api_key="sk-t", structured_output="llama.cpp")
    assert AsyncOpenAI("gpt-4.1-nano", api_key="sk-t").structured_output_args(LABEL, "x") == {
        "response_format": openai_json_schema(LABEL, "x")}


def test_a_server_rejecting_json_schema_switches_the_client_to_tags(server):
    # Issue 19: llama.cpp's server answered 500 to json_schema and afnio retried it 3 times.
    client = AsyncOpenAI("m", base_url=server.openai_base_url, context_window=4096, **FAST)
    args = client.structured_output_args(LABEL, "label")
    server.inject(LLAMA_SERVER_REJECTION)
    with pytest.raises(StructuredOutputUnsupportedError,
                       match="HTTP 500: the server rejected the structured-output format "
                             "\\(response_format 'json_schema'\\)"
                       ) as raised:
        client.chat(ASK, **args)
    assert raised.value.field == "response_format" and server.url in str(raised.value)
    assert len(server.requests) == 1  # not retried
    assert client.structured_output_args(LABEL, "label") is None
    assert client.chat(ASK) == ASK[0]["content"]  # the plain request goes through


def test_the_same_error_without_a_format_is_an_invalid_request(server):
    client = AsyncOpenAI("m", base_url=server.openai_base_url, context_window=4096, **FAST)
    server.inject(LLAMA_SERVER_REJECTION)
    with pytest.raises(InvalidRequestError) as raised:
        client.chat(ASK)
    assert not isinstance(raised.value, StructuredOutputUnsupportedError)
    assert client.structured_output_args(LABEL, "label") is not None


def test_anthropic_uses_its_structured_output(server):
    client = AsyncAnthropic("claude-haiku-4-5", base_url=server.anthropic_base_url,
                            api_key="sk-t", **FAST)
    args = client.structured_output_args(LABEL, "label")
    client.chat(ASK, **args)
    assert server.requests[-1]["output_config"] == {
        "format": {"type": "json_schema", "schema": LABEL}}
    server.inject({"status": 400, "message": "output_config.format: not supported by this model"})
    with pytest.raises(StructuredOutputUnsupportedError):
        client.chat(ASK, **args)
    assert client.structured_output_args(LABEL, "label") is None


def test_a_plain_server_error_on_a_structured_request_is_still_retried(server):
    client = AsyncOpenAI("m", base_url=server.openai_base_url, context_window=4096, **FAST)
    args = client.structured_output_args(LABEL, "label")
    server.inject(503)
    assert json.loads(json.dumps(client.chat(ASK, **args))) == ASK[0]["content"]
    assert len(server.requests) == 2 and client.structured_output_args(LABEL, "label")
