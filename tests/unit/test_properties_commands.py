"""Properties of command-line parsing (``protocol/commands.py``)."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import RemoteProtocolError
from smtpwarden.protocol.events import BadCommand, Bdat, Command, MailFrom, RcptTo, Verb
from strategies import (
    Param,
    any_case,
    blanks,
    bracketed_paths,
    domains,
    flip_case,
    mail_params,
    octets,
    rcpt_params,
    scaled,
)

VERBS = [verb.value.encode("ascii") for verb in Verb]

# Lines that reach every branch of the parser: a known verb (any case)
# followed by anything, or anything at all.
lines = st.one_of(
    octets(max_size=60),
    st.tuples(
        st.sampled_from(VERBS).flatmap(any_case),
        st.sampled_from([b"", b" ", b" FROM:", b" TO:", b" FROM:<", b" TO:<a@b> ", b" 5 LAST"]),
        octets(max_size=40),
    ).map(b"".join),
)

Shape = tuple[object, ...]


def shape(event: Command | BadCommand) -> Shape:
    """What a parse means, leaving out the exact bytes it came from."""
    if isinstance(event, BadCommand):
        return ("bad", event.verb, event.error.reply_bytes())
    return (
        type(event),
        event.verb,
        event.argument,
        getattr(event, "path", None),
        getattr(event, "params", None),
        getattr(event, "size", None),
        getattr(event, "last", None),
    )


@scaled(cap=10_000)
@given(lines)
def test_any_line_parses_to_an_event_and_never_raises(text: bytes) -> None:
    line = text + b"\r\n"
    event = parse_command(line)
    assert isinstance(event, Command | BadCommand)
    # The exact bytes are kept: the relay forwards them, never a rebuilt line.
    assert event.line == line
    if isinstance(event, BadCommand):
        assert isinstance(event.error, RemoteProtocolError)
        reply = event.error.reply_bytes()
        assert reply[:1] == b"5"
        assert reply.endswith(b"\r\n")
        assert reply.count(b"\n") == 1
    else:
        assert event.verb.value.encode("ascii") == text.split(b" ", 1)[0].upper()


@given(octets(max_size=60))
def test_lines_breaking_the_callers_precondition_do_not_raise_either(line: bytes) -> None:
    # parse_command is documented for CRLF-terminated lines, but no client
    # octets may ever make it raise.
    event = parse_command(line)
    assert isinstance(event, Command | BadCommand)


@scaled(cap=10_000)
@given(lines, st.data())
def test_the_case_of_the_verb_never_matters(text: bytes, data: st.DataObject) -> None:
    word, space, rest = text.partition(b" ")
    recased = data.draw(any_case(word), label="verb") + space + rest
    assert shape(parse_command(recased + b"\r\n")) == shape(parse_command(text + b"\r\n"))


class EnvelopeLine(NamedTuple):
    """A MAIL or RCPT line built from the grammar, in two spellings."""

    verb: Verb
    upper: bytes  # verb, FROM:/TO: and keywords in upper case
    cased: bytes  # the same line with those in any case
    path: bytes
    params: list[Param]


@st.composite
def envelope_lines(draw: st.DrawFn) -> EnvelopeLine:
    verb = draw(st.sampled_from([Verb.MAIL, Verb.RCPT]))
    if verb is Verb.MAIL:
        prefix = b"MAIL FROM:"
        path = draw(st.just(b"") | bracketed_paths())  # RFC 5321 4.5.5: the null path
        params = draw(st.lists(mail_params, max_size=4))
    else:
        prefix = b"RCPT TO:"
        path = draw(st.sampled_from([b"Postmaster", b"postmaster@example.org"]) | bracketed_paths())
        params = draw(st.lists(rcpt_params, max_size=4))
    # Brackets may be left out around a plain mailbox (many clients do);
    # the parser tolerates it.
    plain = bool(path) and not any(c in path for c in b" \t<>")
    bare = plain and draw(st.booleans())
    head = [prefix[:4], draw(st.sampled_from([b" ", b"  "])), prefix[5:]]
    upper = [*head, draw(st.sampled_from([b"", b" ", b"\t"])), path if bare else b"<" + path + b">"]
    cased = [draw(any_case(part)) for part in upper[:3]] + upper[3:]
    for keyword, value in params:
        blank = draw(blanks)
        tail = b"" if value is None else b"=" + value
        upper += [blank, keyword + tail]
        # Only the keyword: values such as ENVID's xtext are case-sensitive.
        cased += [blank, draw(any_case(keyword)) + tail]
    end = draw(st.sampled_from([b"", b" ", b"\t "]))
    return EnvelopeLine(verb, b"".join(upper) + end, b"".join(cased) + end, path, params)


@scaled(0.5, cap=3_000)
@given(envelope_lines())
def test_grammar_mail_and_rcpt_lines_round_trip_their_path_and_parameters(
    case: EnvelopeLine,
) -> None:
    event = parse_command(case.cased + b"\r\n")
    assert isinstance(event, MailFrom | RcptTo), event
    assert event.verb is case.verb
    assert isinstance(event, MailFrom) == (case.verb is Verb.MAIL)
    assert event.path == case.path
    # Keywords come back upper-cased, values exactly as sent, in order.
    assert event.params == tuple(case.params)


@scaled(0.5, cap=3_000)
@given(envelope_lines())
def test_verbs_and_keywords_are_case_insensitive(case: EnvelopeLine) -> None:
    upper = parse_command(case.upper + b"\r\n")
    cased = parse_command(case.cased + b"\r\n")
    assert isinstance(upper, MailFrom | RcptTo)
    assert isinstance(cased, MailFrom | RcptTo)
    assert (type(cased), cased.verb, cased.path, cased.params) == (
        type(upper),
        upper.verb,
        upper.path,
        upper.params,
    )


@scaled(cap=10_000)
@given(
    st.integers(0, 10**10 - 1),
    st.booleans(),
    st.lists(st.booleans(), max_size=24),
    st.integers(1, 10),
)
def test_bdat_lines_read_their_size_and_last_whatever_the_case(
    size: int, last: bool, flips: list[bool], width: int
) -> None:
    # RFC 3030 2: chunk-size = 1*DIGIT; leading zeros are digits too (the
    # parser's bound is ten of them).
    digits = b"%0*d" % (width, size)
    line = flip_case(b"BDAT " + digits + (b" LAST" if last else b""), flips)
    event = parse_command(line + b"\r\n")
    assert isinstance(event, Bdat)
    assert (event.size, event.last) == (size, last)
    # The canonical form the relay sends upstream reads back the same.
    again = parse_command(event.wire)
    assert isinstance(again, Bdat)
    assert (again.size, again.last, again.wire) == (size, last, event.wire)


@scaled(cap=10_000)
@given(domains.map(str.encode), st.sampled_from([b"HELO", b"EHLO"]).flatmap(any_case))
def test_helo_and_ehlo_keep_their_domain(domain: bytes, verb: bytes) -> None:
    event = parse_command(verb + b" " + domain + b"\r\n")
    assert isinstance(event, Command)
    assert event.verb.value.encode("ascii") == verb.upper()
    assert event.argument == domain
