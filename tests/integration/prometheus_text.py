"""Reading the Prometheus text format (0.0.4) back, strictly, for the tests.

``parse`` checks what a scraper relies on and fails with AssertionError
otherwise: every family announced by one HELP and one TYPE line before its
samples, sample names that belong to their family (``_bucket``, ``_sum``
and ``_count`` for a histogram), label values with only the three escapes
the format knows, values Go's ParseFloat reads, a final line feed, and
histogram buckets that are cumulative and end with ``le="+Inf"`` equal to
``_count``. ``get`` and ``total`` read series back. ``scrape`` fetches an
endpoint with ``http.client``.
"""

from __future__ import annotations

import http.client
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KINDS = ("counter", "gauge", "histogram", "summary", "untyped")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
HTTP_TIMEOUT_S = 10.0

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _labels(text: str, at: int) -> tuple[Labels, int]:
    """Parse ``{name="value",...}`` from ``text[at]`` ("{"); return labels and the end."""
    assert text[at] == "{"
    at += 1
    labels: list[tuple[str, str]] = []
    while text[at] != "}":
        found = _LABEL.match(text, at)
        assert found is not None, f"bad label name at {text[at:]!r}"
        at = found.end()
        assert text[at : at + 2] == '="', f'expected =" at {text[at:]!r}'
        at += 2
        value: list[str] = []
        while text[at] != '"':
            char = text[at]
            assert char != "\n", "raw line feed in a label value"
            if char == "\\":
                escaped = text[at + 1]
                assert escaped in _ESCAPES, f"unknown escape \\{escaped}"
                value.append(_ESCAPES[escaped])
                at += 2
            else:
                value.append(char)
                at += 1
        labels.append((found.group(), "".join(value)))
        at += 1
        if text[at] == ",":
            at += 1
    names = [name for name, _ in labels]
    assert len(set(names)) == len(names), f"repeated label in {text!r}"
    return tuple(labels), at + 1


def _number(text: str) -> float:
    assert _VALUE.fullmatch(text), f"not a value: {text!r}"
    return float(text.replace("Inf", "inf").replace("NaN", "nan"))


def _help(text: str) -> str:
    out: list[str] = []
    at = 0
    while at < len(text):
        if text[at] == "\\":
            assert text[at + 1] in ("\\", "n"), f"unknown escape in HELP: {text!r}"
            out.append("\\" if text[at + 1] == "\\" else "\n")
            at += 2
        else:
            out.append(text[at])
            at += 1
    return "".join(out)


def _belongs(sample: str, family: Family) -> bool:
    if family.kind == "histogram":
        return sample in (f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count")
    return sample == family.name


def parse(body: bytes) -> dict[str, Family]:
    """The families of an exposition, checked as the module docstring says."""
    text = body.decode("utf-8")
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, rest = line[7:].partition(" ")
            assert name not in helps, f"second HELP for {name}"
            helps[name] = _help(rest)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert _NAME.fullmatch(name), name
            assert kind in KINDS, kind
            assert name not in families, f"second TYPE for {name}"
            assert name in helps, f"TYPE before HELP for {name}"
            current = families[name] = Family(name, kind, helps[name])
        elif line.startswith("#") or not line:
            continue
        else:
            found = _NAME.match(line)
            assert found is not None, f"bad sample line {line!r}"
            at = found.end()
            labels: Labels = ()
            if line[at] == "{":
                labels, at = _labels(line, at)
            assert line[at] == " ", f"expected a space in {line!r}"
            value = _number(line[at + 1 :].split(" ")[0])
            assert current is not None, f"sample before any TYPE: {line!r}"
            assert _belongs(found.group(), current), f"{found.group()} outside its family"
            current.samples.append((found.group(), labels, value))
    for family in families.values():
        if family.kind == "histogram":
            check_histogram(family)
    return families


def check_histogram(family: Family) -> None:
    """Buckets cumulative, bounds increasing, +Inf last and equal to _count."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    counts: dict[Labels, float] = {}
    sums: dict[Labels, float] = {}
    for name, labels, value in family.samples:
        if name.endswith("_bucket"):
            rest = tuple(pair for pair in labels if pair[0] != "le")
            le = dict(labels)["le"]
            series.setdefault(rest, []).append((_number(le), value))
        elif name.endswith("_count"):
            counts[labels] = value
        else:
            sums[labels] = value
    assert set(series) == set(counts) == set(sums), family.name
    for labels, buckets in series.items():
        bounds = [bound for bound, _ in buckets]
        assert bounds == sorted(bounds), buckets
        assert len(set(bounds)) == len(bounds), buckets
        assert math.isinf(bounds[-1]), f"{family.name}{labels}: no +Inf bucket"
        values = [value for _, value in buckets]
        assert values == sorted(values), f"{family.name}{labels}: buckets not cumulative"
        assert values[-1] == counts[labels], f"{family.name}{labels}: +Inf is not _count"


def get(families: Mapping[str, Family], name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` with exactly these labels, None if absent."""
    family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
    if family is None:
        return None
    wanted = set(labels.items())
    for sample, found, value in family.samples:
        if sample == name and set(found) == wanted:
            return value
    return None


def total(families: Mapping[str, Family], name: str, **labels: str) -> float:
    """The sum of every sample ``name`` whose labels include these."""
    family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
    if family is None:
        return 0.0
    wanted = set(labels.items())
    return sum(
        value for sample, found, value in family.samples if sample == name and wanted <= set(found)
    )


def series(families: Mapping[str, Family], name: str) -> dict[Labels, float]:
    """Every sample ``name`` by its labels."""
    family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
    if family is None:
        return {}
    return {labels: value for sample, labels, value in family.samples if sample == name}


def request(
    address: tuple[str, int], path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request: status, headers (lower-cased names) and body."""
    connection = http.client.HTTPConnection(*address, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, body
    finally:
        connection.close()


def scrape(address: tuple[str, int]) -> dict[str, Family]:
    """GET /metrics and parse it; fails unless the answer is a 200 in the text format."""
    status, headers, body = request(address, "/metrics")
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    return parse(body)
