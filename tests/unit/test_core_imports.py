"""The protocol core stays sans-I/O: no forbidden module is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smtpwarden.protocol

FORBIDDEN = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "logging",
    "time",
    "threading",
    "subprocess",
    "uvloop",
    "os",
    "io",
}
CORE = Path(smtpwarden.protocol.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_modules_import_nothing_forbidden() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top == "smtpwarden":
                assert name.startswith("smtpwarden.protocol"), f"{path.name} imports {name}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom socket import socket\n", encoding="utf-8")
    assert {"asyncio", "socket"} <= imported_modules(bad)


# Which project packages each part may import (STYLE.md: dependencies point
# one way). The core is checked above, module by module.
ALLOWED = {
    "config": {"smtpwarden.configcheck"},
    "configcheck": set(),
    "configdelivery": {"smtpwarden.configcheck"},
    "configendpoints": {
        "smtpwarden.configcheck",
        "smtpwarden.configtls",
        "smtpwarden.configtranscripts",
    },
    "configobserve": {"smtpwarden.configcheck"},
    "configroutes": {"smtpwarden.configcheck"},
    "configtls": {"smtpwarden.configcheck"},
    "configtranscripts": {"smtpwarden.configcheck", "smtpwarden.configtls"},
    "observe": {"smtpwarden.protocol"},
    "spool": {"smtpwarden.protocol"},
}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_dependencies_point_one_way(part: str) -> None:
    root = CORE.parent
    files = sorted((root / part).glob("*.py")) if (root / part).is_dir() else [root / f"{part}.py"]
    assert files
    for path in files:
        for name in imported_modules(path):
            if name.startswith("smtpwarden."):
                allowed = ALLOWED[part] | {f"smtpwarden.{part}"}
                assert any(name.startswith(prefix) for prefix in allowed), (
                    f"{path.name} imports {name}"
                )
