"""deploy/monitoring, offline: the alert rules pass `promtool check rules` and their promtool
unit tests, every dashboard expression is PromQL promtool parses, and both use only the metrics
ecomsearch and Triton export, scoped to the `ecomsearch` job. tests/integration/
test_operations.py evaluates the same expressions against a live Prometheus."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import monitoring
from tests.monitoring import (
    ALERT_TESTS_PATH,
    ALERTS_PATH,
    JOB,
    KNOWN_METRICS,
    alert_rules,
    alert_test_cases,
    dashboard_expressions,
    dashboard_panels,
    load_dashboard,
    metric_names,
    promtool_output,
    recording_rules,
    run_promtool,
    selectors,
)

SEVERITIES = {"critical", "warning"}
RUNBOOK = "docs/operations.md#{anchor}"
MIN_SCHEMA_VERSION = 36


def recorded_names() -> set[str]:
    return {rule["record"] for rule in recording_rules()}


# ------------------------------------------------------------------------------------ promtool


def test_promtool_accepts_the_alert_rules() -> None:
    result = run_promtool("check", "rules", ALERTS_PATH)
    assert result.returncode == 0, promtool_output(result)


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", ALERT_TESTS_PATH)
    assert result.returncode == 0, promtool_output(result)


def test_every_dashboard_expression_parses_as_promql(tmp_path: Path) -> None:
    expressions = dashboard_expressions(rate_interval="1m")
    assert expressions, "the dashboard has no expression"
    path = tmp_path / "dashboard.rules.yaml"
    names = monitoring.recording_rules_file(expressions, path)
    result = run_promtool("check", "rules", path)
    listing = "\n".join(
        f"rule {i + 1} ({name}): {expr}"
        for i, (name, (_, expr)) in enumerate(zip(names, expressions, strict=True))
    )
    assert result.returncode == 0, f"{promtool_output(result)}\n{listing}"


def _neutralised(directory: Path, expr: str) -> Path:
    """A copy of the rules and their tests in `directory`, every alert's expression `expr`."""
    directory.mkdir()
    rules = yaml.safe_load(ALERTS_PATH.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["expr"] = expr
    (directory / ALERTS_PATH.name).write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS_PATH, directory / ALERT_TESTS_PATH.name)
    return directory / ALERT_TESTS_PATH.name


def test_the_unit_tests_fail_for_alerts_that_never_or_always_fire(tmp_path: Path) -> None:
    """Every alert's promtool cases depend on its expression: replaced by one that never fires,
    its firing case fails; by one that always fires, its not-firing cases fail."""
    never = _neutralised(tmp_path / "never", "vector(1) == 0")
    always = _neutralised(tmp_path / "always", "vector(1)")
    # Both at once: each run takes a couple of seconds.
    runs = {
        name: subprocess.Popen(
            [monitoring.promtool_path(), "test", "rules", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, path in (("never", never), ("always", always))
    }
    outputs = {name: process.communicate(timeout=120)[0] for name, process in runs.items()}
    # promtool reports each failed case as "alertname: X, time: T," then "exp:[]," when the
    # case expected nothing to fire, "exp:[" and the expected alerts otherwise.
    expected = {"never": r"exp:\[\n", "always": r"exp:\[\],"}
    alerts = {rule["alert"] for rule in alert_rules()}
    for name, process in runs.items():
        assert process.returncode != 0, f"{name}: promtool passed\n{outputs[name]}"
        failed = set(
            re.findall(rf"alertname: (\w+), time: [^\n]*\n\s*{expected[name]}", outputs[name])
        )
        assert not alerts - failed, (
            f"alerts whose promtool cases pass when they {name} fire: {sorted(alerts - failed)}"
        )


# --------------------------------------------------------------------------------- alert rules


def test_every_alert_has_for_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    assert len(rules) >= 6
    problems = []
    for rule in rules:
        name = rule["alert"]
        if not re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))):
            problems.append(f"{name}: no `for`")
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity is not one of {sorted(SEVERITIES)}")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            if not annotations.get(key, "").strip():
                problems.append(f"{name}: no {key}")
        if annotations.get("runbook") != RUNBOOK.format(anchor=name.lower()):
            problems.append(f"{name}: runbook is not {RUNBOOK.format(anchor=name.lower())}")
    assert not problems, "\n".join(problems)


def test_the_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    required = {
        "SearchLatencyHighP99",
        "QueueTimeGrowing",
        "SearchErrorRateHigh",
        "ModelNotReady",
        "ServerDown",
        "CatalogLagHigh",
    }
    assert required <= names, sorted(required - names)
    assert len(names) == len(alert_rules()), "two alerts share a name"


def test_every_alert_has_promtool_cases_where_it_fires_and_where_it_does_not() -> None:
    cases = alert_test_cases()
    fires = {alert for _, alert, _, firing in cases if firing}
    quiet = {alert for _, alert, _, firing in cases if not firing}
    names = {rule["alert"] for rule in alert_rules()}
    assert not names - fires, f"no case where these fire: {sorted(names - fires)}"
    assert not names - quiet, f"no case where these stay quiet: {sorted(names - quiet)}"
    assert {alert for _, alert, _, _ in cases} <= names, "a test names an alert that is not there"


def test_expected_alerts_carry_the_rules_labels_and_annotations() -> None:
    """promtool compares what the tests expect with what fires; this checks the tests expect
    the severity and the runbook each rule declares (a test cannot drift from its rule)."""
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    problems = []
    for test in monitoring.alert_tests()["tests"]:
        for case in test.get("alert_rule_test", ()):
            rule = by_name[case["alertname"]]
            for alert in case["exp_alerts"]:
                if alert["exp_labels"].get("severity") != rule["labels"]["severity"]:
                    problems.append(f"{test['name']}: severity")
                if alert["exp_annotations"].get("runbook") != rule["annotations"]["runbook"]:
                    problems.append(f"{test['name']}: runbook")
    assert not problems, problems


# ----------------------------------------------------------------------------------- dashboard


def test_the_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard.get("uid") and dashboard.get("title")
    assert dashboard["schemaVersion"] >= MIN_SCHEMA_VERSION
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables.get(monitoring.DATASOURCE_VARIABLE)
    assert datasource is not None, "no `datasource` template variable"
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"


def test_every_panel_queries_the_datasource_variable() -> None:
    reference = {"type": "prometheus", "uid": f"${{{monitoring.DATASOURCE_VARIABLE}}}"}
    problems = []
    for panel in dashboard_panels():
        title = panel.get("title", "?")
        if panel.get("datasource") != reference:
            problems.append(f"{title}: panel datasource {panel.get('datasource')}")
        targets = panel.get("targets", ())
        if not targets or not all(target.get("expr", "").strip() for target in targets):
            problems.append(f"{title}: a panel without a query")
        for target in targets:
            if target.get("datasource") != reference:
                problems.append(f"{title} {target.get('refId')}: {target.get('datasource')}")
        if len({target.get("refId") for target in targets}) != len(targets):
            problems.append(f"{title}: refIds repeat")
    assert not problems, "\n".join(problems)


def test_panel_ids_are_unique_and_titles_are_set() -> None:
    panels = dashboard_panels(rows=True)
    ids = [panel.get("id") for panel in panels]
    assert None not in ids
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    titles = [panel.get("title", "").strip() for panel in dashboard_panels()]
    assert all(titles)
    assert len(titles) == len(set(titles)), "two panels share a title"


def test_the_dashboard_covers_what_operators_look_for() -> None:
    titles = " / ".join(panel["title"] for panel in dashboard_panels()).lower()
    for needed in (
        "throughput",
        "latency",
        "by stage",
        "queue",
        "batch",
        "error",
        "rejections",
        "candidates",
        "empty",
        "index products",
        "index age",
        "lag",
        "delta",
        "ready",
        "cpu",
        "gpu",
        "memory",
    ):
        assert needed in titles, f"no panel about {needed!r}: {titles}"


def test_dashboard_rates_use_the_rate_interval() -> None:
    """Grafana's $__rate_interval is at least four scrape intervals, so a rate always has
    samples; a fixed window would be empty at a coarse step or scrape interval."""
    problems = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
                if window not in ("$__rate_interval", "${__rate_interval}"):
                    problems.append(f"{panel['title']}: [{window}]")
    assert not problems, problems


def test_dashboard_expressions_substitute_grafanas_variables() -> None:
    expressions = dashboard_expressions(rate_interval="15s")
    assert all("$" not in expr for _, expr in expressions)
    assert any("[15s]" in expr for _, expr in expressions)
    with pytest.raises(ValueError, match="instance"):
        monitoring.substitute_variables('up{instance=~"$instance"}')
    assert monitoring.substitute_variables("rate(x[${__rate_interval}])", "2m") == "rate(x[2m])"


# ------------------------------------------------------------------------------------- metrics


def test_metric_names_are_found_in_expressions() -> None:
    expr = """
        sum by (source) (rate(ecomsearch_candidates_total{job="ecomsearch", source=~"a|b"}[5m]))
        / ignoring (source) group_left  # a comment naming not_a_metric
        sum(rate(ecomsearch_queries_total{job="ecomsearch"}[$__rate_interval] offset 1h))
        and on (job) up == bool 1e6 or time() - record:name:rate5m > 0.5
        or label_replace(nv_cpu_utilization, "dst", "not_a_metric_either", "", "")
    """
    assert metric_names(expr) == {
        "ecomsearch_candidates_total",
        "ecomsearch_queries_total",
        "up",
        "record:name:rate5m",
        "nv_cpu_utilization",
    }
    assert selectors('rate(a{job="x", b="{c}"}[1m]) / b') == [
        ("a", '{job="x", b="{c}"}'),
        ("b", ""),
    ]


def every_expression() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and every rule."""
    expressions = [(f"panel {title}", expr) for title, expr in dashboard_expressions()]
    expressions += [
        (f"rule {rule.get('alert') or rule['record']}", rule["expr"])
        for group in monitoring.rule_groups()
        for rule in group["rules"]
    ]
    return expressions


def test_the_dashboard_and_the_alerts_use_only_metrics_ecomsearch_and_triton_export() -> None:
    recorded = recorded_names()
    expressions = every_expression()
    unknown = [
        f"{where}: {name}"
        for where, expr in expressions
        for name in sorted(metric_names(expr))
        if name not in KNOWN_METRICS and name not in recorded
    ]
    assert not unknown, "\n".join(unknown)


def test_every_selector_is_scoped_to_the_ecomsearch_job() -> None:
    """Another Triton deployment scraped by the same Prometheus must not trip ecomsearch's
    alerts or show on its dashboard: every raw series is selected with job="ecomsearch"."""
    recorded = recorded_names()
    expressions = every_expression()
    unscoped = [
        f"{where}: {name}{matchers}"
        for where, expr in expressions
        for name, matchers in selectors(expr)
        if name not in recorded and not re.search(rf'\bjob\s*=\s*"{JOB}"', matchers)
    ]
    assert not unscoped, "\n".join(unscoped)


def test_every_metric_ecomsearch_exports_is_on_the_dashboard() -> None:
    """A metric the code exports and no panel shows is one nobody reads."""
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    assert sorted(monitoring.ECOMSEARCH_METRICS - shown) == []


def test_the_alerts_read_every_recording_rule_they_define() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    recorded = [rule["record"] for rule in recording_rules()]
    assert len(recorded) == len(set(recorded)), "a recording rule is defined twice"
    assert set(recorded) <= used, f"unused recording rules: {sorted(set(recorded) - used)}"


def test_make_prometheus_rule_wraps_exactly_the_alert_rules() -> None:
    """The operator's PrometheusRule is made from alerts.yaml, not kept as a second copy."""
    from tests.project import PROJECT_ROOT

    rendered = subprocess.run(
        ["make", "-s", "prometheus-rule"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    resource = yaml.safe_load(rendered)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["metadata"]["name"] == "ecomsearch"
    assert resource["spec"]["groups"] == monitoring.rule_groups()


def test_every_alert_has_its_runbook_section_in_the_operations_guide() -> None:
    """The runbook link of each alert lands on a heading of docs/operations.md (GitHub's
    anchor: the heading lower-cased)."""
    from tests.project import PROJECT_ROOT

    guide = (PROJECT_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in guide.splitlines()
        if line.startswith("#")
    }
    missing = []
    for rule in monitoring.alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        if anchor not in anchors:
            missing.append(rule["alert"])
    assert not missing, f"no section in docs/operations.md for {missing}"
