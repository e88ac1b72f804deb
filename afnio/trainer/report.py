"""The run report: one self-contained HTML file built from a run directory.

:func:`write_report` reads ``history.jsonl`` (see :mod:`afnio.trainer.history`) and
``graph.svg`` from a run directory and writes ``report.html`` beside them. The Trainer calls it
when a fit ends; ``afnio report RUN_DIR`` calls it on demand. The page shows

- the training score per step and the training and validation scores per epoch;
- requests, tokens and cost per epoch and per model, and the run's totals per model;
- for each parameter its value at every step that changed it, as a word-level diff beside the
  feedback that led to the change and the optimizer's verdict (accepted, rejected, rolled back)
  and reason; steps are grouped per epoch in collapsed sections, long unchanged stretches are
  folded, and the full value after each epoch is one click away;
- the graph of the first training step (drawn by :mod:`afnio.utils.viz`);
- the run's configuration (Trainer arguments, optimizer options; never an API key).

The page needs no network: charts are inline SVG, styles and the few lines of script are
inline, and a Content-Security-Policy forbids loading anything. Everything taken from the
history is HTML-escaped, and a ``graph.svg`` that is not a plain afnio drawing is shown as an
image (where scripts cannot run). The same run directory always gives the same bytes.

Example:
    >>> import tempfile
    >>> from afnio.trainer.history import RunHistory
    >>> run_dir = tempfile.mkdtemp()
    >>> history = RunHistory(run_dir)
    >>> history.append({"type": "fit_start", "resumed": False, "config": {}, "parameters": [
    ...     {"name": "prompt", "role": "system prompt", "optimizer": 0, "index": 0,
    ...      "value": "Be brief."}]})
    >>> history.append({"type": "step", "epoch": 0, "batch_idx": 0, "step": 1,
    ...     "metrics": {"score": 0.5}, "usage": {"total": {}, "by_model": {}}, "params": [
    ...     {"name": "prompt", "optimizer": 0, "index": 0, "before": "Be brief.",
    ...      "after": "Be brief and polite.", "feedback": ["Too curt."],
    ...      "verdict": "accepted", "reason": None}]})
    >>> path = write_report(run_dir)
    >>> text = path.read_text(encoding="utf-8")
    >>> '<ins>and polite</ins>' in text.replace("<ins> ", "<ins>"), "Too curt." in text
    (True, True)
"""

from __future__ import annotations

import base64
import difflib
import html
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afnio.trainer.history import RunView, read_history

__all__ = ["REPORT_FILE", "render_report", "word_diff", "write_report"]

REPORT_FILE = "report.html"
GRAPH_FILE = "graph.svg"

_PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777")
_USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")
_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")  # a word or mark with the spaces before it
_CONTEXT_WORDS = 8  # tokens kept on each side of a folded unchanged stretch


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(data: Any) -> str:
    if isinstance(data, str):
        return data
    return json.dumps(data, ensure_ascii=False, indent=1)


# --------------------------------------------------------------------------- diff
def word_diff(before: str, after: str, context: int | None = _CONTEXT_WORDS) -> str:
    """HTML of a word-level diff: removed words in ``<del>``, added words in ``<ins>``.

    Args:
        before: The old text.
        after: The new text.
        context: Unchanged stretches are folded to their first and last ``context`` tokens
            (words and marks) around a ``… N unchanged words …`` marker when that hides more
            than 4 tokens (at the very start or end only the side next to a change is kept);
            ``None`` keeps everything.

    Returns:
        Escaped HTML (safe to embed).

    Example:
        >>> word_diff("Answer briefly.", "Answer politely.")
        'Answer<del> briefly</del><ins> politely</ins>.'
    """
    old, new = _TOKEN.findall(before), _TOKEN.findall(after)
    # Common ends are matched directly: most steps change a few words of a long prompt.
    head = 0
    while head < min(len(old), len(new)) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < min(len(old), len(new)) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    middle_old, middle_new = old[head : len(old) - tail], new[head : len(new) - tail]
    matcher = difflib.SequenceMatcher(None, middle_old, middle_new, autojunk=False)
    out: list[str] = []
    if head:
        out.append(_folded(old[:head], context, first=True, last=head == len(old)))
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        i1, i2, j1, j2 = i1 + head, i2 + head, j1 + head, j2 + head
        if tag == "equal":
            out.append(_folded(old[i1:i2], context, first=i1 == 0, last=i2 == len(old)))
            continue
        if i2 > i1:
            out.append(f"<del>{_e(''.join(old[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{_e(''.join(new[j1:j2]))}</ins>")
    if tail:
        out.append(_folded(old[len(old) - tail :], context, first=False, last=True))
    return "".join(out)


def _folded(tokens: list[str], context: int | None, first: bool, last: bool) -> str:
    """An unchanged stretch, with its middle folded when it is long."""
    keep_head = 0 if first else (context or 0)
    keep_tail = 0 if last else (context or 0)
    if context is None or len(tokens) <= keep_head + keep_tail + 4:
        return _e("".join(tokens))
    hidden = tokens[keep_head : len(tokens) - keep_tail]
    words = sum(1 for token in hidden if not token.isspace())
    return (
        _e("".join(tokens[:keep_head]))
        + f'<span class="fold">… {words} unchanged words …</span>'
        + _e("".join(tokens[len(tokens) - keep_tail :]))
    )


# --------------------------------------------------------------------------- charts
@dataclass
class _Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    markers: bool = False
    width: float = 1.5


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering ``low..high`` (whole numbers only when ``integer``)."""
    if high <= low:
        high = low + 1.0
    step = _nice_step(high - low, count)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.4g}"
    return f"{value:.3g}"


_WIDTH, _HEIGHT = 720, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 16, 40


def _frame(
    x_ticks: list[float] | None, y_ticks: list[float], x_label: str, y_label: str
) -> tuple[list[str], Any, Any]:
    """Grid, axes and labels; ``x_ticks=None`` spans 0..1 with no x tick labels (bars)."""
    x0, x1 = (x_ticks[0], x_ticks[-1]) if x_ticks else (0.0, 1.0)
    y0, y1 = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return _TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    out = []
    for y in y_ticks:
        out.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{sy(y):.1f}" '
            f'y2="{sy(y):.1f}"/><text class="tick" x="{_LEFT - 6}" y="{sy(y) + 4:.1f}" '
            f'text-anchor="end">{_e(_number(y))}</text>'
        )
    for x in x_ticks or []:
        out.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{_HEIGHT - _BOTTOM + 16}" '
            f'text-anchor="middle">{_e(_number(x))}</text>'
        )
    out.append(
        f'<line class="axis" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_HEIGHT - _BOTTOM}" '
        f'y2="{_HEIGHT - _BOTTOM}"/><line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" '
        f'y2="{_HEIGHT - _BOTTOM}"/>'
        f'<text class="label" x="{(_LEFT + _WIDTH - _RIGHT) / 2:.0f}" y="{_HEIGHT - 6}" '
        f'text-anchor="middle">{_e(x_label)}</text>'
        f'<text class="label" transform="translate(14 {(_TOP + _HEIGHT - _BOTTOM) / 2:.0f}) '
        f'rotate(-90)" text-anchor="middle">{_e(y_label)}</text>'
    )
    return out, sx, sy


def _figure(chart_id: str, title: str, svg: list[str], legend: Sequence[tuple[str, str]]) -> str:
    keys = "".join(
        f'<span class="key"><i style="background:{color}"></i>{_e(name)}</span>'
        for name, color in legend
    )
    return (
        f'<figure class="chart" data-chart="{_e(chart_id)}"><figcaption>{_e(title)}</figcaption>'
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}" role="img" '
        f'aria-label="{_e(title)}">' + "".join(svg) + f'</svg><div class="legend">{keys}</div>'
        "</figure>"
    )


def _empty_figure(chart_id: str, title: str, message: str) -> str:
    return (
        f'<figure class="chart empty" data-chart="{_e(chart_id)}"><figcaption>{_e(title)}'
        f'</figcaption><p class="muted">{_e(message)}</p></figure>'
    )


def _line_chart(
    chart_id: str, title: str, series: list[_Series], x_label: str, y_label: str
) -> str:
    points = [point for s in series for point in s.points]
    if not points:
        return _empty_figure(chart_id, title, "No values recorded yet.")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    y_low = min(0.0, min(ys))
    y_high = max(ys) if max(ys) > y_low else y_low + 1.0
    if 0 <= min(ys) and max(ys) <= 1:
        y_high = 1.0
    x_ticks = _ticks(min(xs), max(xs), integer=True)
    out, sx, sy = _frame(x_ticks, _ticks(y_low, y_high), x_label, y_label)
    for s in series:
        if not s.points:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        out.append(
            f'<polyline class="series" data-series="{_e(s.name)}" fill="none" '
            f'stroke="{s.color}" stroke-width="{s.width}" points="{coords}"/>'
        )
        if s.markers:
            out.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{s.color}">'
                f"<title>{_e(s.name)} at {_e(_number(x))}: {_e(_number(y))}</title></circle>"
                for x, y in s.points
            )
    return _figure(chart_id, title, out, [(s.name, s.color) for s in series if s.points])


def _bar_chart(
    chart_id: str,
    title: str,
    categories: list[int],
    stacks: Mapping[str, list[float]],
    x_label: str,
    y_label: str,
) -> str:
    totals = [sum(values[i] for values in stacks.values()) for i in range(len(categories))]
    if not categories or not any(totals):
        return _empty_figure(chart_id, title, f"No {y_label} recorded.")
    plot_w = _WIDTH - _LEFT - _RIGHT
    slot = plot_w / len(categories)
    bar = max(slot * 0.7, 1.0)
    y_ticks = _ticks(0.0, max(totals), integer=y_label != "cost (USD)")
    label_every = max(1, math.ceil(len(categories) / 12))
    shown = [c for i, c in enumerate(categories) if i % label_every == 0]
    out, _, sy = _frame(None, y_ticks, x_label, y_label)
    for index, category in enumerate(categories):
        x = _LEFT + slot * index + (slot - bar) / 2
        base = 0.0
        for (name, values), color in zip(stacks.items(), _colors()):
            value = values[index]
            if value <= 0:
                continue
            top, bottom = sy(base + value), sy(base)
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                f'height="{max(bottom - top, 0.5):.1f}" fill="{color}"><title>epoch {category}'
                f" · {_e(name)}: {_e(_number(value))}</title></rect>"
            )
            base += value
        if category in shown:
            out.append(
                f'<text class="tick" x="{x + bar / 2:.1f}" y="{_HEIGHT - _BOTTOM + 16}" '
                f'text-anchor="middle">{category}</text>'
            )
    return _figure(chart_id, title, out, list(zip(stacks, _colors())))


def _colors() -> Iterable[str]:
    index = 0
    while True:
        yield _PALETTE[index % len(_PALETTE)]
        index += 1


# --------------------------------------------------------------------------- data shaping
def _usage_table(usage: Mapping[str, Mapping[str, float]]) -> str:
    if not usage:
        return '<p class="muted">No model requests recorded.</p>'
    rows = []
    total = defaultdict(float)
    for label, values in sorted(usage.items()):
        cells = "".join(
            f"<td>{_e(_fmt_usage(key, values.get(key, 0)))}</td>" for key in _USAGE_KEYS
        )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
        for key in _USAGE_KEYS:
            total[key] += values.get(key, 0)
    cells = "".join(f"<td>{_e(_fmt_usage(key, total[key]))}</td>" for key in _USAGE_KEYS)
    rows.append(f'<tr class="total"><th>all models</th>{cells}</tr>')
    head = "".join(f"<th>{key.replace('_', ' ')}</th>" for key in _USAGE_KEYS)
    return (
        f'<table class="usage"><thead><tr><th>model</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _fmt_usage(key: str, value: float) -> str:
    if key == "cost_usd":
        return f"${value:.4f}" if value < 100 else f"${value:,.2f}"
    return f"{int(value):,}"


def _add_usage(into: dict[str, dict[str, float]], by_model: Mapping[str, Any]) -> None:
    for label, values in (by_model or {}).items():
        if not isinstance(values, Mapping):
            continue
        bucket = into.setdefault(str(label), defaultdict(float))
        for key in _USAGE_KEYS:
            number = values.get(key, 0)
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                bucket[key] += number


def _usage_per_epoch(view: RunView) -> dict[int, dict[str, dict[str, float]]]:
    per_epoch: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
    for step in view.steps:
        _add_usage(per_epoch[int(step.get("epoch", 0))], (step.get("usage") or {}).get("by_model"))
    for epoch in view.epochs:
        _add_usage(per_epoch[int(epoch.get("epoch", 0))], epoch.get("val_usage_by_model"))
    return per_epoch


def _moving_mean(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Each point's value replaced by the mean of it and the ``window - 1`` before it."""
    means, total = [], 0.0
    for index, (x, y) in enumerate(points):
        total += y
        if index >= window:
            total -= points[index - window][1]
        means.append((x, total / min(index + 1, window)))
    return means


def _score_charts(view: RunView) -> str:
    step_scores = [
        (float(s["step"]), float(s["metrics"]["score"]))
        for s in view.steps
        if isinstance((s.get("metrics") or {}).get("score"), (int, float))
    ]
    rows = [e.get("row") or {} for e in view.epochs]
    val_at_step = [
        (float(r.get("step", 0)), float(r["val_score"]))
        for r in rows
        if isinstance(r.get("val_score"), (int, float))
    ]
    window = max(1, math.ceil(len(step_scores) / max(len(view.epochs), 1)))
    smoothed = _moving_mean(step_scores, window) if window > 1 else []
    per_step = _line_chart(
        "score-per-step",
        "Score per training step",
        [
            _Series("train score (batch)", step_scores, "#93c5fd", width=1.0),
            _Series(f"train score (mean of {window} steps)", smoothed, _PALETTE[0], width=2.0),
            _Series("validation score (epoch end)", val_at_step, _PALETTE[1], markers=True),
        ],
        "step",
        "score",
    )
    series = []
    for index, (key, name) in enumerate((("train_score", "train"), ("val_score", "validation"))):
        points = [
            (float(e.get("epoch", 0)), float(r[key]))
            for e, r in zip(view.epochs, rows)
            if isinstance(r.get(key), (int, float))
        ]
        series.append(_Series(name, points, _PALETTE[index], markers=True, width=2.0))
    per_epoch = _line_chart("score-per-epoch", "Score per epoch", series, "epoch", "score")
    return f'<div class="charts">{per_step}{per_epoch}</div>'


def _usage_charts(view: RunView) -> tuple[str, dict[str, dict[str, float]]]:
    per_epoch = _usage_per_epoch(view)
    epochs = sorted(per_epoch)
    models = sorted({label for usage in per_epoch.values() for label in usage})
    totals: dict[str, dict[str, float]] = {}
    for usage in per_epoch.values():
        _add_usage(totals, usage)

    def stacks(value: Any) -> dict[str, list[float]]:
        return {m: [value(per_epoch[e].get(m, {})) for e in epochs] for m in models}

    charts = [
        _bar_chart(
            "cost-per-epoch",
            "Cost per epoch (USD), by model",
            epochs,
            stacks(lambda u: u.get("cost_usd", 0.0)),
            "epoch",
            "cost (USD)",
        ),
        _bar_chart(
            "tokens-per-epoch",
            "Tokens per epoch (prompt + completion), by model",
            epochs,
            stacks(lambda u: u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)),
            "epoch",
            "tokens",
        ),
        _bar_chart(
            "requests-per-epoch",
            "Requests per epoch, by model",
            epochs,
            stacks(lambda u: u.get("requests", 0)),
            "epoch",
            "requests",
        ),
    ]
    return f'<div class="charts">{"".join(charts)}</div>', totals


# --------------------------------------------------------------------------- parameters
_VERDICT_CLASS = {
    "accepted": "ok",
    "rejected": "bad",
    "rolled_back": "warn",
    "unchanged": "muted",
}


def _badge(verdict: str) -> str:
    css = _VERDICT_CLASS.get(verdict, "muted")
    return f'<span class="badge {css}">{_e(verdict.replace("_", " "))}</span>'


def _feedback_list(feedback: Sequence[Any]) -> str:
    if not feedback:
        return '<p class="feedback muted">No feedback.</p>'
    items = "".join(f"<li>{_e(text)}</li>" for text in feedback)
    return f'<ol class="feedback">{items}</ol>'


def _step_entry(step: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    before, after = _text(entry.get("before")), _text(entry.get("after"))
    verdict = str(entry.get("verdict") or "unchanged")
    reason = entry.get("reason")
    head = (
        f'<p class="h"><b>step {_e(step.get("step"))}</b> epoch {_e(step.get("epoch"))}, '
        f"batch {_e(step.get('batch_idx'))} {_badge(verdict)}"
        + (f' <i class="reason">{_e(reason)}</i>' if reason else "")
        + "</p>"
    )
    if before != after:
        change = f'<div class="diff">{word_diff(before, after)}</div>'
    elif "proposal" in entry:
        proposal = word_diff(before, _text(entry["proposal"]))
        change = f'<div class="diff proposal">{proposal}</div>'
    else:
        change = '<div class="diff same">value unchanged</div>'
    feedback = _feedback_list(entry.get("feedback") or [])
    return (
        f'<div class="step" data-step="{_e(step.get("step"))}">{head}'
        f'<div class="cols">{change}{feedback}</div></div>'
    )


def _epoch_scores(view: RunView) -> dict[int, str]:
    """``"train 0.61 · validation 0.70"`` per finished epoch."""
    scores = {}
    for record in view.epochs:
        row = record.get("row") or {}
        parts = [
            f"{name} {_number(row[key])}"
            for key, name in (("train_score", "train"), ("val_score", "validation"))
            if isinstance(row.get(key), (int, float))
        ]
        if parts:
            scores[int(record.get("epoch", 0))] = " · ".join(parts)
    return scores


def _parameter_section(
    parameter: Mapping[str, Any],
    events: list[tuple[Mapping[str, Any], Mapping[str, Any]]],
    scores: Mapping[int, str],
) -> str:
    name = str(parameter.get("name"))
    initial = _text(parameter.get("value"))
    final = _text(events[-1][1].get("after")) if events else initial
    counts: dict[str, int] = defaultdict(int)
    for _, entry in events:
        counts[str(entry.get("verdict") or "unchanged")] += 1
    summary = (
        " ".join(f"{_badge(verdict)} {count}" for verdict, count in sorted(counts.items()))
        or '<span class="muted">no feedback reached this parameter</span>'
    )
    by_epoch: dict[int, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = defaultdict(list)
    for step, entry in events:
        by_epoch[int(step.get("epoch", 0))].append((step, entry))
    epochs = []
    for epoch in sorted(by_epoch):
        items = by_epoch[epoch]
        tally: dict[str, int] = defaultdict(int)
        for _, entry in items:
            tally[str(entry.get("verdict") or "unchanged").replace("_", " ")] += 1
        verdicts = ", ".join(f"{count} {verdict}" for verdict, count in sorted(tally.items()))
        value_after = _text(items[-1][1].get("after"))
        score = f' <span class="muted">({_e(scores[epoch])})</span>' if epoch in scores else ""
        epochs.append(
            f'<details class="epoch" data-epoch="{epoch}"><summary>Epoch {epoch} · '
            f"{len(items)} step{'s' if len(items) != 1 else ''} with feedback: "
            f"{_e(verdicts)}{score}</summary>"
            + "".join(_step_entry(step, entry) for step, entry in items)
            + '<details class="value"><summary>value after this epoch</summary>'
            f'<pre class="value">{_e(value_after)}</pre></details></details>'
        )
    return (
        f'<section class="parameter" data-parameter="{_e(name)}" id="param-{_slug(name)}">'
        f'<h3>{_e(name)} <span class="muted">— {_e(parameter.get("role") or "")}</span></h3>'
        f'<p class="counts">{summary}</p>'
        '<div class="cols"><div><div class="muted">initial → final</div>'
        f'<div class="diff">{word_diff(initial, final, context=None)}</div></div>'
        f'<div><div class="muted">final value</div><pre class="value">{_e(final)}</pre></div>'
        "</div>"
        '<p class="controls"><button type="button" data-action="expand">expand all epochs'
        '</button> <button type="button" data-action="collapse">collapse all</button></p>'
        + "".join(epochs)
        + "</section>"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "parameter"


def _parameters(view: RunView) -> str:
    parameters = list(view.parameters)
    known = {(p.get("optimizer"), p.get("index")) for p in parameters}
    events: dict[tuple[Any, Any], list] = defaultdict(list)
    for step in view.steps:
        for entry in step.get("params") or []:
            key = (entry.get("optimizer"), entry.get("index"))
            events[key].append((step, entry))
            if key not in known:
                known.add(key)
                parameters.append(
                    {
                        "name": entry.get("name"),
                        "role": entry.get("role"),
                        "optimizer": key[0],
                        "index": key[1],
                        "value": entry.get("before"),
                    }
                )
    if not parameters:
        return '<p class="muted">No optimized parameters recorded.</p>'
    scores = _epoch_scores(view)
    return "".join(
        _parameter_section(p, events[(p.get("optimizer"), p.get("index"))], scores)
        for p in parameters
    )


# --------------------------------------------------------------------------- config
def _config_value(value: Any, depth: int = 0) -> str:
    """A configuration value as HTML: dicts (down to four levels) as nested tables, lists of
    dicts as tables one after another, anything else as JSON text."""
    if isinstance(value, Mapping) and depth < 4:
        if not value:
            return '<span class="muted">{}</span>'
        rows = "".join(
            f"<tr><th>{_e(key)}</th><td>{_config_value(item, depth + 1)}</td></tr>"
            for key, item in value.items()
        )
        return f'<table class="kv">{rows}</table>'
    nested = isinstance(value, list) and value and depth < 4
    if nested and all(isinstance(item, Mapping) for item in value):
        return "".join(_config_value(item, depth) for item in value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"<code>{_e(text)}</code>"


# --------------------------------------------------------------------------- page
_SAFE_SVG = re.compile(r'^<svg class="afnio-graph"[^>]*>')
_UNSAFE_SVG = re.compile(r"<\s*(script|foreignObject|iframe|image|a\b)|\son\w+\s*=|href\s*=", re.I)


def _graph(run_dir: Path) -> str:
    path = run_dir / GRAPH_FILE
    if not path.is_file():
        return '<p class="muted">No graph recorded (it is drawn from the first training step).</p>'
    svg = path.read_text(encoding="utf-8")
    if _SAFE_SVG.match(svg) and not _UNSAFE_SVG.search(svg):
        return f'<div class="graph">{svg}</div>'
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    image = f'<img alt="graph of one step" src="data:image/svg+xml;base64,{data}">'
    return f'<div class="graph">{image}</div>'


def _evals(view: RunView) -> str:
    if not view.evals:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r.get('stage'))}</td><td>{_e(r.get('step'))}</td><td>"
        + _e(", ".join(f"{k}={_number(v)}" for k, v in (r.get("metrics") or {}).items()))
        + "</td></tr>"
        for r in view.evals
    )
    return (
        "<h3>Stand-alone evaluations</h3><table><thead><tr><th>stage</th><th>at step</th>"
        f"<th>metrics</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _problems(view: RunView) -> str:
    failed = [s for s in view.steps if s.get("error")]
    if not failed:
        return ""
    items = "".join(
        f"<li>step {_e(s.get('step'))} (epoch {_e(s.get('epoch'))}, batch "
        f"{_e(s.get('batch_idx'))}): {_e(s.get('error'))}</li>"
        for s in failed
    )
    return f'<section id="problems"><h2>Failed steps</h2><ul>{items}</ul></section>'


def _summary(view: RunView, totals: Mapping[str, Mapping[str, float]]) -> str:
    end = view.end or {}
    status = end.get("status", "running or killed")
    rows = [e.get("row") or {} for e in view.epochs]
    cost = sum(values.get("cost_usd", 0.0) for values in totals.values())
    requests = sum(values.get("requests", 0) for values in totals.values())
    tokens = sum(
        values.get("prompt_tokens", 0) + values.get("completion_tokens", 0)
        for values in totals.values()
    )
    vals = [r["val_score"] for r in rows if isinstance(r.get("val_score"), (int, float))]
    facts = [
        ("status", f"{status}" + (f" ({end['stop_reason']})" if end.get("stop_reason") else "")),
        ("epochs finished", str(len(view.epochs))),
        ("training steps", str(len(view.steps))),
        ("resumed", f"{view.resumes}×"),
        ("requests", f"{int(requests):,}"),
        ("tokens", f"{int(tokens):,}"),
        ("cost", f"${cost:.4f}"),
    ]
    if vals:
        facts.append(("best validation score", _number(max(vals))))
    cells = "".join(f'<div class="fact"><span>{_e(k)}</span><b>{_e(v)}</b></div>' for k, v in facts)
    return f'<div class="facts">{cells}</div>'


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;color:#111827;margin:0;background:#f9fafb}
header,main{max-width:1100px;margin:0 auto;padding:0 20px}
header{padding-top:16px}h1{font-size:22px;margin:8px 0}h2{margin-top:32px;font-size:18px;
border-bottom:1px solid #e5e7eb;padding-bottom:4px}h3{font-size:16px;margin:20px 0 6px}
nav a{margin-right:14px}.muted{color:#6b7280}
.facts{display:flex;flex-wrap:wrap;gap:8px}.fact{background:#fff;border:1px solid #e5e7eb;
border-radius:6px;padding:6px 10px}.fact span{display:block;font-size:11px;color:#6b7280}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px}
.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:0;padding:8px}
.chart svg{width:100%;height:auto}.chart figcaption{font-weight:600;margin-bottom:4px}
.chart .grid{stroke:#e5e7eb}.chart .axis{stroke:#9ca3af}.chart text{font-size:11px;fill:#374151}
.legend .key{margin-right:14px;font-size:12px}.legend i{display:inline-block;width:10px;
height:10px;margin-right:4px;border-radius:2px}
table{border-collapse:collapse;background:#fff;margin:8px 0}td,th{border:1px solid #e5e7eb;
padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
tr.total{font-weight:600}
.parameter{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:4px 14px 12px;
margin:14px 0}.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.diff,pre.value{white-space:pre-wrap;word-break:break-word;font:13px/1.5 ui-monospace,monospace;
background:#f3f4f6;border-radius:4px;padding:6px 8px;margin:4px 0}
del{background:#fee2e2;color:#991b1b}ins{background:#dcfce7;color:#166534;text-decoration:none}
.fold{color:#6b7280;font-style:italic}
details.epoch{border-top:1px solid #e5e7eb;padding:4px 0}details>summary{cursor:pointer}
.step{border-left:3px solid #e5e7eb;margin:8px 0 8px 8px;padding-left:10px}
.step .h{margin:2px 0}.diff.proposal::before{content:"proposed, not kept: ";color:#6b7280}
.diff.same{color:#6b7280}ol.feedback::before,p.feedback::before{content:"feedback";
display:block;margin-left:-20px;color:#6b7280}p.feedback{margin:4px 0}
p.feedback::before{margin-left:0}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;border:1px solid}
.badge.ok{background:#dcfce7;color:#166534}.badge.bad{background:#fee2e2;color:#991b1b}
.badge.warn{background:#fef3c7;color:#92400e}.badge.muted{background:#f3f4f6}
.reason{color:#374151;font-style:italic}ol.feedback{margin:4px 0;padding-left:20px}
ol.feedback li{white-space:pre-wrap;margin-bottom:4px}
.graph{overflow:auto;background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
.afnio-graph text{font-family:ui-monospace,monospace;font-size:12px;fill:#111827}
.afnio-graph .edge-label{fill:#374151;font-size:11px;paint-order:stroke;stroke:#fff;
stroke-width:4px}
#config{overflow-x:auto}table.kv td,table.kv th{text-align:left;vertical-align:top}
table.kv table.kv{margin:0}
code{white-space:pre-wrap;word-break:break-word}
"""

_SCRIPT = """
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-action]");
  if (!button) { return; }
  var open = button.getAttribute("data-action") === "expand";
  var section = button.closest("section.parameter");
  section.querySelectorAll("details.epoch").forEach(function (d) { d.open = open; });
});
"""

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)


def render_report(view: RunView, run_dir: str | os.PathLike, title: str | None = None) -> str:
    """The report page of a run, as HTML text (see the module docstring).

    Args:
        view: The run's history (from :func:`~afnio.trainer.history.read_history`).
        run_dir: The run directory (for ``graph.svg`` and the default title).
        title: The page title (default: ``afnio run: <directory name>``).

    Returns:
        The HTML document.
    """
    directory = Path(run_dir)
    title = title or f"afnio run: {directory.resolve().name}"
    usage_charts, totals = _usage_charts(view)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>{_summary(view, totals)}",
        '<nav><a href="#scores">Scores</a><a href="#usage">Cost and tokens</a>'
        '<a href="#parameters">Parameters</a><a href="#graph">Graph</a>'
        '<a href="#config">Configuration</a></nav></header><main>',
        f'<section id="scores"><h2>Scores</h2>{_score_charts(view)}{_evals(view)}</section>',
        f'<section id="usage"><h2>Cost and tokens</h2>{usage_charts}',
        f"<h3>Totals per model</h3>{_usage_table(totals)}</section>",
        f'<section id="parameters"><h2>Parameters</h2>{_parameters(view)}</section>',
        _problems(view),
        f'<section id="graph"><h2>Graph of the first training step</h2>{_graph(directory)}'
        "</section>",
        f'<section id="config"><h2>Configuration</h2>{_config_value(view.config)}</section>',
        f"</main><script>{_SCRIPT}</script></body></html>",
        "",
    ]
    return "\n".join(parts)


def write_report(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Build the report of ``run_dir`` and write it (UTF-8).

    Args:
        run_dir: The Trainer's run directory (holding ``history.jsonl``).
        path: Where to write (default ``RUN_DIR/report.html``).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: If ``run_dir`` is not a directory.
        ValueError: If the history file is damaged (see
            :func:`~afnio.trainer.history.read_history`).
    """
    directory = Path(run_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"afnio report: run directory {str(directory)!r} does not exist")
    target = Path(path) if path is not None else directory / REPORT_FILE
    text = render_report(read_history(directory), directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
