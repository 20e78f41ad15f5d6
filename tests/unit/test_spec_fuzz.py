"""Mutated specs either load or raise SpecError: never any other exception."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.spec import SpecError, dump_spec, parse_spec

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
