"""On a failing test in a booted machine, the report carries what systemd and the
daemons said: the failed units and the last journal lines of every zlayer unit, so a
failure in CI shows its cause (a crash's Python stack, a start limit) and not only
its symptom.

The .rpm starts building with the first packaging test (``rpm_build``), so it is
done by the time its own test, after the .deb's, asks for it."""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator

import pytest

from tests.packaging.builds import Build


@pytest.fixture(scope="session")
def rpm_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """packaging/build-rpm.sh (no BuildRequires: this is not an rpm-based host), started."""
    build = Build("build-rpm.sh", tmp_path_factory.mktemp("rpm"), ZLAYER_RPM_NODEPS="1")
    yield build
    build.stop()


@pytest.fixture(scope="session", autouse=True)
def _rpm_ahead(request: pytest.FixtureRequest) -> None:
    """Start the .rpm's build now if a test of this run will want it."""
    if shutil.which("rpmbuild") and any(
        "rpm_build" in item.fixturenames for item in request.session.items
    ):
        request.getfixturevalue("rpm_build")


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
