"""Run the fault suite and print the README's reliability table from what it recorded.

    .venv/bin/python scripts/reliability_report.py [pytest args...]

Each fault test appends one row (the fault tried, what the platform did) to the file named by
FI_FAULT_REPORT; only tests that passed are in the table, and a failed test fails this script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    report = Path(tempfile.mkdtemp()) / "faults.jsonl"
    env = os.environ | {"FI_FAULT_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fault", *argv]
    rc = subprocess.call(cmd, env=env)
    rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    print("| fault or bad input tried | what happens |")
    print("|---|---|")
    for row in rows:
        print(f"| {row['fault']} | {row['outcome']} |")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
