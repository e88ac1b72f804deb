"""The feedback layer's parts on their own: parsing replies, quoting them, asking and repairing,
merging in rounds, and what the backward model is asked for."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json

import pytest

import afnio
from afnio._runtime import run
from afnio.autodiff.feedback import (
    BackwardModel,
    FeedbackFormatWarning,
    GradientPrompts,
    ReplyParseError,
    Unreadable,
    ask,
    chunk_by_budget,
    extract,
    gather_all,
    get_feedback_stats,
    merge_in_rounds,
    parse_feedback,
    reset_feedback_stats,
    salvage_feedback,
)
from afnio.models import StructuredOutputUnsupportedError
from afnio.testing import ScriptedModel

QUESTION = [{"role": "user", "content": "2+2?"}]


def read_answer(reply: str) -> str:
    value = extract(reply, "ANSWER")
    if value is None:
        raise Unreadable("no <ANSWER> tags")
    return value


# --------------------------------------------------------------------------- parse
@pytest.mark.parametrize(
    "reply",
    [
        'Keep {braces} as they are. {"feedback": "Name the deadline."}',
        '{not json} {also: not} {"feedback": "Name the deadline."} {trailing',
        'Set {"a": {oops}} right. ```json\n{"feedback": "Name the deadline."}\n```',
        '{{"feedback": "Name the deadline."}',
    ],
)
def test_braces_that_are_not_json_are_skipped(reply):
    assert extract(reply, "FEEDBACK") == "Name the deadline."
    assert parse_feedback(reply) == "Name the deadline."


@pytest.mark.parametrize("reply", ["{x}", "a {b} c {", "{{}", "} {"])
def test_a_reply_with_only_stray_braces_is_unreadable(reply):
    assert extract(reply, "FEEDBACK") is None
    with pytest.raises(Unreadable):
        parse_feedback(reply)


def test_only_text_numbers_and_lists_are_read_from_json():
    assert extract('{"feedback": "x"} {"feedback": true}', "FEEDBACK") == "x"
    assert extract('{"feedback": {"nested": "x"}}', "FEEDBACK") is None
    assert extract('{"feedback": null}', "FEEDBACK") is None
    assert extract('{"score": 0.5}', "SCORE") == "0.5"
    assert extract('{"labels": ["café", 2]}', "LABELS") == '["café", 2]'


def test_salvaging_needs_three_words():
    assert salvage_feedback("Name the deadline.") == "Name the deadline."
    assert salvage_feedback("<b>Name</b> *the* 42 deadline") == "Name *the* 42 deadline"
    assert salvage_feedback("Sounds good.") is None
    assert salvage_feedback("OK 1 2 3 4") is None


# --------------------------------------------------------------------------- quote
def unreadable_after(reply: str) -> ReplyParseError:
    model = ScriptedModel([reply])
    with pytest.raises(ReplyParseError) as info:
        run(ask(model, QUESTION, read_answer, what="demo", repair="fix: {reason}", retries=0))
    return info.value


@pytest.mark.parametrize("length", [1, 1999, 2000])
def test_a_reply_up_to_2000_characters_is_quoted_whole(length):
    reply = "x" * length
    error = unreadable_after(reply)
    assert str(error).endswith(f"last reply: {reply!r}")
    assert "more characters" not in str(error) and error.reply == reply


@pytest.mark.parametrize("extra", [1, 2500])
def test_a_longer_reply_is_quoted_cut_with_the_count_left_out(extra):
    reply = "y" * 2000 + "z" * extra
    error = unreadable_after(reply)
    assert str(error).endswith(f"last reply: {'y' * 2000!r} ... ({extra} more characters)")
    assert error.reply == reply  # the exception keeps the whole reply


# --------------------------------------------------------------------------- ask
def test_the_warning_for_a_salvaged_reply_gives_the_last_reason():
    reasons = iter(["first reason", "second reason", "third reason"])

    def parse(reply: str) -> str:
        raise Unreadable(next(reasons))

    model = ScriptedModel(["a reply without its format"])
    with pytest.warns(FeedbackFormatWarning) as caught:
        value = run(ask(model, QUESTION, parse, what="demo", repair="fix: {reason}",
                        fallback=salvage_feedback))
    assert value == "a reply without its format" and model.calls == 3
    (warning,) = caught
    message = str(warning.message)
    assert "(third reason)" in message and "first" not in message and "second" not in message
    assert "after 3 attempt(s)" in message


def test_a_backend_refusing_structured_output_is_asked_again_with_tags():
    def reply(messages, **kwargs):
        if "response_format" in kwargs:
            raise StructuredOutputUnsupportedError("this server has no json_schema")
        return "<FEEDBACK>Be brief.</FEEDBACK>"

    model = ScriptedModel(reply, structured_output=True, max_retries=0)
    reset_feedback_stats()
    assert run(BackwardModel.capture(model).feedback(QUESTION, "demo")) == "Be brief."
    assert [sorted(args) for _, args in model.requests] == [["response_format"], []]
    assert get_feedback_stats()["tag_fallbacks"] == 1
    assert get_feedback_stats()["requests"] == 2


def test_no_repair_is_sent_when_it_would_not_fit_the_window():
    reserve = 16
    long_reply = "no tags at all " * 40

    def sizes() -> tuple[int, int]:
        probe = ScriptedModel([long_reply, "<ANSWER>4</ANSWER>"], max_tokens=reserve)
        assert run(ask(probe, QUESTION, read_answer, what="demo", repair="fix: {reason}")) == "4"
        first, repair = (probe.count_message_tokens(m) for m, _ in probe.requests)
        return first, repair

    first, repair = sizes()
    # A window the repair fills exactly: it is sent.
    model = ScriptedModel([long_reply, "<ANSWER>4</ANSWER>"], context_window=repair + reserve,
                          max_tokens=reserve)
    assert run(ask(model, QUESTION, read_answer, what="demo", repair="fix: {reason}")) == "4"
    assert model.calls == 2
    # One token less: the repair is not sent, and the error quotes the first reply.
    model = ScriptedModel([long_reply, "<ANSWER>4</ANSWER>"],
                          context_window=repair + reserve - 1, max_tokens=reserve)
    with pytest.raises(ReplyParseError, match="after 1 attempt"):
        run(ask(model, QUESTION, read_answer, what="demo", repair="fix: {reason}"))
    assert model.calls == 1 and first + reserve <= repair + reserve - 1


@pytest.mark.parametrize(
    ("sentences", "max_tokens", "bound"),
    [(1, 4096, 150), (4, 4096, 600), (4, 64, 3 * (64 - 16))],  # 150 a sentence, or what closes
)
def test_structured_feedback_is_asked_for_with_a_length_bound(sentences, max_tokens, bound):
    model = ScriptedModel(['{"feedback": "Be brief."}'], structured_output=True,
                          max_tokens=max_tokens)
    with afnio.settings(max_feedback_sentences=sentences):
        backward = BackwardModel.capture(model)
        assert run(backward.feedback(QUESTION, "demo")) == "Be brief."
    ((_, args),) = model.requests
    schema = args["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["feedback"]["maxLength"] == bound
    assert schema["required"] == ["feedback"]


# --------------------------------------------------------------------------- merge
def merging(calls: list[list[str]]):
    async def merge(parts: list[str]) -> str:
        calls.append(parts)
        return "+".join(part.split(":", 1)[1] for part in parts)

    return merge


def test_merge_in_rounds_numbers_the_parts_from_one_in_every_round():
    calls: list[list[str]] = []
    merged = run(merge_in_rounds(
        ["a", "bb", "", "c", "dd", "e"],
        render_part=lambda number, text: f"{number}:{text}",
        part_tokens=len,
        base_tokens=0,
        budget=10,
        merge=merging(calls),
    ))
    assert merged == ["a+bb+c+dd+e"]
    # Round one: groups within the budget (in order); round two: the merged texts, renumbered
    # from 1, each alone too long to share a group, so they are merged in a pair anyway.
    assert calls == [["1:a", "2:bb", "3:c"], ["4:dd", "5:e"], ["1:a+bb+c", "2:dd+e"]]


def test_merge_in_rounds_with_nothing_to_merge_sends_nothing():
    calls: list[list[str]] = []
    for texts in ([], ["", ""], ["only"]):
        result = run(asyncio.wait_for(merge_in_rounds(
            texts, render_part=lambda n, t: f"{n}:{t}", part_tokens=len, base_tokens=0,
            budget=10, merge=merging(calls), merge_single=bool(texts == [] or texts[0] == ""),
        ), timeout=30))
        assert result == [t for t in texts if t]
    assert calls == []


def test_merge_in_rounds_stops_after_max_rounds():
    calls: list[list[str]] = []
    result = run(merge_in_rounds(
        [f"t{i}" for i in range(8)], render_part=lambda n, t: f"{n}:{t}", part_tokens=len,
        base_tokens=0, budget=8, merge=merging(calls), max_rounds=1,
    ))
    assert len(result) > 1 and calls and all(len(group) == 2 for group in calls)
    assert json.dumps(result) == json.dumps(["t0+t1", "t2+t3", "t4+t5", "t6+t7"])


def test_a_group_of_one_is_passed_on_without_a_merge_request():
    calls: list[list[str]] = []
    merged = run(merge_in_rounds(
        ["aaaa", "bbbb", "cccccc"], render_part=lambda n, t: f"{n}:{t}", part_tokens=len,
        base_tokens=0, budget=12, merge=merging(calls),
    ))
    assert merged == ["aaaa+bbbb+cccccc"]
    assert calls == [["1:aaaa", "2:bbbb"], ["1:aaaa+bbbb", "2:cccccc"]]


def test_a_single_text_is_merged_only_with_merge_single():
    for merge_single, expected in ((False, []), (True, [["1:only"], ["1:only"]])):
        calls: list[list[str]] = []
        merged = run(merge_in_rounds(
            ["only"], render_part=lambda n, t: f"{n}:{t}", part_tokens=len, base_tokens=0,
            budget=100, merge=merging(calls), done=lambda texts: False, max_rounds=2,
            merge_single=merge_single,
        ))
        assert merged == ["only"] and calls == expected
    # With the default ``done`` (one text left), even merge_single has nothing to do.
    calls = []
    merged = run(merge_in_rounds(
        ["only"], render_part=lambda n, t: f"{n}:{t}", part_tokens=len, base_tokens=0,
        budget=100, merge=merging(calls), max_rounds=2, merge_single=True,
    ))
    assert merged == ["only"] and calls == []


def test_many_parts_that_each_fill_the_budget_are_merged_in_pairs():
    calls: list[list[str]] = []
    texts = [f"t{i:03d}" for i in range(300)]
    merged = run(merge_in_rounds(
        texts, render_part=lambda n, t: f"{n}:{t}", part_tokens=lambda part: 10, base_tokens=0,
        budget=10, merge=merging(calls),
    ))
    assert merged == ["+".join(texts)]
    assert len(calls) == 299 and all(len(group) == 2 for group in calls)


def test_max_rounds_is_kept_however_large():
    calls: list[list[str]] = []
    run(merge_in_rounds(
        ["x"], render_part=lambda n, t: f"{n}:{t}", part_tokens=len, base_tokens=0, budget=9,
        merge=merging(calls), done=lambda texts: False, max_rounds=300, merge_single=True,
    ))
    assert len(calls) == 300


def test_chunks_fill_the_budget_exactly():
    assert chunk_by_budget(10, [5, 5, 5], 20) == [[0, 1], [2]]
    assert chunk_by_budget(10, [5, 5, 5], 19) == [[0], [1], [2]]
    assert chunk_by_budget(0, [], 5) == []


# --------------------------------------------------------------------------- gather_all
def test_gather_all_cancels_and_awaits_the_others_when_one_fails():
    events: list[str] = []
    unretrieved: list[dict] = []

    async def fails_first():
        raise ValueError("first failure")

    async def fails_too():
        raise KeyError("second failure")

    async def waits_forever(name: str):
        try:
            await asyncio.Event().wait()
        finally:
            events.append(f"{name} stopped")

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unretrieved.append(context)
        )
        waiting = [waits_forever("a"), waits_forever("b")]
        with pytest.raises(ValueError, match="first failure"):
            await gather_all([waiting[0], fails_first(), fails_too(), waiting[1]])
        # Both waiting calls were cancelled, and had stopped before the error was raised.
        assert events == ["a stopped", "b stopped"]
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    # The second failure was seen, not left as "Task exception was never retrieved".
    assert unretrieved == []


def test_gather_all_keeps_the_order_of_its_arguments():
    async def value(n: int):
        for _ in range(5 - n):
            await asyncio.sleep(0)
        return n

    assert run(gather_all([value(n) for n in range(5)])) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- contracts
def test_a_captured_backward_model_cannot_be_changed():
    captured = BackwardModel.capture(ScriptedModel(), {"temperature": 0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        captured.client = ScriptedModel()  # type: ignore[misc]


@pytest.mark.parametrize("missing", ["element", "sample", "shared", "merge"])
def test_gradient_prompts_must_render_every_request(missing):
    methods = {
        name: (lambda self, *args: [])
        for name in ("element", "sample", "shared", "merge")
        if name != missing
    }
    incomplete = type("Incomplete", (GradientPrompts,), methods)
    with pytest.raises(TypeError, match=missing):
        incomplete()


def test_ask_takes_its_arguments_by_name_and_its_options_by_keyword_only():
    model = ScriptedModel(["<ANSWER>4</ANSWER>"])
    answer = run(ask(client=model, messages=QUESTION, parse=read_answer, what="demo",
                     repair="fix: {reason}"))
    assert answer == "4"
    with pytest.raises(TypeError):
        ask(model, QUESTION, read_answer, "demo", "fix: {reason}")
