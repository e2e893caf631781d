"""Cleaning a spool folder after a crash.

``clean_up`` applies the decisions that ``store.py`` justifies from the order
in which ``put`` renames its files: tmp/ is emptied, a message file without
its envelope is removed, and an envelope without its message, or one that
does not parse or whose message has the wrong size, goes to quarantine/ with
whatever belongs to it.

Rules kept here:
- Run only under the exclusive spool lock: a put under way in another
  process has exactly the half-pairs this code removes.
- Never delete an envelope: it may stand for a message that was answered
  250. Damaged entries are moved, message first, then envelope, so a crash
  in the middle leaves an envelope alone in queue/, which the next run
  quarantines too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from smtpwarden.spool import codec
from smtpwarden.spool.errors import CorruptEntry, NoSuchEntry, spool_error
from smtpwarden.spool.files import Layout, fsync_dir
from smtpwarden.spool.model import Entry, check_queue_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Cleanup:
    """What ``clean_up`` did."""

    temp_removed: int
    orphans_removed: int  # message files without an envelope
    quarantined: tuple[tuple[str, str], ...]  # (queue id, why) moved to quarantine/


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryReport:
    """What ``Spool.recover`` found.

    ``cleaned`` is False when other processes kept the spool open and the
    cleanup was skipped (the counts are then zero). ``resume`` holds the
    queued and deferred entries, oldest first.
    """

    cleaned: bool
    temp_removed: int
    orphans_removed: int
    quarantined: tuple[tuple[str, str], ...]  # (queue id, why)
    resume: tuple[Entry, ...]
    held: int
    dead: int

    def summary(self) -> str:
        """One line for the log: what recovery found."""
        found = (
            f"{len(self.resume)} to resume, {self.held} held, {self.dead} dead,"
            f" {len(self.quarantined)} quarantined"
        )
        if not self.cleaned:
            return found + " (no cleanup: another process has the spool open)"
        return found


def _split(name: str) -> tuple[str, str] | None:
    """``("ID", ".msg")`` for a spool file name; None for anything else."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("msg", "env"):
        return None
    try:
        check_queue_id(stem)
    except NoSuchEntry:
        return None
    return stem, "." + suffix


def _damage(layout: Layout, queue_id: str, has_message: bool) -> str | None:
    """Why a complete-looking pair cannot be used as it is, or None if it can."""
    if not has_message:
        return "envelope without message"
    try:
        entry = codec.decode(layout.envelope(queue_id).read_bytes(), queue_id)
    except CorruptEntry as error:
        return str(error)
    if layout.message(queue_id).stat().st_size != entry.size:
        return "message size differs from the envelope"
    return None


def clean_up(layout: Layout) -> Cleanup:
    """Empty tmp/, remove orphan messages, quarantine damaged entries.

    Files in queue/ whose names are not ``ID.msg`` or ``ID.env`` are left
    alone. Raises SpoolError if a folder cannot be read or a file moved.
    """
    try:
        temp_removed = 0
        for name in os.listdir(layout.tmp):
            (layout.tmp / name).unlink()
            temp_removed += 1
        if temp_removed:
            fsync_dir(layout.tmp)

        kinds: dict[str, set[str]] = {}
        for name in os.listdir(layout.queue):
            parts = _split(name)
            if parts is not None:
                kinds.setdefault(parts[0], set()).add(parts[1])

        orphans = 0
        quarantined: list[tuple[str, str]] = []
        for queue_id in sorted(kinds):
            found = kinds[queue_id]
            if ".env" not in found:
                # The envelope is renamed in last and removed first: a message
                # alone was never acknowledged, or was finished with.
                layout.message(queue_id).unlink()
                orphans += 1
            elif (why := _damage(layout, queue_id, ".msg" in found)) is not None:
                for suffix in (".msg", ".env"):
                    if suffix in found:
                        name = queue_id + suffix
                        os.rename(layout.queue / name, layout.quarantine / name)
                quarantined.append((queue_id, why))
        if quarantined:
            fsync_dir(layout.quarantine)
        if orphans or quarantined:
            fsync_dir(layout.queue)
    except OSError as error:
        raise spool_error("cannot recover the spool", error) from error
    return Cleanup(
        temp_removed=temp_removed, orphans_removed=orphans, quarantined=tuple(quarantined)
    )
