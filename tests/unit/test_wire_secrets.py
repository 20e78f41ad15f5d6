"""A secret's value never shows in a repr, a log line or an f-string, only on the wire."""

from __future__ import annotations

import logging

import pytest

from shared.wire import decode, encode
from shared.wire.api import SecretValue, SecretWrite


@pytest.mark.parametrize(
    "value",
    [
        SecretWrite(name="db-password", value="hunter2", deployment="app"),
        SecretValue(name="db-password", deployment="app", value="hunter2"),
    ],
)
def test_a_secret_value_is_hidden_from_repr_and_logs_and_kept_on_the_wire(
    value: SecretWrite | SecretValue, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("zlayer.test").info("got %s and %r", value, value)
    shown = repr(value) + str(value) + f"{value}" + caplog.text
    assert "hunter2" not in shown and "db-password" in shown and "<hidden>" in shown
    assert decode(encode(value), type(value)) == value
    assert "hunter2" in encode(value)
