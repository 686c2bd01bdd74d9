"""The shipped Prometheus rules and Grafana dashboard (deploy/) stay valid and only use
metric names that pgproxy exports.

promtool validates and unit-tests the rules (scripts/bootstrap.sh installs it); the rest
reads the files. The allow-list below is the metrics contract (docs/operations.md, "Metrics,
health and leaks"): renaming a metric means updating it, the rules and the dashboard together.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "pgproxy-rules.yml"
RULE_TESTS = PROMETHEUS / "pgproxy-rules.test.yml"
SCRAPE_EXAMPLE = PROMETHEUS / "scrape-example.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pgproxy-dashboard.json"

_GAUGES = {
    "pgproxy_up",
    "pgproxy_info",
    "pgproxy_build_info",
    "pgproxy_shutting_down",
    "pgproxy_client_connections",
    "pgproxy_max_client_conn",
    "pgproxy_database_client_connections",
    "pgproxy_database_max_client_connections",
    "pgproxy_user_client_connections",
    "pgproxy_user_max_client_connections",
    "pgproxy_pool_clients",
    "pgproxy_pool_servers",
    "pgproxy_pool_size",
    "pgproxy_pool_min_size",
    "pgproxy_pool_max_size",
    "pgproxy_pool_oldest_wait_seconds",
    "pgproxy_pool_paused",
    "pgproxy_query_wait_timeout_seconds",
    "pgproxy_host_up",
    "pgproxy_host_role",
    "pgproxy_replica_lag_seconds",
    # prometheus-client's ProcessCollector (Linux)
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}
_COUNTERS = {
    "process_cpu_seconds_total",
    "pgproxy_transactions_total",
    "pgproxy_queries_total",
    "pgproxy_received_bytes_total",
    "pgproxy_sent_bytes_total",
    "pgproxy_server_assignments_total",
    "pgproxy_client_logins_total",
    "pgproxy_client_login_failures_total",
    "pgproxy_server_connect_attempts_total",
    "pgproxy_server_connect_errors_total",
    "pgproxy_servers_lost_total",
    "pgproxy_servers_returned_broken_total",
    "pgproxy_reconnect_failed_total",
    "pgproxy_timeouts_total",
    "pgproxy_leaks_total",
    "pgproxy_session_state_leaks_total",
    "pgproxy_failovers_total",
}
_HISTOGRAMS = {
    "pgproxy_client_wait_seconds",
    "pgproxy_server_connect_seconds",
    "pgproxy_query_duration_seconds",
    "pgproxy_transaction_duration_seconds",
}
#: Every series name the rules and the dashboard may read, besides their recording rules.
EXPORTED = (
    _GAUGES
    | _COUNTERS
    | {f"{name}{suffix}" for name in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}  # Prometheus's own, per scrape target
)

ALERTS = {
    "PgproxyClientConnectionsNearLimit",
    "PgproxyPoolUtilizationHigh",
    "PgproxyPoolNoIdleServers",
    "PgproxyClientsWaiting",
    "PgproxyWaitP99NearTimeout",
    "PgproxyTimeouts",
    "PgproxyLeakDetected",
    "PgproxySessionStateLeak",
    "PgproxyServerConnectErrors",
    "PgproxyHostDown",
    "PgproxyFailover",
    "PgproxyDown",
}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables ($__rate_interval, ...)
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in names if name.lower() not in _KEYWORDS}


def grafana_query_names(query: str) -> set[str]:
    """metric_names for a Grafana Prometheus query, variable queries included."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    if match:
        return metric_names(match.group(1))
    match = re.fullmatch(r"\s*(?:label_values\(\s*\w+\s*\)|label_names\(\))\s*", query)
    if match:
        return set()
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return metric_names(match.group(1) if match else query)


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{le="+Inf", x=~"$y"}'
        "[$__rate_interval]))) / on (instance) group_left b:c:d offset 5m > bool 1e3"
        " unless absent(up{job='pgproxy'})"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "up"}
    assert grafana_query_names('label_values(m{i=~"$i"}, database)') == {"m"}
    assert grafana_query_names("label_values(database)") == set()


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: scripts/bootstrap.sh installs it "
            "(Debian package prometheus)",
            pytrace=False,
        )
    return path


def _run(*args: str) -> None:
    result = subprocess.run(
        [_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_check_rules() -> None:
    _run("check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_test_rules() -> None:
    _run("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_promtool_check_scrape_example() -> None:
    _run("check", "config", str(SCRAPE_EXAMPLE.relative_to(ROOT)))


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [group["name"] for group in groups] == ["pgproxy_recording", "pgproxy_alerts"]
    return [rule for group in groups for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def test_rules_use_only_exported_metrics() -> None:
    known = EXPORTED | _recorded()
    for rule in _rules():
        name = rule.get("record") or rule["alert"]
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{name} reads unknown series {sorted(unknown)}"


def test_alerts_have_severity_and_annotations() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == ALERTS
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, rule["alert"]
        assert all(text.strip() for text in annotations.values()), rule["alert"]
    down = next(rule for rule in alerts if rule["alert"] == "PgproxyDown")
    assert 'up{job="pgproxy"} == 0' in down["expr"]
    assert 'absent(pgproxy_up{job="pgproxy"})' in down["expr"]


def _tiers() -> set[tuple[str, str]]:
    """(alert, severity) of every alerting rule: an alert may have a warning and a
    critical rule."""
    return {(rule["alert"], rule["labels"]["severity"]) for rule in _rules() if "alert" in rule}


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(
        float(number) * units[unit] for number, unit in re.findall(r"(\d+)([smh])", duration)
    )


def test_alert_tiers() -> None:
    """Nothing pages on a single scrape, and an alert's warning comes before its critical
    rule: for each alert with both, the critical rule has the higher threshold or waits at
    least as long."""
    alerts = [rule for rule in _rules() if "alert" in rule]
    for rule in alerts:
        if rule["labels"]["severity"] == "critical":
            assert _seconds(rule.get("for", "0s")) >= 60, rule["alert"]
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for rule in alerts:
        tiers = by_name.setdefault(rule["alert"], {})
        assert rule["labels"]["severity"] not in tiers, f"two {rule['alert']} rules alike"
        tiers[rule["labels"]["severity"]] = rule
    tiered = {name for name, tiers in by_name.items() if len(tiers) == 2}
    assert {"PgproxyTimeouts", "PgproxyLeakDetected", "PgproxyClientConnectionsNearLimit"} <= tiered
    for name in tiered:
        warning, critical = by_name[name]["warning"], by_name[name]["critical"]
        assert warning["labels"]["tier"] == critical["labels"]["tier"], name
        assert warning["annotations"]["runbook"] == critical["annotations"]["runbook"], name
        threshold = [float(rule["expr"].rsplit(">", 1)[1]) for rule in (warning, critical)]
        assert threshold[0] < threshold[1], name


def test_rule_tests_fire_and_hold_every_alert() -> None:
    """Each alert, in each of its tiers, has a case where it fires and one where it must
    stay silent; the recording rules have at least one value check."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tiers = _tiers()
    fired: set[tuple[str, str]] = set()
    silent: set[tuple[str, str]] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            firing = {
                (name, alert["exp_labels"]["severity"]) for alert in check.get("exp_alerts", [])
            }
            fired |= firing
            silent |= {tier for tier in tiers if tier[0] == name} - firing
    assert {name for name, _ in tiers} == ALERTS
    assert fired == tiers, sorted(tiers - fired)
    assert silent == tiers, sorted(tiers - silent)
    checked = {
        name
        for case in tests
        for check in case.get("promql_expr_test", [])
        for name in metric_names(check["expr"])
    }
    assert checked & _recorded()


def _section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + following.start()] if following else text[start:]


def test_readmes_document_every_metric_and_alert() -> None:
    """docs/operations.md's metrics section (for the hosts' metrics,
    docs/high-availability.md) names every exported series (the contract
    above), and deploy/prometheus/README.md every alert."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    metrics = _section(operations, "## Metrics, health and leaks")
    metrics += (ROOT / "docs" / "high-availability.md").read_text()  # the metrics per host
    missing = sorted(name for name in _GAUGES | _COUNTERS | _HISTOGRAMS if name not in metrics)
    assert not missing, f"not in docs/operations.md's metrics section: {missing}"
    rules_readme = (PROMETHEUS / "README.md").read_text()
    # (Recorded names may be shortened there to "…:metric:window" after their level.)
    names = ALERTS | {name.split(":", 1)[1] for name in _recorded()}
    missing = sorted(name for name in names if name not in rules_readme)
    assert not missing, f"not in deploy/prometheus/README.md: {missing}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("instance", "database", "user"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}", name
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(
        list(_panels(dashboard["panels"]))
    )
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_leads_with_the_saturation_triad(dashboard: dict[str, Any]) -> None:
    """Utilization, waiting clients and wait p99 come first, full width, stacked on one
    time axis."""
    panels = sorted(
        (p for p in dashboard["panels"] if p["type"] != "row"),
        key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]),
    )
    triad = panels[:3]
    assert all(p["gridPos"]["x"] == 0 and p["gridPos"]["w"] == 24 for p in triad)
    exprs = [" ".join(t["expr"] for t in p["targets"]) for p in triad]
    assert "instance_database_user:pgproxy_pool_utilization:ratio" in exprs[0]
    assert 'pgproxy_pool_clients{state="waiting"' in exprs[1]
    assert "instance_database_user:pgproxy_client_wait_seconds:p99_5m" in exprs[2]
    assert dashboard["graphTooltip"] >= 1  # shared crosshair across panels


def test_dashboard_shows_login_failures_and_client_caps(dashboard: dict[str, Any]) -> None:
    """An incident's questions "why do logins fail?" and "are clients near a cap?" each
    have a panel."""
    panels = [
        " ".join(target["expr"] for target in panel.get("targets", []))
        for panel in _panels(dashboard["panels"])
    ]
    assert any(
        "pgproxy_client_login_failures_total" in exprs and "reason" in exprs for exprs in panels
    )
    for count, limit in (
        ("pgproxy_client_connections", "pgproxy_max_client_conn"),
        ("pgproxy_database_client_connections", "pgproxy_database_max_client_connections"),
        ("pgproxy_user_client_connections", "pgproxy_user_max_client_connections"),
    ):
        assert any(count in exprs and limit in exprs for exprs in panels), count


def test_dashboard_shows_session_state_leaks_by_kind(dashboard: dict[str, Any]) -> None:
    """transaction_state_guard's counter has a panel, split by kind."""
    panels = [
        " ".join(target["expr"] for target in panel.get("targets", []))
        for panel in _panels(dashboard["panels"])
    ]
    assert any("pgproxy_session_state_leaks_total" in exprs and "kind" in exprs for exprs in panels)


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every panel query is valid PromQL once Grafana's variables are filled in: promtool
    parses them as recording rules."""
    exprs = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    values = {"$__rate_interval": "1m", "$instance": ".*", "$database": ".*", "$user": ".*"}
    rules = []
    for i, expr in enumerate(exprs):
        for name, value in values.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run("check", "rules", str(path))


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    known = EXPORTED | _recorded()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            unknown = grafana_query_names(target["expr"]) - known
            assert not unknown, f"panel {panel['title']!r} reads unknown {sorted(unknown)}"
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            unknown = grafana_query_names(query) - known
            assert not unknown, f"variable {var['name']} reads unknown {sorted(unknown)}"
