"""Join tokens: one copyable line that parses back; the cluster keeps only the secret's hash;
every way a token can be wrong is one sentence."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cluster.jointoken import (
    VERSION_PREFIX,
    JoinTokenError,
    check,
    key_for_secret,
    make,
    parse,
    record_key,
    save,
    secret_sha256,
)
from shared.wire import encode
from shared.wire.cluster import KEYS

FINGERPRINT = "ab" * 32
NOW = 1_800_000_000.0


def test_a_token_is_one_line_that_parses_back_to_what_it_carries() -> None:
    token, _ = make("192.0.2.1", 7946, FINGERPRINT, ttl=600, now=NOW)
    text = token.text()
    assert text.startswith(VERSION_PREFIX)
    assert text.isprintable() and " " not in text and len(text) < 300
    assert parse(text, now=NOW) == token
    assert token.address == "192.0.2.1" and token.port == 7946
    assert token.ca_sha256 == FINGERPRINT and token.expires_at == int(NOW + 600)
    # a terminal or mail program wrapping the line does not break it
    wrapped = "\n".join(text[i : i + 40] for i in range(0, len(text), 40))
    assert parse(f"  {wrapped}\n", now=NOW) == token


def test_tokens_differ_and_the_stored_record_holds_only_the_secrets_hash() -> None:
    first, record = make("192.0.2.1", 7946, FINGERPRINT, now=NOW, created_by="n1")
    second, _ = make("192.0.2.1", 7946, FINGERPRINT, now=NOW)
    assert first.secret != second.secret
    stored = encode(record)
    assert first.secret not in stored
    assert record.secret_sha256 == secret_sha256(first.secret)
    assert record_key(record) == KEYS["join_tokens"] + record.secret_sha256
    assert key_for_secret(first.secret) == record_key(record)
    assert record.created_by == "n1" and record.expires_at == first.expires_at


def test_the_cluster_accepts_the_secret_until_the_expiry_and_nothing_else() -> None:
    token, record = make("192.0.2.1", 7946, FINGERPRINT, ttl=60, now=NOW)
    check(token.secret, record, now=NOW + 59)
    with pytest.raises(JoinTokenError, match="expired at 2027-01-15 08:01:00 UTC; make a new one"):
        check(token.secret, record, now=NOW + 60)
    other, _ = make("192.0.2.1", 7946, FINGERPRINT, now=NOW)
    with pytest.raises(JoinTokenError, match="not one this cluster made"):
        check(other.secret, record, now=NOW)
    with pytest.raises(JoinTokenError, match="not one this cluster made"):
        check(token.secret, None, now=NOW)


def _forged(fields: dict[str, object]) -> str:
    raw = json.dumps(fields).encode()
    return VERSION_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


GOOD = {
    "address": "192.0.2.1",
    "port": 7946,
    "secret": base64.urlsafe_b64encode(b"x" * 32).rstrip(b"=").decode(),
    "ca_sha256": FINGERPRINT,
    "expires_at": int(NOW + 60),
}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "this is not a join token"),
        ("K10abc::server:xyz", "this is not a join token"),
        ("zlj2.eyJ9", "of a version this ZLayer does not read \\(zlj2\\)"),
        ("zlj1.", "damaged \\(it does not decode\\)"),
        ("zlj1.%%%%", "damaged \\(it does not decode\\)"),
        ("zlj1.bm90IGpzb24", "damaged \\(it does not decode\\)"),
        (_forged({**GOOD, "extra": 1}), "damaged \\(it does not decode\\)"),
        (_forged({k: v for k, v in GOOD.items() if k != "secret"}), "does not decode"),
        (_forged({**GOOD, "port": 0}), "damaged \\(a field is missing or out of range\\)"),
        (_forged({**GOOD, "ca_sha256": "AB" * 32}), "a field is missing or out of range"),
        (_forged({**GOOD, "secret": "c2hvcnQ"}), "a field is missing or out of range"),
        (_forged({**GOOD, "address": ""}), "a field is missing or out of range"),
        (_forged({**GOOD, "expires_at": int(NOW)}), "expired at 2027-01-15 08:00:00 UTC"),
    ],
)
def test_every_bad_token_is_one_sentence(text: str, words: str) -> None:
    with pytest.raises(JoinTokenError, match=words) as caught:
        parse(text, now=NOW)
    message = str(caught.value)
    assert "\n" not in message and message.count("; ") == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=200).map(lambda b: VERSION_PREFIX + b.hex()))
def test_no_text_makes_parse_fail_other_than_with_a_sentence(text: str) -> None:
    try:
        parse(text, now=NOW)
    except JoinTokenError as exc:
        assert "\n" not in str(exc)


def test_make_refuses_what_would_make_a_useless_token() -> None:
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        make("192.0.2.1", 7946, "sha256:" + FINGERPRINT)
    with pytest.raises(ValueError, match="not a port"):
        make("192.0.2.1", 0, FINGERPRINT)
    with pytest.raises(ValueError, match="positive"):
        make("192.0.2.1", 7946, FINGERPRINT, ttl=0)
    _, record = make("192.0.2.1", 7946, FINGERPRINT, ttl=60, now=NOW)
    with pytest.raises(ValueError, match="already expired"):
        asyncio.run(save(None, record, now=NOW + 60))
