"""Mutated and hostile specs either load or raise SpecError: never any other exception."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.spec import SpecError, dump_spec, parse_spec, spec_to_data
from shared.spec.limits import MAX_EVENTS, MAX_ISSUES, MAX_REPLICAS, MAX_SERVICES, MAX_SIZE

REPO = Path(__file__).resolve().parents[2]
SEEDS = [
    yaml.safe_load(p.read_text())
    for p in [
        *sorted((REPO / "examples").glob("*.zlayer.yml")),
        *sorted((REPO / "tests" / "data" / "upstream-examples").glob("*.zlayer.y*ml")),
    ]
]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["$E:", "$S:@x", "70000", "1Gi", "30s", "cron", "fixed", "", "~", "0 3 * * *"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
KEYS = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["volumes", "mode", "type", "name", "port", "cap_add", "capabilities", "with"]),
)


def _containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    if isinstance(node, dict):
        found.append(path)
        for key, value in node.items():
            found += _containers(value, (*path, key))
    elif isinstance(node, list):
        found.append(path)
        for index, value in enumerate(node):
            found += _containers(value, (*path, index))
    return found


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for segment in path:
        node = node[segment]
    return node


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        places = _containers(doc)
        if not places:
            break
        target = _get(doc, draw(st.sampled_from(places)))
        if isinstance(target, dict):
            action = draw(st.sampled_from(["delete", "rename", "swap", "insert"]))
            keys = list(target)
            if action == "insert" or not keys:
                target[draw(KEYS)] = draw(JUNK)
                continue
            key = draw(st.sampled_from(keys))
            if action == "delete":
                del target[key]
            elif action == "rename":
                target[draw(KEYS)] = target.pop(key)
            else:
                target[key] = draw(JUNK)
        elif isinstance(target, list):
            if target and draw(st.booleans()):
                target[draw(st.integers(0, len(target) - 1))] = draw(JUNK)
            else:
                target.append(draw(JUNK))
    if draw(st.integers(0, 20)) == 0:
        return draw(JUNK)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_load_or_raise_spec_error(doc: Any) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    try:
        spec = parse_spec(text, "fuzz.zlayer.yml")
    except SpecError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.message and str(issue).startswith("fuzz.zlayer.yml")
        return
    # What loads must dump and load back to the same thing.
    assert parse_spec(dump_spec(spec), "again") == spec


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_bytes_load_or_raise_spec_error(raw: bytes | str) -> None:
    try:
        parse_spec(raw, "noise")
    except SpecError as exc:
        assert exc.issues


# ---------------------------------------------------------------- hostile input
# What an attacker writes rather than what a typo makes: names ending in a
# newline, numbers past any bound, lone surrogates, long depends chains, alias
# bombs, deep nesting, too many services. Each must load within bounds or end
# in SpecError, quickly, and what loads must print as JSON.

HOSTILE_SCALARS = st.one_of(
    st.sampled_from(["shop\n", "shop\r\n", "shop ", " shop", "web\n", "a\x00b", "\ufeffshop"]),
    st.integers(min_value=2**62, max_value=2**80).map(str),
    st.integers(min_value=2**62, max_value=2**80).map(lambda n: f"{n}d"),
    st.integers(min_value=10**6, max_value=10**30).map(lambda n: f"{n}Pi"),
    st.sampled_from([".inf", "-.inf", ".nan", "1e400", "9" * 400, "99999999999d", "9" * 400 + "s"]),
    st.integers(min_value=0xD800, max_value=0xDFFF).map(lambda c: f'"\\u{c:04x}"'),
    st.text(max_size=8).map(lambda t: json.dumps(t + "\n")),
)
HOSTILE_PLACES = [
    "deployment: {v}\nservices: {{web: {{image: a}}}}",
    "deployment: shop\nservices: {{{v}: {{image: a}}}}",
    "deployment: shop\nservices: {{web: {{image: a, scale: {{mode: fixed, replicas: {v}}}}}}}",
    "deployment: shop\nservices: {{web: {{image: a, scale: {{mode: adaptive, max: {v}}}}}}}",
    "deployment: shop\nservices: {{web: {{image: a, resources: {{memory: {v}, cpu: {v}}}}}}}",
    "deployment: shop\nservices: {{web: {{image: a, health: "
    "{{interval: {v}, check: {{type: tcp}}}}}}}}",
    "deployment: shop\nservices: {{web: {{image: a, labels: {{x: {v}}}, env: {{X: {v}}}}}}}",
    "deployment: shop\nservices: {{web: {{image: a, ulimits: {{nofile: {v}}}, storage: "
    "[{{type: tmpfs, target: /t, size: {v}}}]}}}}",
    "deployment: shop\nservices: {{web: {{image: a, depends: [{{service: {v}, timeout: {v}}}]}}}}",
]


def _chain_text(count: int, cycle: bool) -> str:
    lines = ["deployment: shop", "services:"]
    for index in range(count):
        target = index + 1 if index + 1 < count else (0 if cycle else None)
        depends = f", depends: [{{service: s{target}}}]" if target is not None else ""
        lines.append(f"  s{index}: {{image: a{depends}}}")
    return "\n".join(lines)


def _bomb_text(width: int, depth: int) -> str:
    lines = ["deployment: shop", "services: {}", f"x0: &x0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, depth):
        lines.append(f"x{level}: &x{level} [{', '.join([f'*x{level - 1}'] * width)}]")
    return "\n".join(lines)


HEAVY = ["services", "events"]


@st.composite
def hostile_spec(draw: st.DrawFn) -> str:
    # The costly kinds (a thousand services, 100,000 events) are drawn rarely.
    kind = draw(st.sampled_from(["scalar"] * 15 + ["chain", "bomb", "nesting"] * 2 + HEAVY))
    if kind == "scalar":
        body = draw(st.sampled_from(HOSTILE_PLACES)).format(v=draw(HOSTILE_SCALARS))
    elif kind == "chain":
        body = _chain_text(draw(st.integers(1, 400)), draw(st.booleans()))
    elif kind == "bomb":
        body = _bomb_text(draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    elif kind == "nesting":
        depth = draw(st.integers(1, 20_000))
        body = "deployment: shop\nservices: {}\nx: " + "[" * depth + "]" * depth
    elif kind == "services":
        count = draw(st.integers(MAX_SERVICES - 5, MAX_SERVICES + 5))
        body = "deployment: shop\nservices:\n" + "".join(
            f"  s{i}: {{image: a}}\n" for i in range(count)
        )
    else:
        count = draw(st.integers(MAX_EVENTS - 5, MAX_EVENTS + 5))
        body = "deployment: shop\nservices: {}\nx: [" + ",".join(["1"] * count) + "]"
    return "version: v1\n" + body + "\n"


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_spec())
def test_hostile_specs_load_within_bounds_or_raise_spec_error(text: str) -> None:
    started = time.monotonic()
    try:
        spec = parse_spec(text, "hostile.zlayer.yml")
    except SpecError as exc:
        assert 0 < len(exc.issues) <= MAX_ISSUES + 1
        for issue in exc.issues:
            assert issue.message and "\n" not in issue.message
            assert "Traceback" not in issue.message
    else:
        # What loads is within every bound and prints as JSON, encodable as UTF-8.
        assert len(spec.services) <= MAX_SERVICES
        assert "\n" not in spec.deployment and all("\n" not in n for n in spec.services)
        json.dumps(spec_to_data(spec)).encode("utf-8")
        for service in spec.services.values():
            scale = service.scale
            assert getattr(scale, "replicas", 0) <= MAX_REPLICAS
            assert getattr(scale, "max", 0) <= MAX_REPLICAS
            assert (service.resources.memory or 0) <= MAX_SIZE
    assert time.monotonic() - started < 60  # generous: only a hang or a blow-up fails it
