"""Coverage-guided fuzzing of the protocol core and the spool codec with Atheris.

Usage (from the repository root, with the ``fuzz`` extra installed)::

    python tests/fuzz/fuzz_core.py TARGET [libFuzzer flags] [corpus dirs or files]
    python tests/fuzz/fuzz_core.py all --seconds 60 [--targets a,b] [--keep DIR]
    python tests/fuzz/fuzz_core.py minimize TARGET CRASH_FILE [-o OUT] [--seconds N]
    python tests/fuzz/fuzz_core.py list

The targets themselves live in ``targets.py`` (the registry) and the
``targets_*.py`` modules beside it, plain Python that the unit tests replay
without Atheris; this script only adds the fuzzing engine.

With no corpus directory given, the seeds of ``corpus/TARGET`` are copied to
a temporary directory and that one grows: the committed corpus is never
written to (a directory inside it is refused). Unless given, ``-dict``
(``dicts/TARGET.dict``), ``-timeout``, ``-max_len`` and ``-artifact_prefix``
(a temporary directory) get defaults.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
DICTS = HERE / "dicts"

# Per-target input size bound: room for the longest lines each parser must
# refuse (a 12 KiB AUTH line for the server, 2 KiB reply lines) without
# spending most runs on huge inputs.
MAX_LEN = {
    "server": 16384,
    "replies": 8192,
    "commands": 16384,
    "extensions": 8192,
    "proxy": 1024,
    "auth": 8192,
    "body": 8192,
    "codec": 8192,
}
DEFAULT_MAX_LEN = 4096
# A single input that takes this long (seconds) is reported as a hang.
TIMEOUT_S = 10
# The registry and the modules it imports the targets from: instrumented
# with smtpwarden's code, so that their comparisons guide the fuzzer too.
TARGET_MODULES = sorted(path.stem for path in HERE.glob("targets*.py"))


def load_targets(*, instrument: bool) -> ModuleType:
    """Import ``targets``; under Atheris, with smtpwarden's code instrumented."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if not instrument:
        return importlib.import_module("targets")
    import atheris  # type: ignore[import-untyped]

    # str comparisons give the fuzzer hints. (The RegEx hook is left out: it
    # fails on the bytes patterns the core is written with.)
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["smtpwarden", *TARGET_MODULES]):
        return importlib.import_module("targets")


def target_names() -> list[str]:
    return list(load_targets(instrument=False).TARGETS)


def _flag_given(args: Sequence[str], name: str) -> bool:
    return any(arg.startswith(f"-{name}=") for arg in args)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def seed_copy(target: str) -> Path:
    """A fresh temporary corpus directory holding the committed seeds of ``target``."""
    folder = Path(tempfile.mkdtemp(prefix=f"smtpwarden-fuzz-{target}-"))
    seeds = CORPUS / target
    if seeds.is_dir():
        for seed in sorted(seeds.iterdir()):
            if seed.is_file():
                shutil.copyfile(seed, folder / seed.name)
    return folder


def libfuzzer_args(target: str, args: list[str]) -> list[str]:
    """``args`` with the defaults added and a scratch corpus if none was given."""
    positional = [arg for arg in args if not arg.startswith("-")]
    for arg in positional:
        if Path(arg).is_dir() and _inside(Path(arg), CORPUS):
            raise SystemExit(
                f"{arg} is the committed corpus; libFuzzer would write into it. "
                "Give a copy, or no directory to fuzz from a temporary copy of the seeds."
            )
    out = list(args)
    if not _flag_given(args, "dict") and (DICTS / f"{target}.dict").is_file():
        out.append(f"-dict={DICTS / f'{target}.dict'}")
    if not _flag_given(args, "timeout"):
        out.append(f"-timeout={TIMEOUT_S}")
    if not _flag_given(args, "max_len"):
        out.append(f"-max_len={MAX_LEN.get(target, DEFAULT_MAX_LEN)}")
    if not _flag_given(args, "artifact_prefix"):
        artifacts = Path(tempfile.mkdtemp(prefix=f"smtpwarden-fuzz-{target}-artifacts-"))
        out.append(f"-artifact_prefix={artifacts}/")
    if not positional:
        out.append(str(seed_copy(target)))
    return out


def fuzz(target: str, args: list[str]) -> None:
    """Run libFuzzer on one target; does not return."""
    module = load_targets(instrument=True)
    functions: dict[str, Callable[[bytes], None]] = module.TARGETS
    if target not in functions:
        raise SystemExit(f"unknown target {target!r}; targets: {', '.join(functions)}")
    import atheris

    argv = [sys.argv[0], *libfuzzer_args(target, args)]
    print("libFuzzer arguments:", " ".join(argv[1:]), file=sys.stderr, flush=True)
    atheris.Setup(argv, functions[target])
    atheris.Fuzz()


# ---------------------------------------------------------------------------
# all: every target in turn, each in its own process, for a fixed time
# ---------------------------------------------------------------------------

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_DONE = re.compile(r"^Done (\d+) runs in", re.M)
_EXCEPTION = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception|Broken|Exit)\b.*)$", re.M)
# Below this many seconds left, a target is not restarted after a crash.
_MIN_RESTART_S = 3


@dataclass
class Result:
    target: str
    executions: int = 0
    cov: int | None = None
    features: int | None = None
    corpus: int | None = None
    crashes: int = 0
    runs: int = 0
    artifacts: list[str] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _parse_run(log: str, result: Result) -> None:
    executed = _EXECUTED.findall(log)
    if executed:
        result.executions += int(executed[-1])
    else:
        done = _DONE.findall(log)
        status = _STATUS.findall(log)
        if done:
            result.executions += int(done[-1])
        elif status:
            result.executions += int(status[-1][0])
    status = _STATUS.findall(log)
    if status:
        _, cov, features, corpus = status[-1]
        result.cov, result.features, result.corpus = int(cov), int(features), int(corpus)


def _signature(log: str) -> str:
    """A one-line description of why a run stopped."""
    if "ERROR: libFuzzer: timeout" in log:
        return "timeout (hang)"
    if "out-of-memory" in log:
        return "out of memory"
    found = _EXCEPTION.findall(log.split("Uncaught Python exception", 1)[-1])
    return found[0].strip() if found else "crash (see log)"


def run_all(seconds: int, names: list[str], keep: Path | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="smtpwarden-fuzz-all-"))
    results: list[Result] = []
    for name in names:
        result = Result(name)
        results.append(result)
        corpus = seed_copy(name)
        artifacts = work / name
        artifacts.mkdir()
        started = time.monotonic()
        while True:
            left = int(seconds - (time.monotonic() - started))
            if left < (1 if result.runs == 0 else _MIN_RESTART_S):
                break
            result.runs += 1
            log_path = work / f"{name}-{result.runs}.log"
            before = set(artifacts.iterdir())
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                name,
                f"-max_total_time={left}",
                f"-artifact_prefix={artifacts}/",
                "-print_final_stats=1",
                str(corpus),
            ]
            print(f"[{name}] run {result.runs}: {left}s", file=sys.stderr, flush=True)
            with log_path.open("w") as log_file:
                code = subprocess.run(
                    command, stdout=log_file, stderr=subprocess.STDOUT, check=False
                ).returncode
            log = log_path.read_text(errors="replace")
            _parse_run(log, result)
            new = sorted(set(artifacts.iterdir()) - before)
            if code == 0 and not new:
                break
            result.crashes += 1
            result.artifacts += [str(path) for path in new] or [f"(no artifact; see {log_path})"]
            result.signatures.append(_signature(log))
        result.seconds = time.monotonic() - started
        if keep is not None:
            shutil.copytree(corpus, keep / name, dirs_exist_ok=True)
        shutil.rmtree(corpus, ignore_errors=True)
    print_table(results, seconds)
    print(f"\nlogs and artifacts: {work}")
    return 1 if any(result.crashes for result in results) else 0


def print_table(results: list[Result], seconds: int) -> None:
    header = (
        "target",
        "seconds",
        "executions",
        "exec/s",
        "cov",
        "ft",
        "corpus",
        "crashes",
        "distinct",
    )
    rows = [header]
    for r in results:
        rate = r.executions / r.seconds if r.seconds else 0.0
        rows.append(
            (
                r.target,
                f"{r.seconds:.0f}",
                str(r.executions),
                f"{rate:.0f}",
                "-" if r.cov is None else str(r.cov),
                "-" if r.features is None else str(r.features),
                "-" if r.corpus is None else str(r.corpus),
                str(r.crashes),
                str(len(set(r.signatures))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"\nfuzz run: {seconds}s per target")
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    # Each distinct failure once, with how often it came back after a restart.
    for r in results:
        first: dict[str, str] = {}
        for artifact, signature in zip(r.artifacts, r.signatures, strict=True):
            first.setdefault(signature, artifact)
        for signature, artifact in first.items():
            times = r.signatures.count(signature)
            print(f"\n{r.target}: {signature} ({times}x)\n    first input: {artifact}")


# ---------------------------------------------------------------------------
# minimize: shrink a crashing input while it fails the same way
# ---------------------------------------------------------------------------


def failure(function: Callable[[bytes], None], data: bytes) -> str | None:
    """How ``function`` fails on ``data``: exception type and where; None if it passes."""
    try:
        function(data)
    except Exception as error:  # any exception is the finding
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name != "check"]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return f"{type(error).__name__} at {where}"
    return None


def minimize(function: Callable[[bytes], None], data: bytes, budget_s: float) -> bytes:
    """Delta debugging (ddmin) over octets, then lowering each octet toward 0."""
    wanted = failure(function, data)
    if wanted is None:
        raise SystemExit("the input does not fail")
    deadline = time.monotonic() + budget_s

    def still_fails(candidate: bytes) -> bool:
        return failure(function, candidate) == wanted

    parts = 2
    while len(data) >= 2 and time.monotonic() < deadline:
        size = -(-len(data) // parts)
        for start in range(0, len(data), size):
            candidate = data[:start] + data[start + size :]
            if still_fails(candidate):
                data = candidate
                parts = max(parts - 1, 2)
                break
        else:
            if parts >= len(data):
                break
            parts = min(parts * 2, len(data))
    for index in range(len(data)):
        for value in (0, ord("a"), ord(" ")):
            if time.monotonic() >= deadline or data[index] <= value:
                continue
            candidate = data[:index] + bytes([value]) + data[index + 1 :]
            if still_fails(candidate):
                data = candidate
                break
    return data


def run_minimize(target: str, crash: Path, out: Path | None, budget_s: float) -> int:
    functions = load_targets(instrument=False).TARGETS
    function = functions[target]
    data = crash.read_bytes()
    small = minimize(function, data, budget_s)
    print(f"{len(data)} -> {len(small)} octets: {failure(function, small)}")
    print(repr(small))
    if out is not None:
        out.write_bytes(small)
        print(f"written to {out}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        print("targets:", ", ".join(target_names()))
        return 0
    command = argv[1]
    if command == "list":
        print("\n".join(target_names()))
        return 0
    if command == "all":
        parser = argparse.ArgumentParser(prog="fuzz_core.py all")
        parser.add_argument("--seconds", type=int, default=60, help="per target")
        parser.add_argument("--targets", default="", help="comma-separated; default: all")
        parser.add_argument("--keep", type=Path, help="copy each grown corpus here")
        options = parser.parse_args(argv[2:])
        names = options.targets.split(",") if options.targets else target_names()
        return run_all(options.seconds, names, options.keep)
    if command == "minimize":
        parser = argparse.ArgumentParser(prog="fuzz_core.py minimize")
        parser.add_argument("target")
        parser.add_argument("crash", type=Path)
        parser.add_argument("-o", "--output", type=Path)
        parser.add_argument("--seconds", type=float, default=60.0)
        options = parser.parse_args(argv[2:])
        return run_minimize(options.target, options.crash, options.output, options.seconds)
    fuzz(command, argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
