"""Fuzz targets over the sans-I/O core, as plain functions of one input.

Each target takes the fuzzer's bytes and returns normally when the code under
test behaved: it accepted the input, or refused it with the exception its
module documents for bad peer input (``RemoteProtocolError`` and its
subclasses, ``ProxyProtocolError``, the spool's ``CorruptEntry``). Anything
else escapes and is a crash: another exception, or ``InvariantBroken`` when a
property the module promises does not hold.

``fuzz_core.py`` hands these functions to Atheris; the unit test
``test_fuzz_regressions.py`` replays the seeds and saved crashes through them
without it. Nothing here imports Atheris.

Several targets read a few leading octets as settings (where to cut the
stream, which limits to use, how the shell answers); the layout of each is in
its docstring and in README.md.

This module is the registry. The targets live beside it, in modules that
import each other by name (``tests/fuzz`` must be on ``sys.path``):

- ``targets_common``: ``InvariantBroken``, ``check`` and the shared helpers;
- ``targets_client``: the client's stream, ``server`` and ``body``;
- ``targets_lines``: ``replies``, ``commands`` and ``extensions``;
- ``targets_session``: ``proxy``, ``auth`` and ``codec``.
"""

from __future__ import annotations

from collections.abc import Callable

from targets_client import fuzz_body, fuzz_server
from targets_lines import fuzz_commands, fuzz_extensions, fuzz_replies
from targets_session import fuzz_auth, fuzz_codec, fuzz_proxy

Target = Callable[[bytes], None]

TARGETS: dict[str, Target] = {
    "server": fuzz_server,
    "replies": fuzz_replies,
    "commands": fuzz_commands,
    "extensions": fuzz_extensions,
    "proxy": fuzz_proxy,
    "auth": fuzz_auth,
    "body": fuzz_body,
    "codec": fuzz_codec,
}
