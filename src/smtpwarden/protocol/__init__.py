"""The sans-I/O SMTP core: bytes in, events and bytes out.

Nothing in this package performs I/O, reads a clock or imports asyncio, socket,
ssl or logging; time and limits are passed in by the caller. A test parses the
imports of every module here and fails on a forbidden one.
"""
