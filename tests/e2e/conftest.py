import pytest


@pytest.fixture(autouse=True)
def _integration_leak_check(leak_check: None) -> None:
    """Every end-to-end test runs under the leak check."""
