"""`ecomsearch loadtest`: the Locust test, headless, with CSV and HTML reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(
    url: str, users: int, spawn_rate: float, duration: str, out_dir: Path, web: bool
) -> list[str]:
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f", str(LOCUSTFILE),
        "--host", url,
        "--users", str(users),
        "--spawn-rate", str(spawn_rate),
    ]  # fmt: skip
    if web:
        return command
    return [
        *command,
        "--headless",
        "--run-time", duration,
        "--stop-timeout", "10",
        "--csv", str(out_dir / "locust"),
        "--html", str(out_dir / "locust.html"),
        "--only-summary",
    ]  # fmt: skip


def run_loadtest(
    url: str,
    users: int,
    spawn_rate: float,
    duration: str,
    out_dir: Path,
    queries: Path | None = None,
    web: bool = False,
    timeout_s: float | None = None,
    scenario: str = "search",
) -> int:
    """Runs locustfile.py's `scenario`: "search" (searches back to back) or "shopper"
    (searches, recommendations and recorded views; the write key, if the server has one, from
    $ECOMSEARCH_WRITE_KEY)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["ECOMSEARCH_SCENARIO"] = scenario
    env["ECOMSEARCH_LATENCY_FILE"] = str(out_dir / "precise_latency.json")
    if queries is not None:
        env["ECOMSEARCH_QUERIES"] = str(queries.resolve())
    command = locust_command(url, users, spawn_rate, duration, out_dir, web)
    completed = subprocess.run(command, env=env, timeout=timeout_s, check=False)
    return completed.returncode
