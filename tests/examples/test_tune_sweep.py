"""examples/tune_sweep.py runs as a script on the local Ray cluster and finds what the Trainer
finds for each config, run here without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from afnio.trainer.tune import run_trial

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tune_sweep.py"


def load_example():
    """Import ``examples/tune_sweep.py`` (examples are scripts, not a package)."""
    name = "afnio_example_tune_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_sweep_example_runs_on_the_local_cluster(ray_cluster, tmp_path) -> None:
    """The example, as a script, joining the session's cluster: four trials, two epochs each,
    the same scores as the Trainer gives each config here, and the best prompt recovered."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", address, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    trials = outcome["trials"]
    assert sorted((t["config"]["optimizer"], t["config"]["momentum"]) for t in trials) == [
        ("tgd", 0), ("tgd", 2), ("tgd-examples", 0), ("tgd-examples", 2)]
    example = load_example()
    for number, trial in enumerate(trials):
        assert len(trial["val_scores"]) == 2
        reports: list[dict] = []
        run_trial(example.build, {**trial["config"], "max_epochs": 2},
                  run_dir=tmp_path / str(number),
                  report=lambda metrics, directory, kept=reports: kept.append(metrics))
        assert trial["val_scores"] == [m["val_score"] for m in reports]
    best = outcome["best"]
    top = max(max(t["val_scores"]) for t in trials)
    assert best["val_score"] == best["rescored"] == top
    assert best["epoch"] == min(t["val_scores"].index(top) for t in trials
                                if top in t["val_scores"])
    rules = example.RULE.findall(best["prompt"])
    assert best["prompt"].startswith(example.INITIAL_PROMPT) and rules
    assert all(example.TEAMS[keyword] == team for keyword, team in rules)
