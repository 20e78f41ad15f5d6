"""shared.spec.check: the one SpecCheck that ``zlayerctl validate`` prints, whether schedd
or zlayerctl made it; its problems read exactly as the SpecIssues they come from."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.spec.check import check_spec
from shared.spec.errors import SpecIssue
from shared.wire import decode, encode
from shared.wire.scheduler import SpecCheck, SpecProblem


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=20),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.text(max_size=20),
    st.text(max_size=40),
)
def test_a_problem_reads_as_its_issue(
    file: str, line: int, column: int, path: str, message: str
) -> None:
    issue = SpecIssue(file, line, column, path, message)
    problem = SpecProblem(
        file=issue.file,
        line=issue.line,
        column=issue.column,
        path=issue.path,
        message=issue.message,
    )
    assert str(problem) == str(issue)


def test_the_check_crosses_the_wire_unchanged() -> None:
    spec = b"version: v1\ndeployment: d\nservices:\n  web:\n    image: nginx:1\n    ports: [80]\n"
    check = check_spec(spec, "d.zlayer.yml")
    assert not check.valid and check.total == 1
    assert str(check.problems[0]).startswith("d.zlayer.yml:6:")
    assert decode(encode(check), SpecCheck) == check

    ok = check_spec(spec.replace(b"    ports: [80]\n", b""), "d.zlayer.yml")
    assert ok.valid and ok.deployment == "d" and [s.name for s in ok.services] == ["web"]
    assert decode(encode(ok), SpecCheck) == ok
