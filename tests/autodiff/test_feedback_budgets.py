"""The feedback layer's token arithmetic, checked at every budget boundary.

The backward model here counts one token per word and one per newline, so the cost of joining
texts (the blank line between samples, the newline between merged parts) is exact, and sweeping
the gradient token cap one token at a time hits every boundary where the layer's estimates
decide something: where a shared variable's request is split into chunks, whether a sample's
multi-piece feedback must be condensed first, how merge requests are grouped. At every cap the
requests must stay within it, no sample may be dropped or seen twice, and nothing may be split
or condensed that fits with a few tokens to spare.
"""

from __future__ import annotations

import re

import pytest

import afnio
from afnio.autodiff import ContextWindowError, prompts
from afnio.autodiff.graph import FAN_IN_SEPARATOR
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel

WORDS = re.compile(r"[^\s]+|\n")
FEEDBACK_TOKEN = re.compile(r"\bfb\d+[a-z]?\b")
SAMPLE = re.compile(r'<SAMPLE number="(\d+)">.*?</SAMPLE>', re.DOTALL)
PART = re.compile(r'<FEEDBACK_PART number="(\d+)">.*?</FEEDBACK_PART>', re.DOTALL)
MESSAGE_OVERHEAD = 3
# Tokens by which the layer's estimates may be conservative: the blank line that would join a
# sample to the next (two newlines), never more.
SLACK = 2
CONDENSE_MARK = prompts.CONDENSE_OUTPUT_FEEDBACK_PROMPT.split("{")[0]
MERGE_MARK = prompts.REDUCE_GRADIENT_PROMPT.split("{")[0]


class WordModel(ScriptedModel):
    """A scripted backward model whose tokenizer counts words and newlines."""

    def count_tokens(self, text: str) -> int:
        return len(WORDS.findall(text))

    def count_message_tokens(self, messages) -> int:
        return sum(MESSAGE_OVERHEAD + self.count_tokens(m["content"]) for m in messages)


def critic(padding: int = 0, **options) -> WordModel:
    """Feedback naming every feedback token its prompt showed (plus ``padding`` filler words)."""

    def reply(messages, **kwargs):
        seen = " ".join(dict.fromkeys(FEEDBACK_TOKEN.findall(messages[-1]["content"])))
        return f"<FEEDBACK>saw {seen}{' more' * padding}</FEEDBACK>"

    return WordModel(reply, **options)


def kind(messages) -> str:
    prompt = messages[-1]["content"]
    if prompt.startswith(CONDENSE_MARK):
        return "condense"
    if prompt.startswith(MERGE_MARK):
        return "merge"
    return "chunk" if SAMPLE.search(prompt) else "element"


def shared_backward(texts, feedback, cap, model):
    """Backward of a batched call through a shared system prompt, under gradient cap ``cap``."""
    prompt = afnio.Variable("Sort the ticket.", role="system prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(lambda messages, **kw: "label " + messages[-1]["content"].split()[-1]),
        [{"role": "system", "content": [prompt]}, {"role": "user", "content": ["{ticket}"]}],
        inputs={"ticket": afnio.Variable(texts, role="tickets")},
        backward_model_client=model,
    )
    with afnio.settings(gradient_token_budget=cap):
        out.backward(afnio.Variable(feedback))
    return prompt


def alone_sizes(texts, feedback) -> list[int]:
    """Tokens of the request about each sample alone (a cap of 1 puts every sample alone)."""
    model = critic()
    shared_backward(texts, feedback, 1, model)
    sizes = {}
    for messages, _ in model.requests:
        if kind(messages) == "chunk":
            (number,) = SAMPLE.findall(messages[-1]["content"])
            sizes[int(number)] = model.count_message_tokens(messages)
    return [sizes[i + 1] for i in range(len(texts))]


TEXTS = [" ".join(f"t{i}w{k}" for k in range(2 + 3 * (i % 3))) for i in range(7)]
FEEDBACK = [f"fb{i} " + "detail " * (1 + 2 * (i % 4)) for i in range(7)]


def test_shared_chunks_fit_every_cap_and_take_every_sample_that_fits():
    whole = critic()
    shared_backward(TEXTS, FEEDBACK, None, whole)
    ((messages, _),) = whole.requests  # no cap: one request over all samples
    total = whole.count_message_tokens(messages)
    smallest = max(alone_sizes(TEXTS, FEEDBACK))
    for cap in range(smallest, total + SLACK + 1):
        model = critic()
        prompt = shared_backward(TEXTS, FEEDBACK, cap, model)
        chunks = [m for m, _ in model.requests if kind(m) == "chunk"]
        for messages, _ in model.requests:
            assert model.count_message_tokens(messages) <= cap, (cap, kind(messages))
        numbers = [int(n) for m in chunks for n in SAMPLE.findall(m[-1]["content"])]
        assert sorted(numbers) == list(range(1, len(TEXTS) + 1)), cap
        for this, following in zip(chunks, chunks[1:]):
            # Greedy and full: the next chunk's first sample would not have fitted in this one.
            first = SAMPLE.search(following[-1]["content"]).group(0)
            grown = model.count_message_tokens(this) + model.count_tokens(first) + 2
            assert grown > cap - SLACK, (cap, grown)
        if cap >= total + SLACK:
            assert len(chunks) == 1 and model.calls == 1
        saw = set(FEEDBACK_TOKEN.findall(prompt.grad[0].data))
        assert saw == {f"fb{i}" for i in range(len(TEXTS))}, cap


def test_merges_of_chunk_feedback_fit_every_cap():
    # Long chunk answers force several merge requests, in rounds.
    texts = [f"t{i}" for i in range(12)]
    feedback = [f"fb{i} " + "detail " * 6 for i in range(12)]
    smallest = max(alone_sizes(texts, feedback))
    merges = 0
    for cap in range(smallest, smallest + 60):
        model = critic(padding=12)
        prompt = shared_backward(texts, feedback, cap, model)
        for messages, _ in model.requests:
            assert model.count_message_tokens(messages) <= cap, (cap, kind(messages))
        merged = [m for m, _ in model.requests if kind(m) == "merge"]
        merges += len(merged)
        for this, following in zip(merged, merged[1:]):
            numbers = [int(n) for n in PART.findall(this[-1]["content"])]
            first = PART.search(following[-1]["content"])
            if int(first.group(1)) != numbers[-1] + 1:
                continue  # the next round starts: parts are numbered from 1 again
            # Greedy and full: the next part (joined by a newline) would not have fitted.
            grown = model.count_message_tokens(this) + model.count_tokens(first.group(0)) + 1
            assert grown > cap - 1, (cap, grown)
        saw = set(FEEDBACK_TOKEN.findall(prompt.grad[0].data))
        assert saw == {f"fb{i}" for i in range(len(texts))}, cap
    assert merges > 60  # the sweep really merged, in several groups per backward


def pieces_of(i: int, words: int) -> str:
    return FAN_IN_SEPARATOR.join(
        f"fb{i}{letter} " + "note " * words for letter in "abc"
    )


@pytest.mark.parametrize("words", [30, 32])  # two sizes: every low bit of the boundary is hit
def test_multi_piece_feedback_is_condensed_exactly_when_its_sample_does_not_fit_alone(words):
    # Sample 0's feedback (three pieces from three consumers) is long; the others' is short.
    texts = [f"t{i}" for i in range(4)]
    feedback = [pieces_of(0, words)] + [pieces_of(i, 1) for i in range(1, 4)]
    sizes = alone_sizes(texts, feedback)
    long_alone, short_alone = sizes[0], max(sizes[1:])
    condensed_seen = kept_seen = 0
    for cap in range(short_alone + SLACK, long_alone + SLACK + 1):
        model = critic()
        prompt = shared_backward(texts, feedback, cap, model)
        for messages, _ in model.requests:
            assert model.count_message_tokens(messages) <= cap, (cap, kind(messages))
        chunks = " ".join(m[-1]["content"] for m, _ in model.requests if kind(m) == "chunk")
        condensed = [m[-1]["content"] for m, _ in model.requests if kind(m) == "condense"]
        if cap >= long_alone + SLACK:
            # Fits alone with room to spare: sent as it is, never condensed.
            assert feedback[0] in chunks and not condensed, cap
            kept_seen += 1
        elif cap < long_alone:
            assert feedback[0] not in chunks, cap
            # Condensed (in one merge request, or in rounds when the pieces do not fit one).
            assert condensed and all(
                any(piece in request for request in condensed)
                for piece in feedback[0].split(FAN_IN_SEPARATOR)
            ), cap
            condensed_seen += 1
        # The short samples fit alone: never condensed, always sent as they are.
        assert all(feedback[i] in chunks for i in range(1, 4)), cap
        saw = set(FEEDBACK_TOKEN.findall(prompt.grad[0].data))
        assert saw == {f"fb{i}{letter}" for i in range(4) for letter in "abc"}, cap
    assert condensed_seen and kept_seen


@pytest.mark.parametrize("count", [2, 10])
def test_per_element_fan_in_feedback_is_condensed_exactly_when_it_does_not_fit(count):
    template = afnio.Variable("About {topic}.", role="user template", requires_grad=True)
    pieces = [f"fb{i} " + "habitat " * 8 for i in range(count)]
    condensed = "saw " + " ".join(f"fb{i}" for i in range(count))

    def backward(feedback, cap):
        model = critic()
        out = ChatCompletion.apply(
            ScriptedModel(["an answer"]), [{"role": "user", "content": [template]}],
            inputs={"topic": "owls"}, backward_model_client=model)
        with afnio.settings(gradient_token_budget=cap):
            out.backward(afnio.Variable(feedback))
        return model, [m for m, _ in model.requests]

    # The request with the condensed feedback, and the one with every piece as it is.
    model, (smallest,) = backward(condensed, None)
    smallest = model.count_message_tokens(smallest)
    model, (whole,) = backward(FAN_IN_SEPARATOR.join(pieces), None)
    total = model.count_message_tokens(whole)
    if count == 2:
        # Two pieces are merged in one request even past the cap (nothing is cut): start where
        # that request fits.
        model, (pair, _) = backward(FAN_IN_SEPARATOR.join(pieces), total - 1)
        smallest = max(smallest, model.count_message_tokens(pair))
    for cap in range(smallest, total + 2):
        model, requests = backward(FAN_IN_SEPARATOR.join(pieces), cap)
        for messages in requests:
            assert model.count_message_tokens(messages) <= cap, (cap, kind(messages))
        # The element request's size is known exactly: condensed exactly when it would not fit.
        assert [kind(m) for m in requests[:-1]] == (
            [] if cap >= total else ["condense"] * (len(requests) - 1)
        ), cap
        assert kind(requests[-1]) == "element" and (len(requests) > 1) == (cap < total)
        assert set(FEEDBACK_TOKEN.findall(template.grad[-1].data)) == {
            f"fb{i}" for i in range(count)
        }, cap


@pytest.mark.parametrize("words", [400, 401])
def test_a_sample_too_long_for_the_window_even_alone_is_refused_before_anything_is_sent(words):
    texts = ["short", "also short", " ".join(["long"] * words), "short again"]
    feedback = [f"fb{i}" for i in range(4)]
    reserve = 20
    measured = critic()
    shared_backward(texts, feedback, 1, measured)  # every sample alone
    needed = max(measured.count_message_tokens(m) for m, _ in measured.requests)
    for window in range(needed + reserve - 150, needed + reserve + SLACK + 1):
        model = critic(context_window=window, max_tokens=reserve)
        try:
            prompt = shared_backward(texts, feedback, None, model)
        except ContextWindowError as error:
            assert window < needed + reserve + SLACK, window
            assert "'system prompt'" in str(error) and error.available == window - reserve
            assert model.calls == 0, window  # refused before any chunk was sent
        else:
            assert window >= needed + reserve, window
            assert set(FEEDBACK_TOKEN.findall(prompt.grad[0].data)) == {
                f"fb{i}" for i in range(4)
            }


def scalar_backward(feedback: str, model: WordModel, cap: int | None = None) -> afnio.Variable:
    prompt = afnio.Variable("Answer briefly.", role="system prompt", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["an answer"]),
        [{"role": "system", "content": [prompt]}, {"role": "user", "content": ["why?"]}],
        backward_model_client=model,
    )
    with afnio.settings(gradient_token_budget=cap):
        out.backward(afnio.Variable(feedback))
    return prompt


def test_a_request_filling_the_backward_window_exactly_is_sent():
    reserve = 20
    measured = critic()
    scalar_backward("fb0 too vague", measured)
    ((messages, _),) = measured.requests
    needed = measured.count_message_tokens(messages)
    model = critic(context_window=needed + reserve, max_tokens=reserve)
    assert scalar_backward("fb0 too vague", model).grad[0].data == "saw fb0"
    model = critic(context_window=needed + reserve - 1, max_tokens=reserve)
    with pytest.raises(ContextWindowError, match="'system prompt'"):
        scalar_backward("fb0 too vague", model)
    assert model.calls == 0


def test_one_piece_of_feedback_past_the_cap_is_sent_exactly_as_given():
    feedback = FAN_IN_SEPARATOR + "fb0 " + "far too vague " * 30 + FAN_IN_SEPARATOR
    model = critic()
    scalar_backward(feedback, model, cap=100)
    ((messages, _),) = model.requests
    assert f"<OUTPUT_FEEDBACK>\n{feedback}\n</OUTPUT_FEEDBACK>" in messages[-1]["content"]
