"""Image references: the normalised form, and a sentence for each malformed one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.reference import (
    InvalidReferenceError,
    is_reference,
    normalize_reference,
    parse_reference,
)

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("zlayer/busybox", "docker.io/zlayer/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("localhost/x:1", "localhost/x:1"),
        ("localhost:5000/a/b/c", "localhost:5000/a/b/c:latest"),
        ("127.0.0.1:5000/app:v2", "127.0.0.1:5000/app:v2"),
        ("ghcr.io/org/app", "ghcr.io/org/app:latest"),
        ("quay.io/a_b/c-d.e__f:TAG_1.0-x", "quay.io/a_b/c-d.e__f:TAG_1.0-x"),
        (f"busybox@{SHA}", f"docker.io/library/busybox@{SHA}"),
        (f"busybox:1@{SHA}", f"docker.io/library/busybox:1@{SHA}"),
        ("Registry.Example/x", "Registry.Example/x:latest"),
    ],
)
def test_normalises(text: str, normal: str) -> None:
    assert normalize_reference(text) == normal
    assert normalize_reference(normal) == normal


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not an image reference"),
        (" busybox", "is not an image reference"),
        ("Busybox", "must be lowercase"),
        ("zlayer/Busybox", "must be lowercase"),
        ("busybox:", "tag"),
        ("busybox:-x", "tag"),
        ("busybox:\u00fc", "tag"),
        ("busybox:" + "a" * 129, "tag"),
        ("busybox@sha256:abc", "digest"),
        ("a//b", "name component"),
        ("a/-b", "name component"),
        ("a..b/c", "registry"),
        ("ab" * 32, "looks like an image id"),
        (":latest", "has no image name"),
        ("x/" + "a" * 260, "longer than 255"),
    ],
)
def test_refuses_with_a_sentence(text: str, says: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message
    assert not is_reference(text)


def test_parts_and_familiar_form() -> None:
    ref = parse_reference("zlayer/busybox:1")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("docker.io", "zlayer/busybox", "1", None)
    assert ref.repository == "docker.io/zlayer/busybox"
    assert ref.familiar() == "zlayer/busybox:1"
    assert parse_reference("busybox").familiar() == "busybox:latest"
    assert parse_reference("localhost/x:1").familiar() == "localhost/x:1"
    assert parse_reference(f"busybox@{SHA}").tag is None
    assert parse_reference("busybox", default_tag=None).tag is None


# No dots: a first component with a dot names a registry, as in Docker.
_component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:_|__|-+)[a-z0-9]{1,8}){0,2}", fullmatch=True)
_domain = st.sampled_from(["", "docker.io/", "localhost/", "localhost:5000/", "ghcr.io/", "a.b:1/"])
_tag = st.one_of(st.just(""), st.from_regex(r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))


@given(_domain, st.lists(_component, min_size=1, max_size=3), _tag)
def test_normal_form_is_stable(domain: str, components: list[str], tag: str) -> None:
    text = domain + "/".join(components) + tag
    normal = normalize_reference(text)
    assert normalize_reference(normal) == normal
    ref = parse_reference(normal)
    assert str(ref) == normal
    assert ref.tag == (tag[1:] if tag else "latest")
    assert normalize_reference(ref.familiar()) == normal


@given(st.text(max_size=40))
def test_never_raises_anything_else(text: str) -> None:
    try:
        parse_reference(text)
    except InvalidReferenceError as exc:
        assert str(exc)
