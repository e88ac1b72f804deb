"""A Module with two ChatCompletion stages and an evaluator trains one step (no optimizer)."""

from __future__ import annotations

import re
from typing import Any

import afnio
from afnio.cognitive import ChatCompletion, ExactMatchEvaluator, Module, Parameter
from afnio.testing import ScriptedModel

ANSWERS = {"2+2": "4", "capital of France": "Lyon"}


def forward_reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
    system, user = messages[0]["content"], messages[-1]["content"]
    if system.startswith("Draft"):
        return f"draft for {user}"
    question = user.removeprefix("draft for ")
    return ANSWERS[question]


def backward_reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
    role = re.search(r"The marked variable is the (.*?); it is", messages[-1]["content"]).group(1)
    return f"<FEEDBACK>Change the {role}.</FEEDBACK>"


class TwoStageAgent(Module):
    def __init__(self, forward_client: ScriptedModel, backward_client: ScriptedModel) -> None:
        super().__init__()
        self.draft_prompt = Parameter("Draft an answer.", role="drafting instructions")
        self.final_prompt = Parameter("Give only the final answer.", role="answer instructions")
        self.question_template = afnio.Variable("{question}", role="question template")
        self.draft = ChatCompletion(
            forward_client, backward_model_client=backward_client, temperature=0
        )
        self.answer = ChatCompletion(
            forward_client, backward_model_client=backward_client, temperature=0
        )
        self.evaluator = ExactMatchEvaluator()

    def forward(self, questions: list[str]) -> afnio.Variable:
        draft = self.draft(
            [
                {"role": "system", "content": [self.draft_prompt]},
                {"role": "user", "content": [self.question_template]},
            ],
            inputs={"question": questions},
        )
        return self.answer(
            [
                {"role": "system", "content": [self.final_prompt]},
                {"role": "user", "content": [draft]},
            ]
        )

    def training_step(self, batch: Any, batch_idx: int) -> tuple[afnio.Variable, afnio.Variable]:
        questions, targets = batch
        return self.evaluator(self(questions), afnio.Variable(targets, role="gold answers"))


def test_two_stage_agent_trains_one_step() -> None:
    forward_client = ScriptedModel(forward_reply)
    backward_client = ScriptedModel(backward_reply)
    agent = TwoStageAgent(forward_client, backward_client)
    assert [n for n, _ in agent.named_parameters()] == ["draft_prompt", "final_prompt"]
    assert list(agent.state_dict()) == [
        "draft_prompt",
        "final_prompt",
        "draft.forward_model_client",
        "draft.backward_model_client",
        "draft.completion_args",
        "answer.forward_model_client",
        "answer.backward_model_client",
        "answer.completion_args",
    ]

    agent.zero_grad()
    score, explanation = agent.training_step((["2+2", "capital of France"], ["4", "Paris"]), 0)
    assert score.data == 1
    assert forward_client.calls == 4
    assert all(kwargs == {"temperature": 0} for _, kwargs in forward_client.requests)
    explanation.backward()

    # answer stage: one call for the shared final_prompt, one for the one draft with feedback;
    # draft stage: one call for the shared draft_prompt. The correct sample costs nothing.
    assert backward_client.calls == 3
    assert [g.data for g in agent.final_prompt.grad] == ["Change the answer instructions."]
    assert [g.data for g in agent.draft_prompt.grad] == ["Change the drafting instructions."]
    assert agent.question_template.grad == []
    agent.zero_grad()
    assert agent.final_prompt.grad == [] and agent.draft_prompt.grad == []
