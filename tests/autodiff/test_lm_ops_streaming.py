"""ChatCompletion and the LM judge hand each input's gradient on the moment its calls finish.

In each test the backward model holds a *shared* variable's gradient request until a request
that only the upstream op can send has arrived (an event, with a long guard timeout that only a
backward holding the fast gradient back would reach). So the op upstream of a per-sample input
must start while the same op's slow shared-prompt request is still in flight — with exactly the
requests the design prescribes, no more.
"""

import asyncio
import re

import afnio
from afnio.autodiff import prompts
from afnio.autodiff.evaluator import LMJudgeEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import ScriptedModel

GUARD = 30
_before, _after = prompts.MARKED_VARIABLE.split("{text}")
MARKED = re.compile(re.escape(_before) + r"(.*?)" + re.escape(_after), re.DOTALL)


def marked(messages):
    """The text of the variable under review in a gradient request."""
    found = MARKED.findall(messages[-1]["content"])
    return found[0] if found else None


def forward_reply(messages, **kwargs):
    if "JSON object" in messages[-1]["content"]:
        return '{"score": 0, "explanation": "judged"}'
    return f"reply to {messages[-1]['content']}"


def stage(prompt, x, critic):
    return ChatCompletion.apply(
        ScriptedModel(forward_reply),
        [{"role": "system", "content": [prompt]}, {"role": "user", "content": ["{x}"]}],
        inputs={"x": x}, backward_model_client=critic,
    )


def held_critic(waits_for, holds):
    """A backward model that holds requests about ``holds`` until one about ``waits_for``
    arrived, and answers each request naming the variable it was about."""
    arrived = asyncio.Event()

    async def reply(messages, **kwargs):
        about = marked(messages) or ""
        if about.startswith(waits_for):
            arrived.set()
        if about.startswith(holds):
            await asyncio.wait_for(arrived.wait(), GUARD)
        return f"<FEEDBACK>change {about}</FEEDBACK>"

    return ScriptedModel(reply)


def test_a_stage_passes_its_input_gradient_on_while_its_prompt_request_is_in_flight():
    critic = held_critic(waits_for="Stage 1", holds="Stage 2")
    p1 = afnio.Variable("Stage 1: answer.", role="stage 1 prompt", requires_grad=True)
    p2 = afnio.Variable("Stage 2: polish.", role="stage 2 prompt", requires_grad=True)
    questions = afnio.Variable(["q0", "q1", "q2"], role="questions")
    out = stage(p2, stage(p1, questions, critic), critic)
    out.backward(afnio.Variable(["fb0", "fb1", "fb2"]))
    assert [g.data for g in p2.grad] == ["change Stage 2: polish."]
    assert [g.data for g in p1.grad] == ["change Stage 1: answer."]
    # 3 per-sample requests for stage 2's input, one per prompt: the prescribed count.
    assert critic.calls == 5


def test_the_judge_passes_the_predictions_feedback_on_before_its_own_gradient_is_written():
    critic = held_critic(waits_for="Stage 1", holds="Is it right?")
    p1 = afnio.Variable("Stage 1: answer.", role="stage 1 prompt", requires_grad=True)
    rubric = afnio.Variable("Is it right? {prediction}", role="rubric", requires_grad=True)
    answers = stage(p1, afnio.Variable(["q0", "q1"], role="questions"), critic)
    _, explanation = LMJudgeEvaluator.apply(
        ScriptedModel(forward_reply), [{"role": "user", "content": [rubric]}], answers,
        eval_mode=False, backward_model_client=critic,
    )
    explanation.backward()
    assert [g.data for g in p1.grad] == ["change Stage 1: answer."]
    assert len(rubric.grad) == 1 and rubric.grad[0].data.startswith("change Is it right? [")
    assert critic.calls == 2
