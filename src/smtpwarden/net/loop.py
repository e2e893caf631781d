"""Choosing the event loop: uvloop when installed, plain asyncio otherwise."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Literal

LoopChoice = Literal["auto", "uvloop", "asyncio"]


class LoopUnavailable(RuntimeError):
    """uvloop was asked for explicitly but is not installed."""


def loop_factory(choice: LoopChoice) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """Return a factory for the chosen loop and the loop's name.

    "auto" takes uvloop when it imports and asyncio otherwise. Raises
    ``LoopUnavailable`` for "uvloop" when uvloop is missing.
    """
    if choice != "asyncio" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.new_event_loop, "uvloop"
    if choice == "uvloop":
        raise LoopUnavailable("event_loop is uvloop but uvloop is not installed")
    return asyncio.new_event_loop, "asyncio"
