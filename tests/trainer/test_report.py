"""Run history and HTML report: what each step did to each parameter, why, and what it cost."""

from __future__ import annotations

import html
import logging
import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st
from verdict_program import FORWARD, OPTIMIZER, SECRET, fitted, loaders, make

import afnio
from afnio.optim import Optimizer
from afnio.trainer.cli import main as cli_main
from afnio.trainer.history import RunHistory, read_history
from afnio.trainer.recorder import StepRecorder
from afnio.trainer.report import word_diff, write_report

ROOT = Path(__file__).resolve().parents[2]
CHARTS = [
    "score-per-step",
    "score-per-epoch",
    "cost-per-epoch",
    "tokens-per-epoch",
    "requests-per-epoch",
]


# --------------------------------------------------------------------------- history
def test_history_records_each_steps_feedback_verdicts_and_usage_per_model(tmp_path):
    trainer, agent = fitted(tmp_path / "run", hidden_at=(1, 2))
    view = read_history(tmp_path / "run")
    assert [(s["step"], s["epoch"], s["batch_idx"]) for s in view.steps] == [
        (e * 4 + b + 1, e, b) for e in range(2) for b in range(4)
    ]
    assert [s["metrics"]["score"] for s in view.steps] == pytest.approx(agent.scores)
    assert [p["name"] for p in view.parameters] == ["prefix", "style"]
    optimizer = agent.optimizers()
    prefix, style = "Answer <b>briefly</b>.", "Be polite."
    for number, step in enumerate(view.steps, start=1):
        seen = optimizer.seen_feedback[number - 1]
        entries = {entry["name"]: entry for entry in step["params"]}
        assert sorted(entries) == ["prefix", "style"] and sorted(seen) == [0, 1]
        first, second = entries["prefix"], entries["style"]
        assert first["feedback"] == seen[0] and second["feedback"] == seen[1]
        assert (first["before"], first["after"]) == (prefix, f"{prefix}|s{number}")
        assert (first["verdict"], first["reason"]) == ("accepted", None)
        expected = "rejected" if number % 2 else "rolled_back"
        assert (second["before"], second["after"], second["verdict"]) == (style, style, expected)
        assert second["proposal"] == f"{style}|s{number}"
        assert str(number) in second["reason"]
        prefix = first["after"]
    assert agent.prefix.data == prefix and agent.style.data == style

    # Usage per model: one forward request per batch, one optimizer request per parameter.
    forward_label, optimizer_label = FORWARD, OPTIMIZER
    for step in view.steps:
        by_model = step["usage"]["by_model"]
        assert by_model[forward_label]["requests"] == 1
        assert by_model[optimizer_label]["requests"] == 2
        hidden = (step["epoch"], step["batch_idx"]) == (1, 2)
        assert ("other" in by_model) is hidden
        assert sum(u["requests"] for u in by_model.values()) == step["usage"]["total"]["requests"]
    for label, client in (
        (forward_label, agent.forward_client),
        (optimizer_label, agent.optimizer_client),
    ):
        spent = sum(s["usage"]["by_model"][label]["prompt_tokens"] for s in view.steps)
        spent += sum(
            e["val_usage_by_model"].get(label, {}).get("prompt_tokens", 0) for e in view.epochs
        )
        assert spent == client.get_usage()["prompt_tokens"]
    assert [e["val_usage_by_model"][forward_label]["requests"] for e in view.epochs] == [2, 2]
    assert [e["row"]["val_score"] for e in view.epochs] == [
        row["val_score"] for row in trainer.metrics_log.rows
    ]
    assert view.end["status"] == "success" and view.end["stop_reason"] == "max_epochs"


def test_without_last_step_verdicts_are_derived_and_stale_or_malformed_ones_ignored(caplog):
    prompt = afnio.Variable("v0", role="prompt", requires_grad=True)
    other = afnio.Variable(["w0", "w1"], role="examples", requires_grad=True)

    class Plain(Optimizer):
        def step(self, closure=None):
            with afnio.no_grad():
                prompt.copy_(prompt.data + "+")

    plain = Plain([prompt, other], defaults={})
    recorder = StepRecorder(None, [plain])
    prompt.append_grad(afnio.Variable("longer"))
    other.append_grad(afnio.Variable(["", "fine as it is"]))
    recorder.before_update()
    plain.step()
    entries = recorder.after_update()
    assert [(e["name"], e["verdict"], e["feedback"]) for e in entries] == [
        ("optimizers[0].params[0]", "accepted", ["longer"]),
        ("optimizers[0].params[1]", "unchanged", ["fine as it is"]),
    ]
    # A last_step left over from an earlier step is not this step's verdict.
    plain.last_step = [{"index": 0, "verdict": "rejected", "reason": "old"}]
    recorder.before_update()
    plain.step()
    assert recorder.after_update()[0]["verdict"] == "accepted"
    # A malformed last_step is reported and the verdict derived.
    recorder.before_update()
    plain.last_step = "rejected"
    plain.step()
    with caplog.at_level(logging.WARNING, logger="afnio.trainer.recorder"):
        assert recorder.after_update()[0]["verdict"] == "accepted"
    assert "last_step should be a list of dicts, got str" in caplog.text
    # Nothing is reported for a step whose snapshot was never taken (it failed before step()).
    recorder.begin_step(afnio.models.usage.Usage())
    assert recorder.after_update() == []


def test_fit_without_last_step_records_derived_verdicts(tmp_path):
    fitted(tmp_path / "run", expose=False)
    steps = read_history(tmp_path / "run").steps
    verdicts = {(e["name"], e["verdict"]) for s in steps for e in s["params"]}
    assert verdicts == {("prefix", "accepted"), ("style", "unchanged")}
    assert not any("proposal" in e for s in steps for e in s["params"])


def test_resume_after_a_crash_rebuilds_the_uninterrupted_history(tmp_path):
    fitted(tmp_path / "full")
    run_dir = tmp_path / "crashed"
    trainer, agent = make(run_dir, crash_at=(1, 2))
    with pytest.raises(RuntimeError, match="crash at batch 2"):
        trainer.fit(agent, *loaders())
    failed = read_history(run_dir)
    assert failed.end["status"] == "failed"
    assert failed.steps[-1]["error"] == "RuntimeError: crash at batch 2"
    assert failed.steps[-1]["usage"]["by_model"][FORWARD]["requests"] == 1
    resumed_trainer, resumed = make(run_dir)
    resumed_trainer.fit(resumed, *loaders(), ckpt_path=run_dir / "checkpoints" / "last.ckpt")

    def shape(view):
        steps = [
            (s["step"], s["epoch"], s["batch_idx"], s["metrics"], s["params"], s["error"])
            for s in view.steps
        ]
        return steps, [e["row"]["val_score"] for e in view.epochs]

    full, again = read_history(tmp_path / "full"), read_history(run_dir)
    assert shape(again) == shape(full)
    assert again.resumes == 1 and again.end["status"] == "success"
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "RuntimeError: crash at batch 2" not in report  # the replayed step replaced it


def test_history_reader_keeps_the_last_fit_and_names_a_damaged_line(tmp_path):
    history = RunHistory(tmp_path)
    history.append({"type": "fit_start", "resumed": False, "config": {"run": 1}})
    history.append({"type": "step", "epoch": 0, "batch_idx": 0, "step": 1})
    history.append({"type": "fit_end", "status": "success"})
    history.append({"type": "eval", "stage": "validate", "step": 1, "metrics": {}})
    history.append({"type": "fit_start", "resumed": False, "config": {"run": 2}})
    history.append({"type": "step", "epoch": 0, "batch_idx": 0, "step": 1, "metrics": {"x": 2}})
    view = read_history(tmp_path)
    assert view.config == {"run": 2} and len(view.steps) == 1 and view.end is None
    assert view.steps[0]["metrics"] == {"x": 2} and [e["stage"] for e in view.evals] == ["validate"]
    with (tmp_path / "history.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ValueError, match=r"history.jsonl'?: line 7 is not JSON"):
        read_history(tmp_path)


# --------------------------------------------------------------------------- report
def report_parts(text):
    charts = re.findall(r'<figure class="chart[^"]*" data-chart="([^"]+)"', text)
    parameters = re.findall(r'<section class="parameter" data-parameter="([^"]+)"', text)
    return charts, parameters


def test_report_shows_scores_costs_parameter_history_graph_and_config(tmp_path):
    trainer, agent = fitted(tmp_path / "run")
    assert trainer.report_path == tmp_path / "run" / "report.html"
    text = trainer.report_path.read_text(encoding="utf-8")
    charts, parameters = report_parts(text)
    assert charts == CHARTS and parameters == ["prefix", "style"]
    # Scores: one point per step in the step chart, both series per epoch.
    step_chart = text.split('data-chart="score-per-step"')[1].split("</figure>")[0]
    line = re.search(r'data-series="train score \(batch\)"[^>]*points="([^"]+)"', step_chart)
    assert len(line.group(1).split()) == 8
    smooth = re.search(r'data-series="train score \(mean of 4 steps\)"[^>]*points="([^"]+)"', text)
    raw_y = [float(point.split(",")[1]) for point in line.group(1).split()]
    smooth_y = [float(point.split(",")[1]) for point in smooth.group(1).split()]
    assert smooth_y[-1] == pytest.approx(sum(raw_y[-4:]) / 4, abs=0.1)  # pixel rounding
    assert smooth_y[0] == raw_y[0]
    # Usage: the two models are stacked in each epoch's bars and totalled per model.
    requests = text.split('data-chart="requests-per-epoch"')[1].split("</figure>")[0]
    assert requests.count("<rect") == 4 and f"{OPTIMIZER}: 8" in requests
    assert f"{FORWARD}: 6" in requests  # 4 training batches + 2 validation batches
    costs = text.split('data-chart="cost-per-epoch"')[1].split("</figure>")[0]
    assert costs.count("<rect") == 4
    totals = text.split("Totals per model")[1].split("</table>")[0]
    assert f"<th>{FORWARD}</th><td>12</td>" in totals
    assert f"<th>{OPTIMIZER}</th><td>16</td>" in totals
    spent = sum(c.get_usage()["cost_usd"] for c in (agent.forward_client, agent.optimizer_client))
    assert 0 < spent and f"<td>${spent:.4f}</td></tr></tbody>" in totals
    # Parameter history: the diff of each accepted step, the rejected proposals, their reasons.
    prefix = text.split('data-parameter="prefix"')[1].split("</section>")[0]
    assert prefix.count('class="step"') == 8
    assert "<ins>|s1</ins>" in prefix and "<ins>|s8</ins>" in prefix
    assert "Answer &lt;b&gt;briefly&lt;/b&gt;." in prefix  # user text is escaped
    style = text.split('data-parameter="style"')[1].split("</section>")[0]
    assert style.count("badge bad") == 5 and style.count("badge warn") == 5  # 4 + summary
    assert "placeholder lost at step 7" in style and "minibatch score fell at step 8" in style
    assert 'class="diff proposal"' in style and "<ins>|s3</ins>" in style
    first_feedback = agent.optimizers().seen_feedback[0][0][0]
    assert html.escape(first_feedback, quote=True) in prefix
    # The graph of the first step and the configuration, with no secret anywhere.
    graph = text.split('id="graph"')[1].split("</section>")[0]
    assert '<svg class="afnio-graph"' in graph and "DeterministicEvaluatorBackward" in graph
    assert "Answer &lt;b&gt;briefly&lt;/b&gt;." in graph  # the value before the first step
    config = text.split('id="config"')[1].split("</section>")[0]
    assert "<th>max_epochs</th><td><code>2</code>" in config
    assert "<th>temperature</th><td><code>0.0</code>" in config and "api_key" not in config
    for name in ("report.html", "history.jsonl", "graph.svg", "graph.dot", "metrics.jsonl"):
        assert SECRET not in (tmp_path / "run" / name).read_text(encoding="utf-8"), name
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_report_escapes_history_text_and_refuses_a_scripted_graph(tmp_path):
    history = RunHistory(tmp_path)
    history.append(
        {
            "type": "fit_start",
            "resumed": False,
            "config": {"<x>": "<y>"},
            "parameters": [
                {
                    "name": "p<1>",
                    "role": "r",
                    "optimizer": 0,
                    "index": 0,
                    "value": "<script>alert(1)</script>",
                }
            ],
        }
    )
    history.append(
        {
            "type": "step",
            "epoch": 0,
            "batch_idx": 0,
            "step": 1,
            "metrics": {},
            "usage": {},
            "params": [
                {
                    "name": "p<1>",
                    "optimizer": 0,
                    "index": 0,
                    "before": "<script>alert(1)</script>",
                    "after": "<img src=x onerror=alert(2)>",
                    "feedback": ["</li><script>alert(3)</script>"],
                    "verdict": "<b>accepted</b>",
                    "reason": "<i>",
                }
            ],
        }
    )
    (tmp_path / "graph.svg").write_text('<svg class="afnio-graph"><script>alert(4)</script></svg>')
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert text.count("<script") == 1  # the report's own script
    assert "<img src=x" not in text and "<b>accepted" not in text and "<x>" not in text
    assert 'src="data:image/svg+xml;base64,' in text  # the graph, where scripts can't run


def test_afnio_report_rebuilds_the_same_file(tmp_path, capsys):
    trainer, _ = fitted(tmp_path / "run")
    written = trainer.report_path.read_bytes()
    trainer.report_path.unlink()
    assert cli_main(["report", str(tmp_path / "run")]) == 0
    assert trainer.report_path.read_bytes() == written
    assert cli_main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "copy.html")]) == 0
    assert (tmp_path / "copy.html").read_bytes() == written
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'copy.html'}"
    assert cli_main(["report", str(tmp_path / "missing")]) == 1
    assert "run directory" in capsys.readouterr().err
    with (tmp_path / "run" / "history.jsonl").open("a") as handle:
        handle.write("garbage\n")
    assert cli_main(["report", str(tmp_path / "run")]) == 1
    assert "is not JSON" in capsys.readouterr().err

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "run" / "history.jsonl").write_text("")
    completed = subprocess.run(
        [sys.executable, "-m", "afnio", "report", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"wrote {tmp_path / 'run' / 'report.html'}"


def test_pyproject_installs_the_afnio_command_and_the_mlflow_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, name = project["scripts"]["afnio"].partition(":")
    assert getattr(import_module(module), name) is cli_main
    extras = project["optional-dependencies"]
    assert any(dep.startswith("mlflow") for dep in extras["mlflow"])
    assert any(dep.startswith("mlflow") for dep in extras["dev"])


# --------------------------------------------------------------------------- diff
def unmark(diff_html, drop):
    without = re.sub(rf"<{drop}>.*?</{drop}>", "", diff_html, flags=re.S)
    return html.unescape(re.sub(r"</?(ins|del)>", "", without))


texts = st.lists(
    st.sampled_from(["a", "b", "c", "<p>", "&", " ", "  ", "\n", ".", "word", "é"]), max_size=40
).map("".join)


@given(before=texts, after=texts)
def test_word_diff_holds_both_texts(before, after):
    diff = word_diff(before, after, context=None)
    assert unmark(diff, "ins") == before
    assert unmark(diff, "del") == after


def test_word_diff_folds_long_unchanged_stretches_but_never_a_change():
    words = [f"w{i}" for i in range(60)]
    changed = list(words)
    changed[30] = "NEW"
    diff = word_diff(" ".join(words), " ".join(changed), context=3)
    assert "<del> w30</del><ins> NEW</ins>" in diff
    assert diff.count("unchanged words") == 2
    assert "… 27 unchanged words …" in diff and "… 26 unchanged words …" in diff
    assert " w27 w28 w29" in diff and " w31 w32 w33" in diff
