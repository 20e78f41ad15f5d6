"""The one reader of YAML with line marks: the deployment spec and the build files alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.buildfile.located import BuildFileError
from shared.buildfile.pipeline import load_pipeline
from shared.buildfile.zimagefile import parse_zimagefile
from shared.spec import SpecError, parse_spec
from shared.spec.located_yaml import LocatedYaml


def spec_issues(text: str | bytes) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "file.yml")
    return [str(issue) for issue in caught.value.issues]


def zimagefile_issues(text: str) -> list[str]:
    with pytest.raises(BuildFileError) as caught:
        parse_zimagefile(text, "file.yml")
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\na: 2\n", "file.yml:2:1: a: duplicate key `a` (first at line 1)"),
        ("a: [1\n", "file.yml:2:1: invalid YAML: while parsing a flow sequence"),
        ("a: &x [*x]\n", "file.yml:1:4: a[0]: an alias refers to itself"),
        ("a: !!int abc\n", "file.yml:1:4: a: cannot read this value"),
        ("a: !!python/object:os.system {}\n", "file.yml:1:4: a: unsupported YAML tag"),
        ("[a]: 1\n", "file.yml:1:1: a key must be a plain name, not a list or mapping"),
        ("a: 1\n---\na: 2\n", "file.yml:2:1: a second YAML document starts here"),
        ("a: \x07\n", "file.yml:1:4: the file holds a control character YAML does not allow"),
    ],
)
def test_a_yaml_problem_reads_the_same_in_a_spec_and_a_build_file(text: str, expected: str) -> None:
    # The spec goes on to validate what it could read; a build file stops at reading.
    assert any(issue.startswith(expected) for issue in spec_issues(text))
    assert [issue for issue in zimagefile_issues(text) if issue.startswith(expected)]


def test_bytes_that_are_not_utf8_are_located() -> None:
    raw = "a: 1\nb: caf\xe9\n".encode("latin-1")
    expected = "file.yml:2:7: the file is not UTF-8 text (byte 0xe9); save it as UTF-8"
    assert spec_issues(raw) == [expected]
    document = LocatedYaml("file.yml", "ZImagefile", "empty")
    assert document.decode(raw) is None
    assert [str(issue) for issue in document.issues] == [expected]


def test_a_build_file_names_itself_in_a_second_document() -> None:
    assert zimagefile_issues("base: x\n---\n") == [
        "file.yml:2:1: a second YAML document starts here; a ZImagefile is one document: "
        "remove this `---` and what follows (or split the file)"
    ]
    assert (
        "file.yml:2:1: a second YAML document starts here; a deployment spec is one document: "
        "remove this `---` and what follows (or split the file)"
    ) in spec_issues("version: v1\n---\n")


def test_an_alias_bomb_in_a_pipeline_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]")
    path = tmp_path / "ZPipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BuildFileError, match="too large or too deeply nested"):
        load_pipeline(path)


def test_marks_fall_back_to_the_nearest_read_ancestor() -> None:
    document = LocatedYaml("f.yml", "ZImagefile", "empty")
    data, readable = document.load("top:\n  inner:\n    - 1\n    - 2\n")
    assert readable and data == {"top": {"inner": [1, 2]}}
    assert document.mark(("top", "inner", 1)) == (4, 7)
    assert document.mark(("top", "inner", 9)) == (3, 5)  # the list itself
    assert document.mark(("top", "inner"), at_key=True) == (2, 3)
