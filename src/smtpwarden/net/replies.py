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
    access_denied: Reply
    client_connection_limit: Reply
    client_rate_limit: Reply
    tls_ready: Reply
    tls_active: Reply
    tls_in_transaction: Reply
    tls_required: Reply
    message_too_big: Reply
    auth_unavailable: Reply
    auth_encryption: Reply
    auth_already: Reply
    tls_after_auth: Reply
    ehlo_first: Reply
    need_mail: Reply
    need_rcpt: Reply
    no_valid_recipients: Reply
    data_after_bdat: Reply
    non_ascii_address: Reply
    non_ascii_command: Reply
    auth_mechanism: Reply
    auth_in_transaction: Reply
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
            # X.7.1: delivery not authorized; RFC 5321 3.1 allows 554 as
            # the greeting of a server that will not serve this client.
            access_denied=make_reply(554, "5.7.1", f"{hostname} Access denied"),
            client_connection_limit=make_reply(
                421, "4.7.0", f"{hostname} Too many connections from your address"
            ),
            client_rate_limit=make_reply(
                421, "4.7.0", f"{hostname} Too many connections from your address, slow down"
            ),
            # RFC 3207 4.
            tls_ready=make_reply(220, "2.0.0", "Ready to start TLS"),
            tls_active=make_reply(503, "5.5.1", "TLS already active"),
            tls_in_transaction=make_reply(503, "5.5.1", "STARTTLS not allowed in a transaction"),
            tls_required=make_reply(530, "5.7.0", "Must issue a STARTTLS command first"),
            # RFC 1870 6.2 (SIZE) and RFC 3463 X.3.4.
            message_too_big=make_reply(
                552, "5.3.4", "Message size exceeds fixed maximum message size"
            ),
            # RFC 4954 6: 503 for AUTH where it may not be used, 504 for an
            # unknown mechanism.
            auth_unavailable=make_reply(503, "5.5.1", "AUTH not available"),
            auth_mechanism=make_reply(504, "5.5.4", "Unrecognized authentication type"),
            auth_encryption=make_reply(
                538, "5.7.11", "Encryption required for requested authentication mechanism"
            ),
            auth_in_transaction=make_reply(503, "5.5.1", "AUTH not allowed in a transaction"),
            auth_already=make_reply(503, "5.5.1", "Already authenticated"),
            tls_after_auth=make_reply(503, "5.5.1", "STARTTLS not allowed after AUTH"),
            ehlo_first=make_reply(503, "5.5.1", "Send EHLO first"),
            # RFC 5321 3.3 and 4.1.4: RCPT needs a MAIL, DATA a RCPT (503,
            # or 554 once every RCPT was refused); RFC 3030 2: "If a DATA
            # statement is issued after a BDAT for the current transaction,
            # a 503 "Bad sequence of commands" MUST be issued."
            need_mail=make_reply(503, "5.5.1", "Error: need MAIL command"),
            need_rcpt=make_reply(503, "5.5.1", "Error: need RCPT command"),
            no_valid_recipients=make_reply(554, "5.5.1", "Error: no valid recipients"),
            data_after_bdat=make_reply(503, "5.5.1", "DATA not allowed after BDAT"),
            # RFC 6531 3.4 and 3.7.4.1: a UTF-8 mailbox needs the SMTPUTF8
            # parameter on MAIL; X.6.7: non-ASCII addresses not permitted.
            non_ascii_address=make_reply(
                553, "5.6.7", "Non-ASCII addresses need MAIL with SMTPUTF8"
            ),
            # RFC 5321 2.4: commands are US-ASCII unless SMTPUTF8 is offered.
            non_ascii_command=make_reply(500, "5.5.2", "Non-ASCII characters not allowed"),
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
