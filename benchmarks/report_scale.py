"""Run report at scale: 50 epochs x 100 steps, two prompts, two models.

Synthesizes a run history (``history.jsonl``) the way the Trainer writes it — every step gives
feedback to both prompts, most proposals are accepted, some rejected or rolled back, each step
spends tokens on two models — then prints the report's size and render time, and the time
headless Chromium needs to load it when Chromium is installed.

    python benchmarks/report_scale.py [--epochs 50] [--steps 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import afnio
from afnio.trainer.history import RunHistory
from afnio.trainer.report import write_report
from afnio.utils.viz import to_svg

WORDS = (
    "classify the customer message by sentiment answer with one word positive negative neutral "
    "be concise consider sarcasm urgency tone politeness escalate complaints mention facility "
    "maintenance cleaning booking refund delay staff response quality"
).split()
MODELS = ("openai/gpt-4.1-mini", "anthropic/claude-haiku-4-5")


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + "."


def mutate(rng: random.Random, text: str, limit: int) -> str:
    """Change a few words; add a short sentence, or drop words when past ``limit`` chars."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 4)):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    if len(text) > limit:
        start = rng.randrange(len(words) - 6)
        del words[start : start + 6]
    elif rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), sentence(rng, 6))
    return " ".join(words)


def usage(rng: random.Random, scale: float) -> dict:
    prompt, completion = int(rng.randint(800, 2400) * scale), int(rng.randint(60, 300) * scale)
    return {
        "requests": max(1, int(4 * scale)),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 0,
        "cost_usd": round(prompt * 4e-7 + completion * 1.6e-6, 10),
    }


def synthesize(run_dir: Path, epochs: int, steps: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    history = RunHistory(run_dir)
    values = {
        "system_prompt": " ".join(sentence(rng, 14) for _ in range(12)),  # ~1.1 kB
        "answer_format": sentence(rng, 30),
    }
    parameters = [
        {"name": name, "role": name.replace("_", " "), "optimizer": 0, "index": i, "value": value}
        for i, (name, value) in enumerate(values.items())
    ]
    config = {"trainer": {"max_epochs": epochs}, "agent": "Synthetic", "optimizers": []}
    history.append(
        {
            "type": "fit_start",
            "resumed": False,
            "epoch": 0,
            "batches_done": 0,
            "step": 0,
            "config": config,
            "parameters": parameters,
        }
    )
    step = 0
    for epoch in range(epochs):
        scores = []
        for batch_idx in range(steps):
            step += 1
            entries = []
            for parameter in parameters:
                name = parameter["name"]
                before = values[name]
                proposal = mutate(rng, before, limit=len(parameter["value"]) + 200)
                verdict = rng.choices(["accepted", "rejected", "rolled_back"], [8, 1, 1])[0]
                after = proposal if verdict == "accepted" else before
                entry = {
                    "name": name,
                    "role": parameter["role"],
                    "optimizer": 0,
                    "index": parameter["index"],
                    "before": before,
                    "after": after,
                    "feedback": [" ".join(sentence(rng, 12) for _ in range(4))],  # ~0.4 kB
                    "verdict": verdict,
                    "reason": None if verdict == "accepted" else "validation score dropped",
                }
                if after != proposal:
                    entry["proposal"] = proposal
                entries.append(entry)
                values[name] = after
            score = min(1.0, max(0.0, 0.4 + epoch / (2 * epochs) + rng.uniform(-0.2, 0.2)))
            scores.append(score)
            by_model = {MODELS[0]: usage(rng, 1.0), MODELS[1]: usage(rng, 0.5)}
            total = {k: sum(u[k] for u in by_model.values()) for k in by_model[MODELS[0]]}
            history.append(
                {
                    "type": "step",
                    "epoch": epoch,
                    "batch_idx": batch_idx,
                    "step": step,
                    "batch_size": 16,
                    "metrics": {"score": score},
                    "usage": {"total": total, "by_model": by_model},
                    "params": entries,
                    "error": None,
                }
            )
        row = {
            "stage": "fit",
            "epoch": epoch,
            "step": step,
            "train_score": sum(scores) / len(scores),
            "val_score": min(1.0, 0.45 + epoch / (2 * epochs)),
        }
        history.append(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": step,
                "row": row,
                "val_usage_by_model": {MODELS[0]: usage(rng, 8.0)},
            }
        )
    history.append(
        {
            "type": "fit_end",
            "status": "success",
            "stop_reason": "max_epochs",
            "epoch": epochs,
            "step": step,
        }
    )
    prompt = afnio.Variable(values["system_prompt"], role="system prompt", requires_grad=True)
    (run_dir / "graph.svg").write_text(to_svg(prompt + " question"), encoding="utf-8")


def browser_load_seconds(report: Path) -> float | None:
    """Seconds from navigation to the load event in headless Chromium (None without one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))
    from chromium import Chromium, find_chromium

    executable = find_chromium()
    if executable is None:
        return None
    with Chromium.launch(executable) as browser:
        browser.open("about:blank")  # warm the browser up
        start = time.perf_counter()
        page = browser.open(report.resolve().as_uri())
        elapsed = time.perf_counter() - start
        if page.errors:
            raise RuntimeError(f"console errors while loading the report: {page.errors}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--keep", metavar="DIR", help="write the run here and keep it")
    args = parser.parse_args()
    run_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="afnio-report-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        synthesize(run_dir, args.epochs, args.steps)
        history_mb = (run_dir / "history.jsonl").stat().st_size / 1e6
        print(
            f"history: {args.epochs} epochs x {args.steps} steps, 2 parameters, "
            f"{history_mb:.1f} MB written in {time.perf_counter() - start:.2f} s"
        )
        start = time.perf_counter()
        report = write_report(run_dir)
        render = time.perf_counter() - start
        print(f"report: {report.stat().st_size / 1e6:.2f} MB rendered in {render:.2f} s")
        loaded = browser_load_seconds(report)
        if loaded is None:
            print("browser load: skipped (no Chromium on PATH)")
        else:
            print(f"browser load (headless Chromium, navigation to load event): {loaded:.2f} s")
    finally:
        if not args.keep:
            shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
