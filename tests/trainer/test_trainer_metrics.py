"""Step-output parsing, batch sizes and batch-size-weighted averages of the Trainer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.trainer.metrics import (
    MetricAccumulator,
    MetricsLog,
    batch_size_of,
    parse_step_output,
    score_per_sample,
)


def pair(score=2, batch=("a", "b")):
    return afnio.Variable(score), afnio.Variable(list(batch), role="explanation")


def test_parse_pair_and_dict_with_extra_metrics():
    score, explanation = pair()
    parsed = parse_step_output((score, explanation), "training_step")
    assert (parsed.score, parsed.explanation, parsed.extras) == (score, explanation, {})
    parsed = parse_step_output(
        {"loss": (score, explanation), "hits": afnio.Variable([1, 0, 1, 1]), "n": 3},
        "validation_step",
    )
    assert parsed.extras == {"hits": 0.75, "n": 3.0}


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ({"hits": 1}, "validation_step: the returned dict has no 'loss' entry"),
        ("text", "expected the evaluator's \\(score, explanation\\) pair, got str"),
        ((1, "why"), "explanation .* must be a Variable, got str"),
        ((afnio.Variable("high"), afnio.Variable("x")), "metric 'score' \\(role ''\\) must be"),
        (
            {"loss": pair(), "note": afnio.Variable("x", role="note")},
            "metric 'note' \\(role 'note'",
        ),
        ({"loss": pair(), "flag": True}, "metric 'flag' must be a number"),
        ({"loss": pair(), "mixed": afnio.Variable(["a", "b"])}, "got a batch holding \\['str'\\]"),
    ],
)
def test_malformed_outputs_name_the_hook_and_the_metric(output, match):
    with pytest.raises(TypeError, match=match):
        parsed = parse_step_output(output, "validation_step")
        score_per_sample(parsed.score, 2, "sum", "validation_step")


def test_manual_optimization_may_return_nothing_or_only_metrics():
    assert parse_step_output(None, "training_step", allow_none=True).score is None
    parsed = parse_step_output({"hits": 0.5}, "training_step", allow_none=True)
    assert (parsed.score, parsed.extras) == (None, {"hits": 0.5})
    with pytest.raises(TypeError):
        parse_step_output(None, "training_step")


def test_batch_size_comes_from_the_explanation_then_the_batch():
    assert batch_size_of(None, afnio.Variable(["a", "b", "c"])) == 3
    questions = afnio.Variable(["q1", "q2"], role="questions")
    assert batch_size_of((questions, ["a1", "a2"]), afnio.Variable("scalar")) == 2
    assert batch_size_of({"q": ["x", "y", "z", "w"]}) == 4
    assert batch_size_of([(afnio.Variable("a"),), ("b", "c", "d")]) == 2  # uncollated samples
    assert batch_size_of(({"q": afnio.Variable("one")}, (["x", "y", "z"],))) == 3
    assert batch_size_of("one sample") == 1


def test_score_per_sample_rules():
    assert score_per_sample(afnio.Variable(3), 4, "sum", "h") == 0.75
    assert score_per_sample(afnio.Variable(0.5), 4, "mean", "h") == 0.5
    assert score_per_sample(afnio.Variable([1, 0, 0, 1]), 4, "sum", "h") == 0.5  # a batch: mean
    assert score_per_sample(2, 8, "sum", "h") == 0.25


@given(st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=6), min_size=1, max_size=8))
def test_weighted_epoch_mean_equals_the_mean_over_samples(batches):
    accumulator = MetricAccumulator()
    for batch in batches:
        accumulator.add({"score": sum(batch) / len(batch)}, weight=len(batch))
    samples = [value for batch in batches for value in batch]
    assert accumulator.means("val_")["val_score"] == pytest.approx(sum(samples) / len(samples))
    restored = MetricAccumulator()
    restored.load_state_dict(accumulator.state_dict())
    assert restored.means() == accumulator.means()


def test_metrics_log_writes_jsonl_and_a_csv_with_every_column(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.append({"stage": "fit", "epoch": 0, "train_score": 0.5})
    log.append({"stage": "validate", "val_score": 0.25})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        '{"stage": "fit", "epoch": 0, "train_score": 0.5}',
        '{"stage": "validate", "val_score": 0.25}',
    ]
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines() == [
        "stage,epoch,train_score,val_score",
        "fit,0,0.5,",
        "validate,,,0.25",
    ]
    log.replace([{"stage": "fit", "epoch": 0}])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"stage": "fit", "epoch": 0}\n'
    memory_only = MetricsLog(None)
    memory_only.append({"a": 1})
    assert memory_only.rows == [{"a": 1}] and memory_only.jsonl_path is None
