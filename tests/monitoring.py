"""The monitoring of deploy/monitoring, as the tests read it: the Grafana dashboard's panels and
PromQL expressions, the Prometheus alert rules, their promtool unit tests, `promtool` itself, and
the metric names ecomsearch and Triton export.

- `dashboard_expressions(rate_interval)`: every (panel title, PromQL) of the dashboard, with
  Grafana's variables substituted, ready to send to a Prometheus.
- `alert_rules()` / `recording_rules()`: the rules of alerts.yaml, as parsed YAML dicts.
- `promtool_path()` / `run_promtool(...)`: Debian's `promtool` (package `prometheus`, which
  `.ci/run` installs when it is missing).
- `metric_names(expr)`: the metric names an expression selects, found offline.
- ECOMSEARCH_METRICS / TRITON_METRICS: the names the dashboard and the rules may use.

tests/unit/test_monitoring_rules.py checks the files offline (promtool); tests/integration/
test_operations.py evaluates every expression against a live Prometheus scraping live servers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ecomsearch.loadtest import dashboard
from ecomsearch.loadtest.dashboard import substitute_variables  # noqa: F401 (the tests use it from here)
from ecomsearch.serving.metrics import METRIC_NAMES
from tests.project import PROJECT_ROOT

MONITORING_DIR = PROJECT_ROOT / "deploy" / "monitoring"
DASHBOARD_PATH = MONITORING_DIR / "grafana-dashboard.json"
ALERTS_PATH = MONITORING_DIR / "alerts.yaml"
ALERT_TESTS_PATH = MONITORING_DIR / "alerts.test.yaml"

# The scrape job every expression selects.
JOB = "ecomsearch"

# ecomsearch's own metrics: the Python models' (pb_utils.MetricFamily; labels model, version,
# model_instance, plus their own) and the launcher's ops endpoint's (no model labels), as the
# code names them.
ECOMSEARCH_METRICS = METRIC_NAMES

# Triton 2.51's summaries (--metrics-config=summary_latencies=true): each is exported as
# `<name>{quantile=...}`, `<name>_count` and `<name>_sum`.
TRITON_SUMMARIES = frozenset(
    {
        "nv_inference_request_summary_us",
        "nv_inference_queue_summary_us",
        "nv_inference_compute_input_summary_us",
        "nv_inference_compute_infer_summary_us",
        "nv_inference_compute_output_summary_us",
    }
)
# Triton 2.51's metrics (labels model and version on the per-model ones; gpu_uuid on the GPU's).
TRITON_METRICS = frozenset(
    {
        # counters, per model
        "nv_inference_request_success",
        "nv_inference_request_failure",  # reason: OTHER, BACKEND, REJECTED, CANCELED
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        # gauges
        "nv_inference_pending_request_count",
        "nv_cpu_utilization",
        "nv_cpu_memory_used_bytes",
        "nv_cpu_memory_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
        "nv_pinned_memory_pool_total_bytes",
        # on GPUs only
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
    }
    | TRITON_SUMMARIES
    | {f"{name}{suffix}" for name in TRITON_SUMMARIES for suffix in ("_count", "_sum")}
)
# What Prometheus adds to every scrape.
PROMETHEUS_METRICS = frozenset({"up"})
KNOWN_METRICS = ECOMSEARCH_METRICS | TRITON_METRICS | PROMETHEUS_METRICS

# The search pipeline's steps, in order (the `search` ensemble).
SEARCH_STEPS = ("preprocess", "query_encoder", "retrieve", "ranker", "select")

# Grafana's variables the dashboard may use. `$datasource` only ever appears in datasource
# references, never in an expression.
DATASOURCE_VARIABLE = "datasource"

INSTALL_HINT = (
    "`promtool` was not found on PATH or in /usr/bin; `.ci/run` installs Debian's `prometheus` "
    "package, which brings it (apt-get install prometheus)"
)


class PromtoolNotInstalledError(RuntimeError):
    """promtool is not installed."""


# ------------------------------------------------------------------------------------ promtool


def promtool_path() -> str:
    """The promtool binary: on PATH, else /usr/bin/promtool; PromtoolNotInstalledError if none."""
    found = shutil.which("promtool")
    if found is None and Path("/usr/bin/promtool").is_file():
        found = "/usr/bin/promtool"
    if found is None:
        raise PromtoolNotInstalledError(INSTALL_HINT)
    return found


def run_promtool(*args: str | Path, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """`promtool ARGS...`, its output captured as text (stdout and stderr), never raising on a
    non-zero exit: check `.returncode` and show `.stdout + .stderr`."""
    return subprocess.run(
        [promtool_path(), *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def promtool_output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


# ----------------------------------------------------------------------------------- dashboard


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    return dashboard.load_dashboard(path)


def dashboard_panels(board: dict[str, Any] | None = None, rows: bool = False) -> list[dict]:
    """Every panel of the dashboard (the checked-in one by default), those inside collapsed rows
    too, in order; the rows themselves only when `rows`."""
    return dashboard.dashboard_panels(load_dashboard() if board is None else board, rows)


def dashboard_expressions(
    rate_interval: str = "1m", board: dict[str, Any] | None = None
) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel, with Grafana's
    variables substituted (ecomsearch.loadtest.dashboard, which the snapshot command uses)."""
    return dashboard.dashboard_expressions(
        load_dashboard() if board is None else board, rate_interval
    )


# ---------------------------------------------------------------------------------- the rules


def _rule_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups(path: Path = ALERTS_PATH) -> list[dict[str, Any]]:
    """The rule groups of a Prometheus rules file, as parsed YAML."""
    return _rule_file(path)["groups"]


def alert_rules(path: Path = ALERTS_PATH) -> list[dict[str, Any]]:
    """The alerting rules of every group, in order: dicts with `alert`, `expr`, `for`,
    `labels`, `annotations`."""
    return [rule for group in rule_groups(path) for rule in group["rules"] if "alert" in rule]


def recording_rules(path: Path = ALERTS_PATH) -> list[dict[str, Any]]:
    """The recording rules of every group, in order: dicts with `record` and `expr`."""
    return [rule for group in rule_groups(path) for rule in group["rules"] if "record" in rule]


def alert_tests(path: Path = ALERT_TESTS_PATH) -> dict[str, Any]:
    """The promtool unit-test file, as parsed YAML."""
    return _rule_file(path)


def alert_test_cases(path: Path = ALERT_TESTS_PATH) -> list[tuple[str, str, str, bool]]:
    """(test name, alert name, eval time, expects it firing) of every alert_rule_test."""
    return [
        (test.get("name", ""), case["alertname"], str(case["eval_time"]), bool(case["exp_alerts"]))
        for test in alert_tests(path)["tests"]
        for case in test.get("alert_rule_test", ())
    ]


def recording_rules_file(expressions: Sequence[tuple[str, str]], path: Path) -> list[str]:
    """Writes `expressions` ((name, PromQL) pairs) as the recording rules of one group, so that
    `promtool check rules path` parses every one offline; returns the rules' names, in order
    (promtool names a bad rule by its index)."""
    names = [
        f"check:expression_{i}:{re.sub(r'[^a-zA-Z0-9_]', '_', name)}"
        for i, (name, _) in enumerate(expressions)
    ]
    rules = [
        {"record": record, "expr": expr}
        for record, (_, expr) in zip(names, expressions, strict=True)
    ]
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return names


# ----------------------------------------------------------------------------- PromQL, offline

_STRING_OR_COMMENT = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)|(?P<comment>#[^\n]*)'
)
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_SELECTOR = re.compile(
    r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:])(?!\s*\()\s*(\{[^{}]*\})?"
)
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)


def _blank(match: re.Match) -> str:
    return " " * len(match.group(0))


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its label matchers as written or "" when none) of every series selector
    of `expr`, in order: `rate(foo{a="b"}[5m]) / bar` -> [("foo", '{a="b"}'), ("bar", "")].

    An offline approximation of Prometheus's parser, good for the expressions of this
    repository (promtool checks their syntax): comments, the insides of strings, range and
    subquery brackets and grouping clauses are blanked out, then every identifier that is
    neither a function call nor a keyword is a metric name. A selector by `{__name__=...}` alone
    is not seen."""

    # Comments go, the strings' insides become blanks: offsets stay those of `expr`.
    def strip(match: re.Match) -> str:
        if match.group("comment"):
            return _blank(match)
        string = match.group("string")
        return string[0] + " " * (len(string) - 2) + string[-1]

    text = _STRING_OR_COMMENT.sub(strip, expr)
    text = _GROUPING.sub(_blank, _RANGE.sub(_blank, text))
    found = []
    for match in _SELECTOR.finditer(text):
        name = match.group(1)
        if name.lower() in _KEYWORDS:
            continue
        matchers = expr[match.start(2) : match.end(2)] if match.group(2) else ""
        found.append((name, matchers))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (see `selectors`)."""
    return {name for name, _ in selectors(expr)}
