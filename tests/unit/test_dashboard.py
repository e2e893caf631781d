"""The Grafana dashboard in deploy/grafana queries only metrics the relay exposes.

Every PromQL expression may name only sample names the registry of
``RelayMetrics`` defines, and every family is shown by some panel, so
that renaming or adding a metric without the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpwarden.observe.metrics import RelayMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "smtpwarden-dashboard.json"
METRIC = re.compile(r"\bsmtpwarden_[a-zA-Z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[str]:
    found = [
        target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def test_every_expression_names_only_exposed_metrics(dashboard: dict[str, Any]) -> None:
    exposed = RelayMetrics().registry.sample_names()
    exprs = expressions(dashboard)
    assert exprs
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, expr
        assert names <= exposed, f"{sorted(names - exposed)} in {expr}"


def test_every_metric_family_has_a_panel(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    for family in RelayMetrics().registry.families:
        assert used & {family.name, *family.sample_names}, f"no panel shows {family.name}"


def test_panels_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
