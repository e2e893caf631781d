"""Replays the fuzzing seeds and saved crashes through the fuzz targets.

The targets are plain functions, listed in tests/fuzz/targets.py (the
fuzzer only wires them to Atheris), so every input that once found a
problem, and every seed, stays a regression test without the fuzzer
installed. See tests/fuzz/README.md for how a crash file gets here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from smtpwarden.spool.codec import decode
from smtpwarden.spool.errors import CorruptEntry

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
CORPUS = FUZZ / "corpus"
CRASHES = FUZZ / "crashes"


def _load_targets() -> ModuleType:
    """Import the registry ``targets`` as fuzz_core.py does.

    Its modules (``targets_*.py``) import each other by name, so the fuzz
    directory goes on ``sys.path``.
    """
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module("targets")


TARGETS: dict[str, Callable[[bytes], None]] = _load_targets().TARGETS


def _target_of(crash: Path) -> str:
    """A crash file is named TARGET-short-name.bin."""
    return crash.name.split("-", 1)[0]


SEEDS = sorted(path for path in CORPUS.glob("*/*") if path.is_file())
SAVED = sorted(CRASHES.glob("*.bin"))


def test_every_target_has_seeds() -> None:
    for name in TARGETS:
        assert any(path.parent.name == name for path in SEEDS), name
    assert {path.parent.name for path in SEEDS} <= set(TARGETS)


def test_every_crash_file_names_a_target() -> None:
    for crash in SAVED:
        assert _target_of(crash) in TARGETS, crash.name


@pytest.mark.parametrize("seed", SEEDS, ids=[f"{path.parent.name}/{path.name}" for path in SEEDS])
def test_seed_replays(seed: Path) -> None:
    TARGETS[seed.parent.name](seed.read_bytes())


def test_saved_crashes_replay() -> None:
    """Every saved crash must now pass its target: its bug is fixed."""
    failures = []
    for crash in SAVED:
        try:
            TARGETS[_target_of(crash)](crash.read_bytes())
        except Exception as error:  # report every file, not just the first
            failures.append(f"{crash.name}: {type(error).__name__}: {error}")
    assert not failures, failures


def test_spool_decode_refuses_non_ascii_base64_as_corrupt() -> None:
    """An envelope line {"base64": "<non-ASCII>"} must be CorruptEntry.

    codec.decode promises CorruptEntry for any damaged file, and recovery
    and the queue scans catch only that. ``base64.b64decode`` raises a plain
    ValueError (not binascii.Error) for a str holding a non-ASCII character,
    which the decoder once let through.
    """
    crash = CRASHES / "codec-base64-non-ascii.bin"
    with pytest.raises(CorruptEntry):
        decode(crash.read_bytes(), "20250102T030405.123456-1a2b3c4d")
    TARGETS["codec"](crash.read_bytes())
