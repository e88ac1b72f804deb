"""ScriptedModel: replies, recorded requests, and the shared request pipeline."""

import asyncio
import copy

import pytest

from afnio._runtime import run
from afnio.models import (
    BudgetExceededError,
    ChatCompletionModel,
    Completion,
    ResponseCache,
    client_from_config,
    client_to_config,
)
from afnio.testing import ScriptedModel

HELLO = [{"role": "user", "content": "hello"}]


def test_list_replies_cycle():
    model = ScriptedModel(["a", "b"])
    assert [model.chat(HELLO) for _ in range(3)] == ["a", "b", "a"]


def test_default_echoes_the_last_user_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "x"}, {"role": "user", "content": "last"}]
    assert ScriptedModel().chat(messages) == "last"


def test_function_replies_see_messages_and_arguments():
    model = ScriptedModel(lambda messages, **kw: f"{messages[-1]['content']} t={kw['temperature']}")
    assert model.chat(HELLO, temperature=0.3) == "hello t=0.3"
    assert model.requests == [(HELLO, {"temperature": 0.3})]


def test_async_function_replies():
    async def reply(messages, **kw):
        await asyncio.sleep(0)
        return "async"

    assert ScriptedModel(reply).chat(HELLO) == "async"


def test_non_string_reply_is_an_error():
    with pytest.raises(TypeError, match="ScriptedModel reply must be a str, got int"):
        ScriptedModel(lambda messages, **kw: 3).chat(HELLO)


def test_empty_reply_list_is_an_error():
    with pytest.raises(ValueError, match="empty list of replies"):
        ScriptedModel([]).chat(HELLO)


def test_bad_replies_argument_is_rejected():
    with pytest.raises(TypeError, match="replies must be a function, a list of str or None"):
        ScriptedModel("just one string")


def test_requests_are_copies():
    messages = [{"role": "user", "content": "original"}]
    model = ScriptedModel()
    model.chat(messages)
    messages[0]["content"] = "changed"
    assert model.requests[0][0] == [{"role": "user", "content": "original"}]


def test_latency_lets_requests_overlap_and_reset_forgets():
    model = ScriptedModel(latency=0.01)

    async def five():
        await asyncio.gather(*(model.achat(HELLO) for _ in range(5)))

    run(five())
    assert (model.calls, model.max_in_flight, model.in_flight) == (5, 5, 0)
    model.reset()
    assert (model.calls, model.max_in_flight, model.requests) == (0, 0, [])


def test_cache_hits_and_refusals_are_not_requests(tmp_path):
    model = ScriptedModel(cache=ResponseCache(tmp_path / "c.sqlite"), budget_tokens=20,
                          max_tokens=5)
    model.chat(HELLO)
    model.chat(HELLO)  # a hit
    with pytest.raises(BudgetExceededError):
        model.chat([{"role": "user", "content": "new"}])
    assert model.calls == 1


@pytest.mark.parametrize(
    ("messages", "error", "message"),
    [
        ([], TypeError, "messages must be a non-empty list"),
        ("hello", TypeError, "messages must be a non-empty list"),
        (["hello"], TypeError, r"messages\[0\] must be a dict, got str"),
        ([{"role": "robot", "content": "x"}], ValueError, r"\['role'\] must be one of"),
        ([{"role": "user", "content": None}], TypeError, r"\['content'\] must be a str"),
    ],
)
def test_malformed_messages_are_refused_before_sending(messages, error, message):
    model = ScriptedModel()
    with pytest.raises(error, match=f"ScriptedModel.achat: (messages\\[0\\])?{message}"):
        model.chat(messages)
    assert model.calls == 0


def test_config_round_trip():
    model = ScriptedModel(latency=0.5, model="m1", max_concurrency=2)
    rebuilt = client_from_config(client_to_config(model))
    assert type(rebuilt) is ScriptedModel
    assert rebuilt.get_config() == {"model": "m1", "latency": 0.5, "max_concurrency": 2}
    assert repr(rebuilt) == "ScriptedModel(model='m1', max_concurrency=2, latency=0.5)"


def test_client_from_config_refuses_other_classes():
    with pytest.raises(ValueError, match="'collections.OrderedDict' is not one afnio knows"):
        client_from_config({"class": "collections.OrderedDict", "config": {}})
    with pytest.raises(ValueError, match="'afnio.nothing.Here' is not one afnio knows"):
        client_from_config({"class": "afnio.nothing.Here", "config": {}})
    with pytest.raises(ValueError, match="needs {'class': str, 'config': dict}"):
        client_from_config({"class": "afnio.testing.scripted.ScriptedModel", "config": "x"})
    with pytest.raises(ValueError, match="cannot rebuild a .*ScriptedModel from its config"):
        client_from_config({"class": "afnio.testing.scripted.ScriptedModel",
                            "config": {"no_such_option": 1}})


def test_client_from_config_imports_nothing_a_description_names(tmp_path, monkeypatch):
    # Issue 14, defect 1: the class path's module was imported (its top-level code ran) before
    # the class was checked.
    import sys

    (tmp_path / "planted_client.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
        "from afnio.testing import ScriptedModel as Client\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="is not one afnio knows"):
        client_from_config({"class": "planted_client.Client", "config": {}})
    assert "planted_client" not in sys.modules and not (tmp_path / "RAN").exists()


def test_a_subclass_only_implements_send():
    class Shouting(ChatCompletionModel):
        provider = "local"

        async def _send(self, messages, **completion_args):
            return Completion(messages[-1]["content"].upper(), prompt_tokens=5,
                              completion_tokens=1)

    client = Shouting("shout", max_concurrency=1)
    assert client.chat(HELLO) == "HELLO"
    assert client.get_usage() == {"requests": 1, "prompt_tokens": 5, "completion_tokens": 1,
                                  "cached_tokens": 0, "cost_usd": 0.0}


def test_send_must_return_a_completion():
    class Broken(ChatCompletionModel):
        async def _send(self, messages, **completion_args):
            return "plain text"

    with pytest.raises(TypeError, match="Broken._send must return a Completion"):
        Broken("m").chat(HELLO)


def test_deepcopy_shares_the_client():
    model = ScriptedModel()
    assert copy.deepcopy({"client": model})["client"] is model
