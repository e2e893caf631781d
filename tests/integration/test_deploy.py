"""deploy/: every file checked by the tool that knows its format.

- The Dockerfiles with hadolint.
- The Kubernetes base and example overlay built with kustomize
  (``kubectl kustomize``) and validated with kubernetes-validate against
  ``KUBERNETES_VERSION`` (strict: unknown fields fail); the
  ServiceMonitor, a Prometheus Operator resource that has no schema there,
  is checked against the Service it must select.
- The systemd unit with ``systemd-analyze verify`` and its sandboxing with
  ``systemd-analyze security`` (exposure at most ``MAX_EXPOSURE``).
- Every smtpwarden configuration under deploy/ with ``check-config``, and
  the compose project's Postfix main.cf with ``postconf``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.external_tools import require_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.31"  # the oldest minor release still maintained upstream
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (locked down) to 10 (exposed)
DOCKERFILES = [DEPLOY / "container" / "Dockerfile", DEPLOY / "compose" / "postfix" / "Dockerfile"]
KUSTOMIZATIONS = [DEPLOY / "kubernetes" / "base", DEPLOY / "kubernetes" / "overlays" / "example"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    checked = run(require_tool("hadolint"), str(dockerfile))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    assert "\nUSER 10025:10025\n" in text
    assert "HEALTHCHECK" in text
    assert "/healthz" in text
    assert 'VOLUME ["/var/lib/smtpwarden"]' in text


def build(kustomization: Path) -> list[dict[str, Any]]:
    built = run(require_tool("kubectl"), "kustomize", str(kustomization))
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_kubernetes_manifests_validate(kustomization: Path, tmp_path: Path) -> None:
    resources = build(kustomization)
    kinds = sorted(resource["kind"] for resource in resources)
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]
    core = [resource for resource in resources if resource["kind"] != "ServiceMonitor"]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    validator = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).with_name("kubernetes-validate")
    )
    checked = run(validator, "--strict", "-k", KUBERNETES_VERSION, str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("passed for resource") == len(core), checked.stdout


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_the_service_monitor_scrapes_the_metrics_port(kustomization: Path) -> None:
    resources = build(kustomization)
    (monitor,) = (r for r in resources if r["kind"] == "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        r
        for r in resources
        if r["kind"] == "Service" and wanted.items() <= r["metadata"].get("labels", {}).items()
    ]
    assert len(selected) == 1, wanted
    ports = {port["name"] for port in selected[0]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= ports


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_the_pods_drain_before_they_are_killed(kustomization: Path, tmp_path: Path) -> None:
    resources = build(kustomization)
    (statefulset,) = (r for r in resources if r["kind"] == "StatefulSet")
    (config_map,) = (r for r in resources if r["kind"] == "ConfigMap")
    pod = statefulset["spec"]["template"]["spec"]
    config = yaml.safe_load(config_map["data"]["smtpwarden.yaml"])
    # The preStop pause, SIGTERM, shutdown.grace for sessions in a
    # transaction, then the kubelet's SIGKILL: the grace must end first.
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + config["shutdown"]["grace"] + 10 <= pod["terminationGracePeriodSeconds"]
    # The disruption budget covers these very pods.
    (budget,) = (r for r in resources if r["kind"] == "PodDisruptionBudget")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Probes and the ServiceMonitor reach the HTTP endpoint on the pod's address.
    assert config["http"]["host"] == "0.0.0.0"  # noqa: S104 - the pod's own address
    assert {"name": "http", "containerPort": config["http"]["port"]} in container["ports"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Each replica's spool is on its own volume.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert config["spool"]["path"].startswith(mounts[claim["metadata"]["name"]] + "/")
    checked = tmp_path / "smtpwarden.yaml"
    checked.write_text(config_map["data"]["smtpwarden.yaml"])
    check_config(checked)


def check_config(path: Path) -> None:
    result = run(sys.executable, "-m", "smtpwarden", "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "path",
    sorted(DEPLOY.glob("*/smtpwarden.yaml"))
    + sorted(DEPLOY.glob("kubernetes/*/*/smtpwarden.yaml")),
    ids=lambda path: str(path.relative_to(DEPLOY)),
)
def test_every_configuration_under_deploy_is_valid(path: Path) -> None:
    check_config(path)


def test_the_compose_project_hangs_together() -> None:
    folder = DEPLOY / "compose"
    project = yaml.safe_load((folder / "compose.yaml").read_text())
    services = project["services"]
    assert set(services) == {"smtpwarden", "postfix", "prometheus", "grafana"}
    # Every file it mounts or builds from exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (folder / source).exists(), source
    build_spec = services["smtpwarden"]["build"]
    assert (folder / build_spec["context"] / build_spec["dockerfile"]).is_file()
    # smtpwarden relays to the postfix service and is scraped by Prometheus.
    config = yaml.safe_load((folder / "smtpwarden.yaml").read_text())
    assert config["upstreams"][0]["host"] == "postfix"
    scrape = yaml.safe_load((folder / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"smtpwarden:{config['http']['port']}"]
    stop = int(services["smtpwarden"]["stop_grace_period"].rstrip("s"))
    assert config["shutdown"]["grace"] < stop


def test_the_compose_postfix_configuration_parses(tmp_path: Path) -> None:
    postconf = require_tool("postconf")
    folder = DEPLOY / "compose" / "postfix"
    for name in ("main.cf", "any-domain"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "master.cf").write_text("")
    parsed = run(postconf, "-c", str(tmp_path), "-n")
    assert parsed.returncode == 0, parsed.stderr
    assert "warning" not in parsed.stderr, parsed.stderr
    assert "smtpd_authorized_xclient_hosts" in parsed.stdout


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The systemd unit, its ExecStart pointing at this installation's smtpwarden."""
    program = shutil.which("smtpwarden") or str(Path(sys.executable).with_name("smtpwarden"))
    text = (DEPLOY / "systemd" / "smtpwarden.service").read_text()
    path = tmp_path / "smtpwarden.service"
    path.write_text(text.replace("/usr/local/bin/smtpwarden", program))
    return path


def test_the_systemd_unit_verifies(unit: Path) -> None:
    checked = run(require_tool("systemd-analyze"), "verify", str(unit))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == "", checked.stderr


def test_the_systemd_unit_is_sandboxed(unit: Path) -> None:
    checked = run(
        require_tool("systemd-analyze"),
        "security",
        "--offline=yes",
        f"--threshold={MAX_EXPOSURE * 10:.0f}",
        str(unit),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
