"""On a failing test in a booted machine, the report carries what systemd and the
daemons said: the failed units and the last journal lines of every zlayer unit, so a
failure in CI shows its cause (a crash's Python stack, a start limit) and not only
its symptom."""

from __future__ import annotations

from collections.abc import Generator

import pytest

JOURNAL = (
    "systemctl --no-pager --failed; "
    "for unit in $(systemctl list-units --all --plain --no-legend 'zlayer*' | cut -d' ' -f1); "
    'do echo "== $unit"; journalctl --no-pager -q -u "$unit" -n 40; done'
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    machine = getattr(item, "funcargs", {}).get("machine")
    if report.when != "call" or not report.failed or machine is None:
        return
    try:
        said = machine.run("sh", "-c", JOURNAL, check=False, timeout=60)
        report.sections.append(("the machine's zlayer units", said.stdout + said.stderr))
    except Exception as exc:  # the machine may be gone; the failure itself still shows
        report.sections.append(("the machine's zlayer units", f"could not ask: {exc}"))
