"""proxyd's max_connections against the open file limit it runs with."""

from __future__ import annotations

import pytest

from daemons.proxyd.limits import connections_that_fit


@pytest.mark.parametrize(
    ("open_files", "configured", "explicit", "expected"),
    [
        # The packaged unit's LimitNOFILE=65536: the default fits as it is.
        (65536, 10_000, False, (10_000, False)),
        # A host whose hard limit is 20000: the default is lowered, with no warning.
        (20_000, 10_000, False, (9488, False)),
        # The same host with max_connections set in proxyd.toml: kept, and said too high.
        (20_000, 10_000, True, (10_000, True)),
        (20_000, 5_000, True, (5_000, False)),
        # A tiny limit still leaves a proxy that serves.
        (1024, 10_000, False, (64, False)),
    ],
)
def test_the_default_is_lowered_to_what_fits_and_a_set_value_is_kept(
    open_files: int, configured: int, explicit: bool, expected: tuple[int, bool]
) -> None:
    assert connections_that_fit(open_files, configured, explicit) == expected
