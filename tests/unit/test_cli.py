"""Tests for smtpwarden.cli: exit codes, messages, and what each command runs.

The network modules are replaced by recording stand-ins, so no test starts a
relay or a sink.
"""

from __future__ import annotations

import runpy
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smtpwarden import __version__
from smtpwarden.cli import main
from smtpwarden.config import Config, ConfigError, default_config, load_config, simple_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")


@dataclass
class Recorder:
    """Stands in for run_relay / run_sink and remembers its calls."""

    result: int = 0
    error: Exception | None = None
    relay_calls: list[Config] = field(default_factory=list)
    loads: list[Callable[[], Config] | None] = field(default_factory=list)
    sink_calls: list[dict[str, object]] = field(default_factory=list)

    def run_relay(self, config: Config, *, load: Callable[[], Config] | None = None) -> int:
        self.relay_calls.append(config)
        self.loads.append(load)
        if self.error is not None:
            raise self.error
        return self.result

    def run_sink(self, **kwargs: object) -> int:
        self.sink_calls.append(kwargs)
        return self.result


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    server = types.ModuleType("smtpwarden.net.server")
    server.run_relay = recorder.run_relay  # type: ignore[attr-defined]
    sink = types.ModuleType("smtpwarden.net.sink")
    sink.run_sink = recorder.run_sink  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "smtpwarden.net.server", server)
    monkeypatch.setitem(sys.modules, "smtpwarden.net.sink", sink)
    return recorder


# --- check-config --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "summary"),
    [
        pytest.param("quickstart.yaml", "ok (1 listener, 1 upstream)", id="quickstart"),
        pytest.param("smtpwarden.yaml", "ok (2 listeners, 2 upstreams)", id="full"),
    ],
)
def test_check_config_ok(name: str, summary: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(CONFIGS / name)
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: {summary}\n"
    assert err == ""


def test_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: [{prot: 25}]\nupstreams: []\n", encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: 3 problems",
        '  listeners[0].prot: unknown key (did you mean "port"?)',
        "  listeners[0].port: missing required key (an integer 0-65535)",
        "  upstreams: expected a list of at least one upstream, got an empty list",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(None, "cannot read the file", id="missing"),
        pytest.param("a: [1\n", "invalid YAML", id="syntax"),
        pytest.param("hostname: 2024-02-30\n", "invalid YAML value: day is out", id="date"),
        pytest.param("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply", id="deep"),
    ],
)
def test_check_config_unloadable(
    tmp_path: Path, text: str | None, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relay.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: 1 problem\n")
    assert expected in err


# --- run ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["run", "--config", QUICKSTART, "--listen", "127.0.0.1:25"],
            "--config cannot be combined with --listen or --upstream",
            id="config-and-listen",
        ),
        pytest.param(
            ["run", "--config", QUICKSTART, "--upstream", "mta:25"],
            "--config cannot be combined with --listen or --upstream",
            id="config-and-upstream",
        ),
        pytest.param(
            ["run", "--listen", "127.0.0.1:25"],
            "--listen and --upstream must be given together",
            id="listen-alone",
        ),
        pytest.param(
            ["run", "--upstream", "mta:25"],
            "--listen and --upstream must be given together",
            id="upstream-alone",
        ),
        pytest.param(
            ["run", "--event-loop", "trio"],
            "argument --event-loop: invalid choice: 'trio'",
            id="bad-event-loop",
        ),
        pytest.param(["run", "extra"], "unrecognized arguments: extra", id="extra-argument"),
        pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
        pytest.param(["relay"], "argument COMMAND: invalid choice: 'relay'", id="bad-command"),
    ],
)
def test_usage_errors(
    argv: list[str], message: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: smtpwarden")
    assert f"error: {message}" in err
    assert recorder.relay_calls == []


def test_run_subcommand_error_shows_its_own_usage(
    recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--listen", "127.0.0.1:25"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: smtpwarden run ")
    assert "smtpwarden run: error:" in err


def test_run_bad_addresses(recorder: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--listen", "localhost", "--upstream", "mta:99999"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "<cli>: 2 problems",
        '  --listen: expected HOST:PORT, got "localhost"',
        '  --upstream: expected a port 1-65535 after ":", got "mta:99999"',
    ]
    assert recorder.relay_calls == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["run"], default_config(), id="default"),
        pytest.param(["run", "--config", QUICKSTART], load_config(QUICKSTART), id="config-file"),
        pytest.param(
            ["run", "--listen", "[::1]:2525", "--upstream", "mta.example.com:25"],
            simple_config(listen="[::1]:2525", upstream="mta.example.com:25"),
            id="listen-upstream",
        ),
        pytest.param(
            ["run", "--listen", "127.0.0.1:0", "--upstream", "sink:./out"],
            simple_config(listen="127.0.0.1:0", upstream="sink:./out"),
            id="listen-sink",
        ),
    ],
)
def test_run_passes_config(argv: list[str], expected: Config, recorder: Recorder) -> None:
    assert main(argv) == 0
    assert recorder.relay_calls == [expected]


@pytest.mark.parametrize("event_loop", ["auto", "uvloop", "asyncio"])
def test_run_event_loop_override(event_loop: str, recorder: Recorder) -> None:
    assert main(["run", "--config", QUICKSTART, "--event-loop", event_loop]) == 0
    (config,) = recorder.relay_calls
    assert config.event_loop == event_loop


def test_sighup_reads_the_same_file_with_the_same_options(
    recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("listeners: [{port: 2525}]\nupstreams: [{kind: sink}]\n", encoding="utf-8")
    assert main(["run", "--config", str(path), "--event-loop", "asyncio"]) == 0
    (load,) = recorder.loads
    assert load is not None
    path.write_text(
        "event_loop: uvloop\nhostname: again.test\nlisteners: [{port: 2525}]\n"
        "upstreams: [{kind: sink}]\n",
        encoding="utf-8",
    )
    again = load()
    assert again.hostname == "again.test"
    assert again.event_loop == "asyncio"  # the command line's, as at start
    path.write_text("listeners: [\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load()


@pytest.mark.parametrize(
    "argv", [["run"], ["run", "--listen", "127.0.0.1:0", "--upstream", "sink:./out"]]
)
def test_without_a_file_sighup_has_nothing_to_read(argv: list[str], recorder: Recorder) -> None:
    assert main(argv) == 0
    assert recorder.loads == [None]


def test_run_returns_relay_exit_code(recorder: Recorder) -> None:
    recorder.result = 1
    assert main(["run"]) == 1


def test_run_os_error_exits_1(recorder: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    recorder.error = OSError(98, "Address already in use")
    assert main(["run"]) == 1
    assert capsys.readouterr().err == "smtpwarden: [Errno 98] Address already in use\n"


# --- sink ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            ["sink"],
            {"host": "127.0.0.1", "port": 2526, "folder": "./mail", "event_loop": "auto"},
            id="defaults",
        ),
        pytest.param(
            ["sink", "--listen", "[::1]:0", "--dir", "captured", "--event-loop", "asyncio"],
            {"host": "::1", "port": 0, "folder": "captured", "event_loop": "asyncio"},
            id="options",
        ),
    ],
)
def test_sink_arguments(argv: list[str], expected: dict[str, object], recorder: Recorder) -> None:
    assert main(argv) == 0
    assert recorder.sink_calls == [expected]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        pytest.param(
            ["sink", "--listen", "2526"], '--listen: expected HOST:PORT, got "2526"', id="listen"
        ),
        pytest.param(["sink", "--dir", ""], '--dir: expected a folder path, got ""', id="dir"),
    ],
)
def test_sink_bad_arguments(
    argv: list[str], problem: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == ["<cli>: 1 problem", f"  {problem}"]
    assert recorder.sink_calls == []


# --- help, version, python -m ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        pytest.param(["--help"], "usage: smtpwarden [-h]", id="main"),
        pytest.param(["run", "--help"], "usage: smtpwarden run ", id="run"),
        pytest.param(["check-config", "-h"], "usage: smtpwarden check-config ", id="check"),
        pytest.param(["sink", "--help"], "usage: smtpwarden sink ", id="sink"),
    ],
)
def test_help(argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)
    assert "examples:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"smtpwarden {__version__}\n"


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["smtpwarden", "check-config", QUICKSTART])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("smtpwarden", run_name="__main__")
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"{QUICKSTART}: ok (1 listener, 1 upstream)\n"
