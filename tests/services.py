"""Real services for the tests that run them: each in its own process group, always stopped, its log
kept for the failure message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} (tail) ---\n{text[-n:]}"


@contextmanager
def service(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a service in its own process group; always stop it (SIGTERM, then SIGKILL after a grace period)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group: the webserver/daemon spawn code servers
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also reaps code servers left behind by a clean exit
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace_s)


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs()}")


LOCATION = "fineinstructions_assets.definitions"  # a python_module location is named after its module
LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename } }
    }
  }
}
"""


# "Re-execute" in the UI: ALL_STEPS, or FROM_FAILURE for a failed run.
REEXECUTE = """
mutation($parentRunId: String!, $strategy: ReexecutionStrategy!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: $strategy}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    body = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
    assert "errors" not in body, body
    return body["data"]


def location_loaded(url: str, procs: list[subprocess.Popen[bytes]], logs: Callable[[], str]) -> bool:
    """The webserver answers and has loaded the project's code location (a load error fails the test)."""
    for p in procs:
        if p.poll() is not None:
            pytest.fail(f"{p.args[0]} exited early with code {p.returncode}\n{logs()}")
    try:
        if requests.get(f"{url}/server_info", timeout=5).status_code != 200:
            return False
        reply = requests.post(f"{url}/graphql", json={"query": LOCATION_QUERY}, timeout=10)
        body: dict[str, Any] = reply.json()
    except (requests.RequestException, ValueError):
        return False
    entries = ((body.get("data") or {}).get("workspaceOrError") or {}).get("locationEntries") or []
    for e in entries:
        if e["name"] == LOCATION and e["loadStatus"] == "LOADED":
            kind = e["locationOrLoadError"]["__typename"]
            if kind != "RepositoryLocation":
                pytest.fail(f"code location failed to load ({kind})\n{logs()}")
            return True
    return False
