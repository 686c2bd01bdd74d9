"""The shipped packaging: Dockerfile, systemd unit, Kubernetes manifests and the Helm chart.

Everything is checked offline: hadolint for the Dockerfile, systemd-analyze for the unit,
Kubernetes' own schemas (kubernetes-validate) for the manifests and the chart's rendered
output, and pgproxy itself for every config, probe path and port they use.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pgproxy.cli import build_parser
from pgproxy.config_file import load_settings

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
KUBERNETES = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "pgproxy"
RULES = ROOT / "deploy" / "prometheus" / "pgproxy-rules.yml"
KUBERNETES_VERSION = "1.29.0"  # the oldest with native sidecars, which the manifests use
HTTP_PATHS = {"/healthz", "/readyz", "/metrics"}  # pgproxy/services/http.py
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: no schema offline


# -- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    instructions = _dockerfile()
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG")
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # pinned
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) == 2 and "AS build" in stages[0]  # multi-stage
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and int(users[-1]) >= 1000  # numeric, non-root
    exposed = " ".join(rest for word, rest in instructions if word == "EXPOSE").split()
    assert exposed == ["6432", "9433"]
    assert [rest for word, rest in instructions if word == "STOPSIGNAL"] == ["SIGTERM"]
    healthcheck = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "http://127.0.0.1:9433/healthz" in healthcheck[0]
    entrypoint = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert entrypoint == ["pgproxy-entrypoint"]
    assert (ROOT / "deploy" / "container" / "entrypoint.sh").stat().st_mode & 0o111


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's CMD as an argument list."""
    rest = next(rest for word, rest in _dockerfile() if word == "HEALTHCHECK")
    command: list[str] = json.loads(rest.split(" CMD ", 1)[1])
    return command


def test_pinned_packages_are_the_tested_ones() -> None:
    pins = {}
    for line in (ROOT / "deploy" / "container" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for name, version in pins.items():
        assert metadata.version(name) == version, name
    required = metadata.requires("pgproxy") or []
    runtime = [re.split(r"[<>=\[; ]", requirement)[0].lower() for requirement in required
               if "extra ==" not in requirement]  # fmt: skip
    assert runtime and all(name in pins for name in runtime), (runtime, sorted(pins))


def test_the_build_has_the_runtime_dependencies() -> None:
    """mypyc type-checks the modules it compiles against the dependencies' types, so the
    build environment needs every runtime dependency (pyproject.toml's [build-system])."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = set(pyproject["build-system"]["requires"])
    assert set(pyproject["project"]["dependencies"]) <= build
    assert any(requirement.startswith("mypy==") for requirement in build)


# -- systemd ------------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / "pgproxy.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (Debian package systemd) is needed"
    text = (ROOT / "deploy" / "systemd" / "pgproxy.service").read_text()
    unit = tmp_path / "pgproxy.service"
    unit.write_text(text.replace("/opt/pgproxy/bin/pgproxy", str(BIN / "pgproxy")))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_unit_signals_and_hardening() -> None:
    unit = _unit()
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # RELOAD
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["all"]  # sd_notify
    assert unit["KillSignal"] == ["SIGTERM"]  # drain: exit once the clients have left
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""]
    for command in unit["ExecStartPre"] + unit["ExecStart"]:
        args = build_parser().parse_args(command.split()[1:])  # pgproxy accepts the flags
        assert args.config == "/etc/pgproxy/pgproxy.toml"


# -- Kubernetes ---------------------------------------------------------------------------------


def _documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


def _validate(documents: list[dict[str, Any]]) -> None:
    """Built-in kinds against Kubernetes' schemas (strict: no unknown fields)."""
    for document in documents:
        if document["kind"] in OPERATOR_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def _containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _check_pgproxy_wiring(documents: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """The config loads in pgproxy; probes and ports use what it serves. Its settings."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    (config_map,) = by_kind["ConfigMap"]
    config_path = tmp_path / "pgproxy.toml"
    config_path.write_text(config_map["data"]["pgproxy.toml"])
    settings = load_settings(str(config_path))
    assert settings.metrics_port > 0 and settings.metrics_addr in ("*", "0.0.0.0")
    (deployment,) = by_kind["Deployment"]
    (pgproxy,) = [c for c in _containers(deployment) if c["name"] == "pgproxy"]
    assert pgproxy["args"] == ["-c", "/etc/pgproxy/pgproxy.toml"]
    ports = {port["name"]: port["containerPort"] for port in pgproxy["ports"]}
    assert ports["metrics"] == settings.metrics_port
    if "postgresql" in ports:
        assert ports["postgresql"] == settings.listen_port
    probes = [pgproxy[name] for name in ("readinessProbe", "livenessProbe")]
    assert pgproxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pgproxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in probes:
        assert probe["httpGet"]["path"] in HTTP_PATHS and probe["httpGet"]["port"] == "metrics"
    mounts = {mount["mountPath"] for mount in pgproxy["volumeMounts"]}
    assert settings.auth_file is not None
    assert str(Path(settings.auth_file).parent) in mounts
    security = pgproxy["securityContext"]
    assert security["runAsUser"] >= 1000 and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    secret_keys = {key for secret in by_kind.get("Secret", []) for key in secret["stringData"]}
    assert Path(settings.auth_file).name in secret_keys
    for service in by_kind.get("Service", []):
        assert service["spec"]["selector"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        service_ports = {port["name"] for port in service["spec"]["ports"]}
        for monitor in by_kind.get("ServiceMonitor", []):
            assert monitor["spec"]["selector"]["matchLabels"].items() <= (
                service["metadata"]["labels"].items()
            )
            assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= (
                service_ports
            )
            assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    rules = yaml.safe_load(RULES.read_text())
    for rule in by_kind.get("PrometheusRule", []):
        assert rule["spec"]["groups"] == rules["groups"]
    return {"settings": settings, "deployment": deployment, "pgproxy": pgproxy}


def test_sidecar_manifests(tmp_path: Path) -> None:
    documents = [
        document
        for path in sorted((KUBERNETES / "sidecar").glob("*.yaml"))
        for document in _documents(path.read_text())
    ]
    _validate(documents)
    wired = _check_pgproxy_wiring(documents, tmp_path)
    settings = wired["settings"]
    spec = wired["deployment"]["spec"]["template"]["spec"]
    # A native sidecar: an init container that keeps running (started first, stopped last).
    assert wired["pgproxy"] in spec["initContainers"]
    assert wired["pgproxy"]["restartPolicy"] == "Always"
    assert settings.listen_addr == "127.0.0.1"
    (app,) = spec["containers"]
    dsn = next(e["value"] for e in app["env"] if e["name"] == "DATABASE_URL")
    assert f"@127.0.0.1:{settings.listen_port}/" in dsn
    assert dsn.rsplit("/", 1)[1] in settings.databases


def test_standalone_manifests(tmp_path: Path) -> None:
    documents = [
        document
        for path in sorted((KUBERNETES / "standalone").glob("*.yaml"))
        for document in _documents(path.read_text())
    ]
    assert {d["kind"] for d in documents} == {
        "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
        "ServiceMonitor", "PrometheusRule",
    }  # fmt: skip
    _validate(documents)
    wired = _check_pgproxy_wiring(documents, tmp_path)
    assert wired["pgproxy"]["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert wired["settings"].listen_addr == "*"


# -- Helm ---------------------------------------------------------------------------------------


def _helm(*args: str) -> str:
    helm = BIN / "helm"
    assert helm.exists(), "helm is installed by scripts/bootstrap.sh"
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_chart_lints() -> None:
    _helm("lint", "--strict", str(CHART))


def test_chart_keeps_the_shipped_rules() -> None:
    assert (CHART / "files" / "pgproxy-rules.yml").read_text() == RULES.read_text()


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ("standalone", ["--set", "serviceMonitor.enabled=true",
                        "--set", "prometheusRule.enabled=true"]),
        ("sidecar", ["--set", "mode=sidecar"]),
        ("tuned", ["--set", "config.default_pool_size=7", "--set", "config.query_timeout=2.5",
                   "--set", "config.admin_users={ops,dba}", "--set", "replicaCount=3"]),
    ],
)  # fmt: skip
def test_chart_renders_valid_manifests(tmp_path: Path, shape: str, options: list[str]) -> None:
    documents = _documents(_helm("template", "demo", str(CHART), *options))
    _validate(documents)
    wired = _check_pgproxy_wiring(documents, tmp_path)
    settings = wired["settings"]
    kinds = {document["kind"] for document in documents}
    if shape == "sidecar":
        assert kinds == {"ConfigMap", "Secret", "Deployment"}
        assert wired["pgproxy"]["restartPolicy"] == "Always"
        assert settings.listen_addr == "127.0.0.1"
    else:
        assert {"Service", "PodDisruptionBudget"} <= kinds
        assert settings.listen_addr == "*"
    if shape == "standalone":
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    if shape == "tuned":
        assert settings.default_pool_size == 7 and settings.query_timeout == 2.5
        assert settings.admin_users == ["ops", "dba"]
        assert wired["deployment"]["spec"]["replicas"] == 3
