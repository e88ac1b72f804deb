"""What ChatCompletion's gradient requests tell the backward model: where each variable sits in
the conversation, which parts differ per sample, and how samples are numbered."""

from __future__ import annotations

import re

import afnio
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel

MARKED = re.compile(r"<VARIABLE>(.*?)</VARIABLE>", re.DOTALL)
WHERE = re.compile(r"The marked variable is the (.*?); it is (.*?)\. ")


def requests_by_variable(backward_model: ScriptedModel) -> dict[str, list[str]]:
    """Each request's user prompt, by the role the request names for its marked variable."""
    by_role: dict[str, list[str]] = {}
    for messages, _ in backward_model.requests:
        prompt = messages[-1]["content"]
        role, _ = WHERE.search(prompt).groups()
        by_role.setdefault(role, []).append(prompt)
    return by_role


def run_call():
    backward_model = ScriptedModel(lambda messages, **kw: "<FEEDBACK>ok</FEEDBACK>")
    shared = afnio.Variable("Be kind.", role="system prompt", requires_grad=True)
    unnamed = afnio.Variable(["a {x}", "b {x}"], role="", requires_grad=True)
    items = [afnio.Variable(f"i{k}", role=f"item {k}", requires_grad=True) for k in range(2)]
    x = afnio.Variable("X", role="shared x", requires_grad=True)
    out = ChatCompletion.apply(
        ScriptedModel(["o1", "o2"]),
        [
            {"role": "system", "content": [shared, "{x}"]},
            {"role": "user", "content": ["Q", unnamed]},
            {"role": "user", "content": ["{it}"]},
            {"role": "assistant", "content": "noted"},
        ],
        inputs={"x": x, "it": items},
        backward_model_client=backward_model,
    )
    out.backward(afnio.Variable(["f1", "f2"]))
    return requests_by_variable(backward_model)


def where(prompt: str) -> str:
    return WHERE.search(prompt).group(2)


def test_each_variable_is_located_in_words():
    prompts = run_call()
    assert where(prompts["system prompt"][0]) == "part 1 of 2 of message 1 of 4 (a system message)"
    assert [where(p) for p in prompts["unnamed variable"]] == [
        "part 2 of 2 of message 2 of 4 (a user message)"
    ] * 2
    assert where(prompts["shared x"][0]) == (
        "the value filled into the placeholder {x} in message 1 of 4 (a system message), "
        "message 2 of 4 (a user message)"
    )
    for k in range(2):
        (prompt,) = prompts[f"item {k}"]
        assert where(prompt) == (
            f"the value filled into the placeholder {{it}} (item {k + 1} of the list given) in "
            "message 3 of 4 (a user message)"
        )
        assert MARKED.findall(prompt) == [f"i{k}"]


def test_parts_that_differ_per_sample_are_labelled_and_samples_numbered_from_one():
    prompts = run_call()
    (shared,) = prompts["system prompt"]
    assert "[part 2 of message 2: differs per sample, see the samples]" in shared
    assert "[input {it}: differs per sample, see the samples]" in shared
    assert '<SAMPLE number="1">\n<VALUE of="part 2 of message 2">\na X\n</VALUE>' in shared
    assert '<SAMPLE number="2">\n<VALUE of="part 2 of message 2">\nb X\n</VALUE>' in shared
    assert '<VALUE of="input {it}">\ni1\n</VALUE>' in shared
    assert "[assistant message]\nnoted" in shared
    (through_x,) = prompts["shared x"]
    assert (
        "[part 2 of message 2: differs per sample and contains the marked variable, see the "
        "samples]" in through_x
    )
    assert '<VALUE of="part 2 of message 2">\na <VARIABLE>X</VARIABLE>\n</VALUE>' in through_x
