"""Which route a recipient's transaction follows."""

from __future__ import annotations

import pytest

from smtpwarden.net.routing import Route, RouteTable, domain_of

MAIN = Route(name="main", policy="passthrough", targets=())
EXACT = Route(name="exact", policy="retry", targets=())
PARENT = Route(name="parent", policy="requeue", targets=())
DEEPER = Route(name="deeper", policy="passthrough", targets=())


@pytest.mark.parametrize(
    ("path", "domain"),
    [
        (b"user@Example.NET", "example.net"),
        (b"user@example.net.", "example.net"),
        (b"postmaster", ""),
        (b"", ""),
        (b"@relay.test,@hop.test:user@Dest.test", "dest.test"),
        (b'"odd@local"@example.org', "example.org"),
        ("usér@bücher.example".encode(), "bücher.example"),
    ],
)
def test_domain_of(path: bytes, domain: str) -> None:
    assert domain_of(path) == domain


def table() -> RouteTable:
    return RouteTable(
        MAIN,
        [
            (EXACT, ("example.net",)),
            (PARENT, (".example.net", ".partner.test")),
            (DEEPER, (".eu.partner.test",)),
        ],
    )


@pytest.mark.parametrize(
    ("path", "route"),
    [
        (b"a@example.net", EXACT),
        (b"a@EXAMPLE.net", EXACT),
        (b"a@mx.example.net", PARENT),
        (b"a@a.b.example.net", PARENT),
        (b"a@partner.test", MAIN),  # a leading dot is for subdomains only
        (b"a@x.partner.test", PARENT),
        (b"a@x.eu.partner.test", DEEPER),  # the most specific entry wins
        (b"a@eu.partner.test", PARENT),
        (b"a@example.org", MAIN),
        (b"a@notexample.net", MAIN),
        (b"postmaster", MAIN),
    ],
)
def test_the_most_specific_domain_entry_chooses(path: bytes, route: Route) -> None:
    assert table().for_recipient(path) is route


def test_a_table_without_domain_routes_always_gives_the_listener_route() -> None:
    routes = RouteTable(MAIN)
    assert not routes.by_domain
    assert not routes.guarded
    assert routes.for_recipient(b"a@example.net") is MAIN


def test_guarded_when_any_route_holds_messages() -> None:
    assert table().guarded
    assert RouteTable(EXACT).guarded
    assert not RouteTable(MAIN, [(DEEPER, ("x.test",))]).guarded
