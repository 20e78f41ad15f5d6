"""Broken spec files: each error names the field path, the line and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shared.spec import SpecError, SpecIssue, load_spec, parse_spec

HEAD = """\
version: v1
deployment: app
services:
"""


def issues_of(text: str | bytes, filename: str = "app.zlayer.yml") -> list[SpecIssue]:
    if isinstance(text, str):
        text = textwrap.dedent(text)
    with pytest.raises(SpecError) as caught:
        parse_spec(text, filename)
    assert caught.value.issues, "a SpecError must carry issues"
    return caught.value.issues


# (id, YAML below HEAD (services indented by 2), path, line, fragments of the message)
CASES: list[tuple[str, str, str, int, tuple[str, ...]]] = [
    (
        "port-too-high",
        """
          web:
            image: nginx
            endpoints:
              - name: http
                protocol: http
                port: 70000
        """,
        "services.web.endpoints[0].port",
        9,
        ("must be between 1 and 65535",),
    ),
    (
        "port-zero",
        """
          web:
            image: nginx
            endpoints:
              - {name: http, protocol: http, port: 0}
        """,
        "services.web.endpoints[0].port",
        7,
        ("must be between 1 and 65535",),
    ),
    (
        "port-quoted",
        """
          web:
            image: nginx
            endpoints:
              - name: http
                protocol: http
                port: "80"
        """,
        "services.web.endpoints[0].port",
        9,
        ("expected a whole number", "'80'"),
    ),
    (
        "endpoint-key-typo",
        """
          web:
            image: nginx
            endpoints:
              - name: http
                protocol: http
                port: 80
                expsoe: public
        """,
        "services.web.endpoints[0].expsoe",
        10,
        ("unknown key `expsoe`", "did you mean `expose`?"),
    ),
    (
        "compose-volumes",
        """
          db:
            image: postgres
            volumes:
              - ./data:/var/lib/postgresql/data
        """,
        "services.db.volumes",
        6,
        ("unknown key `volumes`", "did you mean `storage`?"),
    ),
    (
        "compose-ports",
        """
          web:
            image: nginx
            ports: ["80:80"]
        """,
        "services.web.ports",
        6,
        ("did you mean `endpoints`?",),
    ),
    (
        "compose-environment",
        """
          web:
            image: nginx
            environment:
              A: b
        """,
        "services.web.environment",
        6,
        ("did you mean `env`?",),
    ),
    (
        "compose-depends-on",
        """
          web:
            image: nginx
            depends_on: [db]
          db:
            image: postgres
        """,
        "services.web.depends_on",
        6,
        ("did you mean `depends`?",),
    ),
    (
        "compose-healthcheck",
        """
          web:
            image: nginx
            healthcheck:
              test: ["CMD", "true"]
        """,
        "services.web.healthcheck",
        6,
        ("did you mean `health`?",),
    ),
    (
        "compose-deploy-replicas",
        """
          web:
            image: nginx
            deploy:
              replicas: 3
        """,
        "services.web.deploy",
        6,
        ("scale: {mode: fixed, replicas: 3}",),
    ),
    (
        "missing-image",
        """
          web:
            rtype: service
        """,
        "services.web.image",
        5,
        ("required field is missing",),
    ),
    (
        "missing-image-name",
        """
          web:
            image:
              pull_policy: always
        """,
        "services.web.image.name",
        6,
        ("required field is missing",),
    ),
    (
        "pull-policy-typo",
        """
          web:
            image:
              name: nginx
              pull_policy: if_not_presnt
        """,
        "services.web.image.pull_policy",
        7,
        ("`if_not_presnt` is not one of", "did you mean `if_not_present`?"),
    ),
    (
        "protocol-typo",
        """
          web:
            image: nginx
            endpoints:
              - {name: http, protocol: htp, port: 80}
        """,
        "services.web.endpoints[0].protocol",
        7,
        ("did you mean `http`?",),
    ),
    (
        "depends-unknown-service",
        """
          web:
            image: nginx
            depends:
              - service: databse
          database:
            image: postgres
        """,
        "services.web.depends[0].service",
        7,
        ("no service `databse`", "did you mean `database`?"),
    ),
    (
        "depends-self",
        """
          web:
            image: nginx
            depends:
              - service: web
        """,
        "services.web.depends[0].service",
        7,
        ("cannot depend on itself",),
    ),
    (
        "depends-cycle",
        """
          a:
            image: nginx
            depends:
              - service: b
          b:
            image: nginx
            depends:
              - service: a
        """,
        "services.b.depends[0].service",
        11,
        ("dependency cycle: a -> b -> a",),
    ),
    (
        "cron-without-schedule",
        """
          nightly:
            rtype: cron
            image: busybox
        """,
        "services.nightly.rtype",
        5,
        ("needs a `schedule`", '"0 3 * * *"'),
    ),
    (
        "schedule-on-service",
        """
          web:
            image: nginx
            schedule: "0 3 * * *"
        """,
        "services.web.schedule",
        6,
        ("only cron jobs take a schedule", "rtype: cron"),
    ),
    (
        "cron-bad-minute",
        """
          nightly:
            rtype: cron
            schedule: "61 3 * * *"
            image: busybox
        """,
        "services.nightly.schedule",
        6,
        ("not a valid cron schedule", "minute hour"),
    ),
    (
        "cron-7-field-bad-year",
        """
          nightly:
            rtype: cron
            schedule: "0 0 3 * * * 1800"
            image: busybox
        """,
        "services.nightly.schedule",
        6,
        ("not a valid cron schedule", "year"),
    ),
    (
        "cron-wrong-field-count",
        """
          nightly:
            rtype: cron
            schedule: "0 3 * *"
            image: busybox
        """,
        "services.nightly.schedule",
        6,
        ("5, 6 or 7 fields", "this one has 4"),
    ),
    (
        "scale-min-above-max",
        """
          web:
            image: nginx
            scale:
              mode: adaptive
              min: 5
              max: 2
        """,
        "services.web.scale",
        7,
        ("min (5) is greater than max (2)",),
    ),
    (
        "scale-unknown-mode",
        """
          web:
            image: nginx
            scale:
              mode: auto
        """,
        "services.web.scale.mode",
        7,
        ("`auto` is not a known mode", "did you mean `adaptive`?"),
    ),
    (
        "scale-missing-mode",
        """
          web:
            image: nginx
            scale:
              replicas: 3
        """,
        "services.web.scale.mode",
        7,
        ("`mode` is missing", "adaptive, fixed, manual"),
    ),
    (
        "scale-fixed-without-replicas",
        """
          web:
            image: nginx
            scale:
              mode: fixed
        """,
        "services.web.scale.replicas",
        7,
        ("required field is missing",),
    ),
    (
        "storage-unknown-type",
        """
          web:
            image: nginx
            storage:
              - type: volume
                name: data
                target: /data
        """,
        "services.web.storage[0].type",
        7,
        ("`volume` is not a known type", "did you mean `named`?"),
    ),
    (
        "storage-missing-type",
        """
          web:
            image: nginx
            storage:
              - target: /data
        """,
        "services.web.storage[0].type",
        7,
        ("`type` is missing", "bind, named, anonymous, tmpfs, s3"),
    ),
    (
        "duplicate-endpoint-name",
        """
          web:
            image: nginx
            endpoints:
              - {name: http, protocol: http, port: 80}
              - {name: http, protocol: https, port: 443}
        """,
        "services.web.endpoints[1].name",
        8,
        ("endpoint name `http` is already used by endpoints[0]",),
    ),
    (
        "duration-without-unit",
        """
          web:
            image: nginx
            health:
              interval: 30
              check: {type: tcp, port: 80}
        """,
        "services.web.health.interval",
        7,
        ("needs a unit", "30s"),
    ),
    (
        "bad-memory-size",
        """
          web:
            image: nginx
            resources:
              memory: lots
        """,
        "services.web.resources.memory",
        7,
        ("not a size", "512Mi"),
    ),
    (
        "empty-env-ref",
        """
          web:
            image: nginx
            env:
              DB: "$E:"
        """,
        "services.web.env.DB",
        7,
        ("`$E:`", "followed by a variable name"),
    ),
    (
        "bad-secret-ref",
        """
          web:
            image: nginx
            env:
              KEY: "$S:@api"
        """,
        "services.web.env.KEY",
        7,
        ("`$S:`", "$S:@service/db-password"),
    ),
    (
        "env-list-bad-ref",
        """
          web:
            image: nginx
            env:
              - name: KEY
                value: "$S:"
        """,
        "services.web.env[0].value",
        8,
        ("`$S:`",),
    ),
    (
        "health-check-exec",
        """
          web:
            image: nginx
            health:
              check:
                type: exec
                command: ["true"]
        """,
        "services.web.health.check.type",
        8,
        ("`exec` is not a known type", "did you mean `command`?"),
    ),
    (
        "health-without-check",
        """
          web:
            image: nginx
            health:
              interval: 5s
        """,
        "services.web.health.check",
        7,
        ("required field is missing",),
    ),
    (
        "alias-and-field",
        """
          web:
            image: nginx
            capabilities: [NET_ADMIN]
            cap_add: [SYS_ADMIN]
        """,
        "services.web.cap_add",
        7,
        ("another name for `capabilities`",),
    ),
    (
        "host-network-not-bool",
        """
          web:
            image: nginx
            host_network: "please"
        """,
        "services.web.host_network",
        6,
        ("must be true or false",),
    ),
    (
        "restart-kind-typo",
        """
          web:
            image: nginx
            restart_policy:
              kind: unless-stopped
        """,
        "services.web.restart_policy.kind",
        7,
        ("did you mean `unless_stopped`?",),
    ),
    (
        "bool-as-string",
        """
          web:
            image: nginx
            privileged: "yes"
        """,
        "services.web.privileged",
        6,
        ("expected true or false", "'yes'"),
    ),
    (
        "duplicate-key",
        """
          web:
            image: nginx
            image: httpd
        """,
        "services.web.image",
        6,
        ("duplicate key `image`", "line 5"),
    ),
    (
        "service-not-a-mapping",
        """
          web: nginx
        """,
        "services.web",
        4,
        ("expected a mapping", "'nginx'"),
    ),
    (
        "service-name-not-dns",
        """
          Web_Server:
            image: nginx
        """,
        "services.Web_Server",
        4,
        ("not DNS-safe",),
    ),
    (
        "init-step-unknown-action",
        """
          web:
            image: nginx
            init:
              steps:
                - id: migrate
                  uses: init.exec
        """,
        "services.web.init.steps[0].uses",
        9,
        ("did you mean `init.run`?",),
    ),
]


@pytest.mark.parametrize(
    ("body", "path", "line", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_broken_service_is_located_and_explained(
    body: str, path: str, line: int, fragments: tuple[str, ...]
) -> None:
    text = HEAD + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n"
    issues = issues_of(text)
    at_path = [i for i in issues if i.path == path]
    assert at_path, f"nothing at {path}; got:\n" + "\n".join(map(str, issues))
    issue = at_path[0]
    assert issue.file == "app.zlayer.yml"
    assert issue.line == line, str(issue)
    assert issue.column >= 1
    for fragment in fragments:
        assert fragment in issue.message, str(issue)
    assert str(issue).startswith(f"app.zlayer.yml:{line}:{issue.column}: {path}: ")


TOP_LEVEL: list[tuple[str, str, str, int, tuple[str, ...]]] = [
    ("missing-version", "deployment: app\n", "version", 1, ("required field is missing",)),
    ("version-v2", "version: v2\ndeployment: app\n", "version", 1, ("`v2` is not one of v1",)),
    (
        "deployment-not-dns",
        "version: v1\ndeployment: My_App\n",
        "deployment",
        2,
        ("not a DNS-safe name",),
    ),
    (
        "top-level-typo",
        "version: v1\ndeployment: app\nservces: {}\n",
        "servces",
        3,
        ("unknown key `servces`", "did you mean `services`?"),
    ),
    (
        "services-is-a-list",
        "version: v1\ndeployment: app\nservices:\n  - web\n",
        "services",
        4,
        ("expected a mapping", "a list"),
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "line", "fragments"),
    [case[1:] for case in TOP_LEVEL],
    ids=[case[0] for case in TOP_LEVEL],
)
def test_broken_top_level(text: str, path: str, line: int, fragments: tuple[str, ...]) -> None:
    issues = issues_of(text)
    issue = next(i for i in issues if i.path == path)
    assert issue.line == line
    for fragment in fragments:
        assert fragment in issue.message, str(issue)


FILE_LEVEL: list[tuple[str, str | bytes, int, tuple[str, ...]]] = [
    ("empty", "", 0, ("the file is empty",)),
    ("only-comments", "# nothing here\n", 0, ("the file is empty",)),
    (
        "two-documents",
        "version: v1\ndeployment: a\n---\nversion: v1\n",
        3,
        ("second YAML document",),
    ),
    ("top-level-list", "- version: v1\n", 1, ("top level must be a mapping", "a list")),
    ("top-level-scalar", "hello\n", 1, ("top level must be a mapping", "'hello'")),
    ("bad-indentation", "version: v1\n deployment: app\n", 2, ("invalid YAML",)),
    ("unclosed-bracket", "version: v1\nservices: [web\n", 3, ("invalid YAML",)),
    ("tab-indent", "version: v1\nservices:\n\tweb: {}\n", 3, ("invalid YAML",)),
    ("latin-1", "version: v1\ndeployment: caf\xe9\n".encode("latin-1"), 2, ("not UTF-8",)),
    ("utf-16", "version: v1\n".encode("utf-16"), 1, ("UTF-16",)),
    ("unknown-tag", "version: !Ref v1\ndeployment: app\n", 1, ("cannot read this value",)),
    (
        "python-tag",
        "version: v1\ndeployment: !!python/object:os.system {}\n",
        2,
        ("unsupported YAML tag",),
    ),
    ("bad-int-tag", "version: v1\ndeployment: !!int abc\n", 2, ("cannot read this value",)),
    (
        "recursive-alias",
        "version: v1\ndeployment: app\nservices: &s {web: *s}\n",
        3,
        ("refers to itself",),
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [case[1:] for case in FILE_LEVEL],
    ids=[case[0] for case in FILE_LEVEL],
)
def test_broken_file_is_one_clear_issue(
    text: str | bytes, line: int, fragments: tuple[str, ...]
) -> None:
    issues = issues_of(text)
    issue = issues[0]
    assert issue.line == line, str(issue)
    for fragment in fragments:
        assert fragment in issue.message, str(issue)


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["version: v1", "deployment: app", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    issues = issues_of("\n".join(lines) + "\n")
    assert any("too large" in i.message for i in issues)


def test_every_error_in_the_file_is_reported() -> None:
    text = HEAD + textwrap.indent(
        textwrap.dedent(
            """\
            web:
              image: nginx
              volumes: []
              endpoints:
                - {name: http, protocol: http, port: 99999}
            api:
              image: {pull_policy: always}
              depends:
                - service: nowhere
            """
        ),
        "  ",
    )
    paths = {i.path for i in issues_of(text)}
    assert {
        "services.web.volumes",
        "services.web.endpoints[0].port",
        "services.api.image.name",
        "services.api.depends[0].service",
    } <= paths


def test_reading_problems_and_validation_problems_come_together() -> None:
    text = "version: v1\ndeployment: a\ndeployment: b\nservices: {w: {image: x, imag: y}}\n"
    messages = [i.message for i in issues_of(text)]
    assert any("duplicate key `deployment`" in m for m in messages)
    assert any("did you mean `image`?" in m for m in messages)


def test_issues_come_in_file_order() -> None:
    text = HEAD + "  b:\n    image: x\n    bogus: 1\n  a:\n    imag: y\n"
    issues = issues_of(text)
    assert [i.line for i in issues] == sorted(i.line for i in issues)
    assert any("did you mean `image`?" in i.message for i in issues)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.zlayer.yml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_spec_error_text_lists_every_issue() -> None:
    text = HEAD + "  web:\n    image: nginx\n    volumes: []\n    ports: []\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "x.zlayer.yml")
    assert str(caught.value).count("x.zlayer.yml:") == 2
    assert caught.value.summary().startswith("2 problems")
