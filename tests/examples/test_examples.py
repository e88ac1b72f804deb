"""The examples in ``examples/`` run on scripted models and do what their scripts dictate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from afnio.testing import FakeProviderServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def marked_role(request: tuple[list[dict[str, str]], dict], roles: list[str]) -> str:
    """Which of ``roles`` a gradient request marks as the variable under review."""
    user = request[0][-1]["content"]
    found = [role for role in roles if f"marked variable is the {role}" in user]
    return found[0] if found else "facts"


# --------------------------------------------------------------------------- multi-stage
@pytest.fixture(scope="module")
def pipeline_run(load_example):
    example = load_example("multi_stage_pipeline")
    return example, example.optimize("scripted")


def test_multi_stage_rewrites_both_prompts_as_the_optimizer_dictated(pipeline_run) -> None:
    example, result = pipeline_run
    assert result.initial_prompts == {
        "extract_prompt": example.INITIAL_EXTRACT_PROMPT,
        "reply_prompt": example.INITIAL_REPLY_PROMPT,
    }
    assert result.final_prompts == {
        "extract_prompt": example.IMPROVED_PROMPTS[example.EXTRACT_ROLE],
        "reply_prompt": example.IMPROVED_PROMPTS[example.REPLY_ROLE],
    }


def test_multi_stage_judge_is_satisfied_after_one_step(pipeline_run) -> None:
    example, result = pipeline_run
    assert [(step.score, step.updated) for step in result.steps] == [(1.0, True), (5.0, False)]
    first, second = result.steps
    assert all("generic" in why for why in first.explanations)
    assert "within 2 hours" in second.replies[1]  # the HVAC emergency
    assert "within 2 business days" in second.replies[0]  # the routine request


def test_multi_stage_call_counts(pipeline_run) -> None:
    _, result = pipeline_run
    models = result.models
    # two steps x (2 extractions + 2 replies); two steps x 2 judgements
    assert (models.pipeline.calls, models.judge.calls) == (8, 4)
    # one shared call per system prompt + one per element of stage 1's batched output
    assert models.backward.calls == 4
    assert models.optimizer.calls == 2  # one per parameter, only in the step with feedback


def test_multi_stage_feedback_flows_from_judge_through_both_stages(pipeline_run) -> None:
    example, result = pipeline_run
    roles = [example.REPLY_ROLE, example.EXTRACT_ROLE]
    requests = result.models.backward.requests
    by_role: dict[str, list[str]] = {}
    for request in requests:
        by_role.setdefault(marked_role(request, roles), []).append(request[0][-1]["content"])
    assert {role: len(texts) for role, texts in by_role.items()} == {
        example.REPLY_ROLE: 1, example.EXTRACT_ROLE: 1, "facts": 2,
    }
    judge_says = result.steps[0].explanations[0]
    assert judge_says in by_role[example.REPLY_ROLE][0]
    assert all(judge_says in text for text in by_role["facts"])
    # Stage 1's prompt learns from the feedback stage 2's backward wrote about the facts.
    assert example.FACTS_FEEDBACK in by_role[example.EXTRACT_ROLE][0]
    assert judge_says not in by_role[example.EXTRACT_ROLE][0]
    assert result.steps[0].feedback == {
        "extract_prompt": [example.BACKWARD_FEEDBACK[example.EXTRACT_ROLE]],
        "reply_prompt": [example.BACKWARD_FEEDBACK[example.REPLY_ROLE]],
    }


def test_multi_stage_one_step_then_stop(load_example) -> None:
    example = load_example("multi_stage_pipeline")
    result = example.optimize("scripted", steps=1, samples=(5,))
    assert len(result.steps) == 1 and result.steps[0].updated
    assert result.models.backward.calls == 3  # reply prompt, extract prompt, the one fact
    assert result.final_prompts["reply_prompt"] == example.IMPROVED_PROMPTS[example.REPLY_ROLE]


def test_multi_stage_main_prints_what_changed(load_example, capsys) -> None:
    example = load_example("multi_stage_pipeline")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("changed: yes") == 2
    assert f"after:  {example.IMPROVED_PROMPTS[example.REPLY_ROLE]}" in out
    assert "LLM requests: pipeline 8, judge 4, backward 4, optimizer 2" in out


# --------------------------------------------------------------------------- GradComponent
@pytest.fixture(scope="module")
def component_run(load_example):
    example = load_example("grad_component")
    return example, example.run()


def test_grad_component_train_and_eval_mode(component_run) -> None:
    _, result = component_run
    assert result.train_output.data == "[ROUTINE] Broken door"
    assert result.train_output.grad_fn.name() == "TicketTitleGradComponentBackward"
    assert result.eval_output == "[ROUTINE] Broken door"
    assert type(result.eval_output) is str


def test_grad_component_parameters_get_gradients_and_are_rewritten(component_run) -> None:
    example, result = component_run
    assert result.gradients == {
        "keywords": [example.BACKWARD_FEEDBACK[example.KEYWORDS_ROLE]],
        "title.doc_string": [example.BACKWARD_FEEDBACK[example.DOC_STRING_ROLE]],
    }
    assert result.initial == {
        "keywords": example.INITIAL_KEYWORDS, "title.doc_string": example.INITIAL_DOC_STRING,
    }
    assert result.final == {
        "keywords": example.IMPROVED[example.KEYWORDS_ROLE],
        "title.doc_string": example.IMPROVED[example.DOC_STRING_ROLE],
    }
    assert result.titles_before[0] == "[ROUTINE] Water leak in the server room"
    assert result.titles_after[0] == "[HIGH] Water leak in the server room"
    assert (result.score_before, result.score_after) == (2, 3)


def test_grad_component_backward_engine_sees_only_the_failing_sample(component_run) -> None:
    _, result = component_run
    # ticket_title: its urgency input (sample 0 only) and its doc_string; the tagger: keywords.
    assert result.backward_model.calls == 3
    assert result.optimizer_model.calls == 2
    for messages, _ in result.backward_model.requests:
        user = messages[-1]["content"]
        assert "<SAMPLE 0>" in user and "<SAMPLE 1>" not in user and "<SAMPLE 2>" not in user


def test_grad_component_main_prints_what_changed(load_example, capsys) -> None:
    example = load_example("grad_component")
    assert example.main() == 0
    out = capsys.readouterr().out
    assert out.count("changed: yes") == 2
    assert "LLM requests: backward engine 3, optimizer 2" in out


# --------------------------------------------------------------------------- testing offline
def test_testing_offline_tests_pass_when_called(load_example) -> None:
    example = load_example("testing_offline")
    example.test_forward_sends_one_request_per_ticket()
    example.test_backward_asks_once_for_the_shared_prompt()
    example.test_optimizer_step_applies_the_feedback()
    with FakeProviderServer() as server:
        example.test_training_step_through_the_openai_sdk(server)
        assert [fault.status for fault in server.faults_applied] == [429]


def test_testing_offline_fails_on_a_broken_pipeline(load_example, monkeypatch) -> None:
    example = load_example("testing_offline")
    monkeypatch.setattr(example, "IMPROVED_PROMPT", "Draft a reply.")  # loses the rule
    with pytest.raises(AssertionError):
        example.test_optimizer_step_applies_the_feedback()


def test_testing_offline_is_collected_by_pytest() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES / "testing_offline.py"), "-q",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "4 passed" in completed.stdout


# --------------------------------------------------------------------------- as scripts
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("multi_stage_pipeline.py", "changed: yes"),
        ("grad_component.py", "changed: yes"),
        ("testing_offline.py", "passed: test_training_step_through_the_openai_sdk"),
    ],
)
def test_example_runs_as_a_script(script: str, expected: str) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert expected in completed.stdout
