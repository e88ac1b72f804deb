"""The main job's script on every optimizer path, through the official ``openai`` SDK against the
fake provider server (the full run on the embedded model is CI's main-job step)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from afnio.testing import FakeProviderServer
from afnio.utils.datasets import FacilitySupport

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "facility_support.py"


@pytest.fixture(scope="module")
def facility_support():
    spec = importlib.util.spec_from_file_location("facility_support_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gold_labels() -> dict[str, str]:
    labels = {}
    for split in ("train", "val"):
        data = FacilitySupport(split)
        for index in range(len(data)):
            message, (_urgency, sentiment, _categories) = data[index]
            labels[message.data] = sentiment.data
    return labels


def test_demos_run_chooses_demonstrations_that_raise_the_validation_score(
    facility_support, fake_server: FakeProviderServer, monkeypatch, tmp_path, capsys
) -> None:
    gold = gold_labels()

    def classify(body: dict) -> str:
        # Answers the gold label only once the system message holds demonstrations.
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        message = next((text for text in gold if text in user), None)
        if message is None:  # the example's probe of structured-output support
            return json.dumps({"sentiment": "positive"})
        label = gold[message] if "Sentiment:" in system else "negative"
        return json.dumps({"sentiment": label})

    fake_server.reply = classify
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-demos")
    code = facility_support.main([
        "--model", "openai/gpt-4.1-nano", "--base-url", fake_server.openai_base_url,
        "--optimizer", "demos", "--subset", "4", "--batch-size", "2", "--no-progress",
        "--run-dir", str(tmp_path / "run"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- demonstrations chosen ---\nMessage: " in out
    before = float(out.split("validation score before training:")[1].split()[0])
    after = float(out.split("validation score after training:")[1].split()[0])
    assert (before, after) == (0.25, 1.0)  # one of the four validation messages is negative
    assert "sk-test-demos" not in out


def test_gated_tgd_run_keeps_a_rewrite_that_raises_the_validation_score(
    facility_support, fake_server: FakeProviderServer, monkeypatch, tmp_path, capsys
) -> None:
    gold = gold_labels()
    improved = "Answer with exactly one word: positive, neutral or negative."
    kinds = []

    def reply(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if "<IMPROVED_VARIABLE>" in system + user:
            kinds.append("step")
            return f"<IMPROVED_VARIABLE>{improved}</IMPROVED_VARIABLE>"
        if schema == "sentiment":
            kinds.append("forward")
            message = next((text for text in gold if text in user), None)
            if message is None:  # the example's probe of structured-output support
                return json.dumps({"sentiment": "positive"})
            return json.dumps({"sentiment": gold[message] if improved in system else "negative"})
        kinds.append("gradient")
        return json.dumps({"feedback": "Tell the model the three labels and to answer with one."})

    fake_server.reply = reply
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-tgd")
    code = facility_support.main([
        "--model", "openai/gpt-4.1-nano", "--base-url", fake_server.openai_base_url,
        "--subset", "4", "--batch-size", "4", "--no-progress", "--run-dir", str(tmp_path / "run"),
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"--- system prompt after ---\n{improved}" in out
    before = float(out.split("validation score before training:")[1].split()[0])
    after = float(out.split("validation score after training:")[1].split()[0])
    assert (before, after) == (0.25, 1.0)
    assert "proposals accepted 1, rejected 0" in out
    assert {"forward", "gradient", "step"} <= set(kinds)
    assert (tmp_path / "run" / "report.html").is_file()
