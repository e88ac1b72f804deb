"""Shared test configuration: the Hypothesis profiles, and fresh afnio settings per test."""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import httpx2
import pytest
from hypothesis import HealthCheck, settings

import afnio
from afnio._settings import Settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def fresh_afnio_settings():
    """Every test starts from the default process-wide settings (no backward client, no gradient
    cap) and leaves the process as it found it."""
    saved = afnio.get_settings()
    defaults = Settings()
    afnio.set_settings(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(Settings)})
    yield
    afnio.set_settings(**{f.name: getattr(saved, f.name) for f in dataclasses.fields(Settings)})


LLAMA_SERVER_STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """A real ``llama_cpp.server`` serving the embedded SmolLM2 GGUF on a free local port (one
    per test session); yields its OpenAI-compatible base URL."""
    from afnio.models.local import default_model_path

    port = free_port()
    # A log file, not a pipe: nobody drains a pipe while the server runs, and a full pipe
    # would block the server.
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    log = open(log_path, "wb")  # closed in the finally below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            default_model_path(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--verbose",
            "false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + LLAMA_SERVER_STARTUP_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with {process.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                if httpx2.get(f"{base_url}/models", timeout=1.0).status_code == 200:
                    break
            except httpx2.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llama_cpp.server not ready after {LLAMA_SERVER_STARTUP_TIMEOUT}s"
                )
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


