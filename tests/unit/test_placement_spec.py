"""The placement keys' shapes: affinity and replica_groups as upstream writes them."""

from __future__ import annotations

import textwrap

import pytest

from shared.spec import SpecError, parse_spec
from shared.spec.models import AffinityPin, ReplicaGroup, ServiceSpec

HEAD = """\
version: v1
deployment: app
services:
"""


def parse(services: str) -> dict[str, ServiceSpec]:
    spec = parse_spec(HEAD + textwrap.indent(textwrap.dedent(services), "  "), "app.zlayer.yml")
    return dict(spec.services)


def problems(services: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse(services)
    return [f"{issue.path}: {issue.message}" for issue in caught.value.issues]


def test_upstream_affinity_forms_are_read() -> None:
    services = parse(
        """
        a: {image: nginx, affinity: spread}
        b: {image: nginx, affinity: pack}
        c: {image: nginx, affinity: {pin: "zone=eu"}}
        d: {image: nginx}
        """
    )
    assert [s.affinity for s in services.values()] == [
        "spread",
        "pack",
        AffinityPin(pin="zone=eu"),
        None,
    ]


def test_replica_groups_are_typed_with_upstreams_defaults() -> None:
    services = parse(
        """
        db:
          image: postgres:16
          replica_groups:
            - role: primary
              count: 1
              env: {MODE: primary, PORT: 5432}
            - role: read
              count: 2
              image: postgres:16-alpine
              resources: {cpu: 0.5, memory: 256Mi}
              affinity: pack
        """
    )
    groups = services["db"].replica_groups
    assert groups is not None
    assert [(g.role, g.count, g.affinity) for g in groups] == [
        ("primary", 1, "spread"),
        ("read", 2, "pack"),
    ]
    assert isinstance(groups[0], ReplicaGroup)
    assert groups[0].env == {"MODE": "primary", "PORT": "5432"}
    assert groups[1].image is not None and groups[1].image.name == "postgres:16-alpine"
    assert groups[1].resources is not None
    assert groups[1].resources.memory == 256 * 1024 * 1024


@pytest.mark.parametrize(
    ("services", "wanted"),
    [
        ("a: {image: nginx, affinity: nope}", "services.a.affinity: `nope` is not one of"),
        ("a: {image: nginx, affinity: {pin: zone}}", "'zone' is not a pin: write `id=NODE`"),
        (
            "a: {image: nginx, replica_groups: [{role: x, count: 1}, {role: x, count: 2}]}",
            "role `x` is used by two replica groups",
        ),
        (
            "a: {image: nginx, replica_groups: [{role: Primary, count: 1}]}",
            "'Primary' is not a role name",
        ),
        ("a: {image: nginx, replica_groups: [{role: x, count: 0}]}", "replica_groups[0].count"),
        ("a: {image: nginx, replica_groups: [{role: x, count: 1, size: 3}]}", "size"),
    ],
)
def test_a_wrong_placement_key_is_one_sentence_naming_it(services: str, wanted: str) -> None:
    found = problems(services)
    assert len(found) == 1, found
    assert wanted in found[0], found
