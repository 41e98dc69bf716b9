"""A local OpenAI-compatible server (`transformers serve`, shipped with `transformers[serving]`) for a
model directory, on 127.0.0.1: what the throughput benchmark and the server tests talk to, and a quick
way to try the `openai` backend without a GPU fleet."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def serving_missing() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing or not (Path(sys.executable).parent / "transformers").exists():
        return f"transformers serve needs {missing or 'the transformers CLI'}: pip install 'transformers[serving]'"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model_dir: Path, log_path: Path, ready_s: float = 180, extra_args: Sequence[str] = ()
) -> tuple[str, subprocess.Popen]:
    """Serves `model_dir` in its own process group; returns (base url, process) once /health answers.

    A directory, not a bare GGUF file: `transformers serve` cannot load a local GGUF path, which is why the
    embedded model is served from its converted copy (`resolve_llm`).
    """
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32", *extra_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"transformers serve not ready after {ready_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stops the server's whole process group: SIGTERM (or `sig`), then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
