"""The replies smtpwarden writes itself, built once per listener.

RFC 5321 4.2 codes with RFC 3463 enhanced codes. Closing replies (421) name
the host, as RFC 5321 4.2 shows for 421 "<domain> Service not available,
closing transmission channel".
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpwarden.protocol.replies import Reply, make_reply


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalReplies:
    """Every reply the relay may write on its own, for one host name."""

    too_many_connections: Reply
    shutting_down: Reply
    upstream_unavailable: Reply
    upstream_failed: Reply
    upstream_timeout: Reply
    client_timeout: Reply
    not_implemented: Reply
    chunking_not_offered: Reply
    too_many_recipients: Reply
    other_route: Reply
    taken_over: Reply
    contradicted: Reply
    too_many_errors: Reply

    @classmethod
    def for_host(cls, hostname: str) -> LocalReplies:
        """Build the set for ``hostname``."""
        return cls(
            # X.7.0: other security/policy status; the limit is a policy.
            too_many_connections=make_reply(
                421, "4.7.0", f"{hostname} Too many connections, try again later"
            ),
            # X.3.2: system not accepting network messages.
            shutting_down=make_reply(421, "4.3.2", f"{hostname} Service shutting down"),
            # X.4.1: no answer from host.
            upstream_unavailable=make_reply(
                421, "4.4.1", f"{hostname} Upstream server unavailable, try again later"
            ),
            # X.4.2: bad connection.
            upstream_failed=make_reply(
                421, "4.4.2", f"{hostname} Upstream connection failed, try again later"
            ),
            upstream_timeout=make_reply(421, "4.4.2", f"{hostname} Upstream server timed out"),
            client_timeout=make_reply(
                421, "4.4.2", f"{hostname} Timeout waiting for client, closing connection"
            ),
            # RFC 5321 4.2.4: 502 for a command recognised but not implemented.
            not_implemented=make_reply(502, "5.5.1", "Command not implemented"),
            chunking_not_offered=make_reply(502, "5.5.1", "CHUNKING not offered"),
            # RFC 5321 4.5.3.1.10: 452 for too many recipients; X.5.3.
            too_many_recipients=make_reply(452, "4.5.3", "Too many recipients"),
            # The same code, so that clients send the recipient again in a
            # later transaction, as for any recipient limit.
            other_route=make_reply(
                452, "4.5.3", "Too many recipients: send this one in another transaction"
            ),
            # X.1.5: destination address valid. The spool delivers to it
            # later; the message's end is answered only once it is spooled.
            taken_over=make_reply(250, "2.1.5", "Recipient ok, queued for later delivery"),
            # X.3.0: other mail system problem. The upstream's 250 said it
            # failed; the client keeps the message and tries again.
            contradicted=make_reply(
                451, "4.3.0", "Upstream answered 250 but reported a failure, try again later"
            ),
            too_many_errors=make_reply(
                421, "4.7.0", f"{hostname} Too many errors, closing connection"
            ),
        )
