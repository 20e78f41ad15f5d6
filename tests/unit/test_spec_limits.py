"""Hostile spec files: `zlayerctl validate` ends each with one plain sentence and exit 1.

Each file is checked by the real CLI in a child limited to 2 GB of address
space (as `ulimit -v 2000000`), so a spec that would read without bound,
block, recurse or blow up in memory shows here as a crash or a timeout. The
same limits protect schedd, which parses specs sent over the bus with the
same loader (:func:`parse_spec`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from shared.spec import SpecError, parse_spec
from shared.spec.checks import semantic_problems
from shared.spec.limits import (
    MAX_DEPENDS_CHAIN,
    MAX_EVENTS,
    MAX_SERVICES,
    MAX_SPEC_BYTES,
    FileReadError,
    read_regular_file,
)

HEAD = "version: v1\ndeployment: shop\nservices:\n"
WEB = HEAD + "  web:\n    image: nginx:1\n"
ADDRESS_SPACE = 2_000_000 * 1024  # ulimit -v 2000000


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def validate(path: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("zlayerctl"), "validate", str(path), *args],
        capture_output=True, text=True, timeout=120, preexec_fn=_limited,
    )  # fmt: skip


def _chain(count: int) -> str:
    lines = [HEAD]
    for index in range(count):
        lines.append(f"  s{index}:\n    image: a\n")
        if index + 1 < count:
            lines.append(f"    depends: [{{service: s{index + 1}}}]\n")
    return "".join(lines)


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return HEAD + "  web:\n    image: nginx:1\n    labels: {}\n" + "\n".join(lines) + "\n"


def _services(count: int) -> str:
    return HEAD + "".join(f"  s{index}: {{image: a}}\n" for index in range(count))


# name -> (spec text, what the error must say)
HOSTILE: dict[str, tuple[Callable[[], str], str]] = {
    "name-with-trailing-newline": (
        lambda: 'version: v1\ndeployment: "shop\\n"\nservices: {}\n',
        "deployment: 'shop\\n' is not a DNS-safe name",
    ),
    "service-name-with-trailing-newline": (
        lambda: HEAD + '  "web\\n":\n    image: nginx:1\n',
        "service name 'web\\n' is not DNS-safe",
    ),
    "huge-duration": (
        lambda: WEB + "    health: {interval: 99999999999d, check: {type: tcp}}\n",
        "is longer than 365d, the longest duration a spec may hold",
    ),
    "depends-chain": (
        lambda: _chain(MAX_SERVICES),
        f"a chain may hold at most {MAX_DEPENDS_CHAIN} services",
    ),
    "replicas-past-uint64": (
        lambda: WEB + "    scale: {mode: fixed, replicas: 18446744073709551616}\n",
        "scale.replicas: must be at most 1000, got 18446744073709551616",
    ),
    "memory-past-any-size": (
        lambda: WEB + "    resources: {memory: 99999999999999999999999Pi}\n",
        "is larger than 1Ei, the largest size a spec may hold",
    ),
    "cpu-infinite": (
        lambda: WEB + "    resources: {cpu: .inf}\n",
        "resources.cpu: must be a finite number",
    ),
    "lone-surrogate": (
        lambda: WEB + '    labels: {a: "\\ud800"}\n',
        "labels.a: this text holds half of a UTF-16 surrogate pair",
    ),
    "too-many-services": (
        lambda: _services(MAX_SERVICES + 1),
        "1,001 services; a deployment holds at most 1,000",
    ),
    "sixty-thousand-services": (
        lambda: _services(60_000),
        "is larger than 1 MiB, the most a spec file may hold",
    ),
    "alias-bomb": (_alias_bomb, "the document is too large or too deeply nested"),
    "too-many-events": (
        lambda: WEB + "    dns: [" + ",".join(["1"] * (MAX_EVENTS + 1)) + "]\n",
        "the document has more than 100,000 YAML values",
    ),
    "deep-nesting": (
        lambda: WEB + "    labels: " + "[" * 50_000 + "]" * 50_000 + "\n",
        "the YAML is nested more than 100 levels deep",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_spec_ends_in_one_sentence(case: str, tmp_path: Path) -> None:
    make, expected = HOSTILE[case]
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(make())
    result = validate(path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    assert expected in result.stderr, result.stderr[-2000:]
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and "\n" not in last


def test_a_lone_surrogate_never_reaches_json_output(tmp_path: Path) -> None:
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(WEB + '    labels: {a: "\\udc80"}\n')
    result = validate(path, "--format", "json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False and "surrogate" in report["issues"][0]["message"]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "shop.zlayer.yml"
    os.mkfifo(fifo)
    result = validate(fifo)  # would block forever waiting for a writer
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {fifo}: is not a regular file (a pipe, a device or a socket); "
        "save the spec to a file and name that\n"
    )


def test_dev_zero_is_refused_without_reading_it() -> None:
    result = validate("/dev/zero")  # would read until MemoryError
    assert result.returncode == 1
    assert "/dev/zero: is not a regular file" in result.stderr


def test_a_file_past_the_limit_is_refused_after_reading_only_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.zlayer.yml"
    with path.open("wb") as handle:
        handle.truncate(8 << 30)  # sparse: 8 GiB of zeros that take no disk
    with pytest.raises(FileReadError, match="is larger than 1 MiB"):
        read_regular_file(str(path))
    path.write_bytes(b"#" * MAX_SPEC_BYTES)
    assert len(read_regular_file(str(path))) == MAX_SPEC_BYTES


def test_parse_spec_refuses_text_past_the_limit_before_parsing_it() -> None:
    # What schedd gets over the bus: the same limit, as str or bytes.
    text = WEB + "# " + "x" * MAX_SPEC_BYTES + "\n"
    for given in (text, text.encode()):
        started = time.monotonic()
        with pytest.raises(SpecError) as caught:
            parse_spec(given, "bus")
        assert [i.message for i in caught.value.issues] == [
            "the spec is larger than 1 MiB, the most a deployment spec may hold; "
            "split it into several deployments"
        ]
        assert time.monotonic() - started < 5
    # Characters of several bytes count as bytes.
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        parse_spec(WEB + "# " + "é" * (MAX_SPEC_BYTES // 2) + "\n", "bus")


def test_the_event_cap_stops_parsing_before_the_document_is_built() -> None:
    # Well under 1 MiB, yet far more values than any spec has.
    text = WEB + "    dns: [" + ",".join(["1"] * (4 * MAX_EVENTS)) + "]\n"
    started = time.monotonic()
    with pytest.raises(SpecError, match="more than 100,000 YAML values"):
        parse_spec(text, "bus")
    assert time.monotonic() - started < 30


def test_a_chain_of_5000_depends_does_not_recurse() -> None:
    # Past the service cap, so checked on raw data as DeploymentSpec would see it.
    count = 5000
    services = {
        f"s{i}": {"image": "a", "depends": [{"service": f"s{i + 1}"}]} for i in range(count)
    }
    services[f"s{count - 1}"]["depends"] = []
    problems = semantic_problems({"services": services})
    assert [p.describe() for p in problems] == [
        "services.s0.depends: this service begins a chain of 5,000 services, each waiting on "
        f"the next through `depends`; a chain may hold at most {MAX_DEPENDS_CHAIN} services"
    ]
    services[f"s{count - 1}"]["depends"] = [{"service": "s0"}]  # closes a cycle of 5,000
    problems = semantic_problems({"services": services})
    assert [p.message for p in problems] == [
        "dependency cycle: s0 -> s1 -> s2 -> s3 -> s4 -> ... -> s4998 -> s4999 -> s0 "
        "(5,000 services)"
    ]


def test_a_chain_at_the_limit_is_valid() -> None:
    spec = parse_spec(_chain(MAX_DEPENDS_CHAIN), "chain")
    assert len(spec.services) == MAX_DEPENDS_CHAIN
    with pytest.raises(SpecError, match="a chain of 101 services"):
        parse_spec(_chain(MAX_DEPENDS_CHAIN + 1), "chain")


def test_many_problems_are_described_up_to_a_limit() -> None:
    keys = "".join(f"    k{index}: 1\n" for index in range(5000))
    started = time.monotonic()
    with pytest.raises(SpecError) as caught:
        parse_spec(WEB + keys, "many")
    issues = caught.value.issues
    assert len(issues) == 101 and caught.value.total == 5000
    assert str(issues[-1]) == "many: 4,900 more problems not shown; fix these first"
    assert time.monotonic() - started < 30
