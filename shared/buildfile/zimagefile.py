"""The ZImagefile: its models, reading one with located errors, and its Dockerfile.

A ZImagefile is YAML in one of four modes, told apart by a top-level key:
``runtime`` (a runtime template), ``base`` + ``steps`` (one stage), ``stages``
(named stages in order, the last is the output) and ``wasm`` (built by
zlayerctl itself, shared/buildfile/wasm.py, not here). :func:`load_zimagefile`
reads and validates a file; :func:`to_dockerfile` translates it into a Dockerfile that
buildah builds, remembering which ZImagefile line each instruction came from,
so a failing step is reported at its place in the ZImagefile.

Cache mounts become ``RUN --mount=type=cache,...``; a multi-line ``run``
becomes ``/bin/sh -c`` of the whole script (a Dockerfile line cannot hold it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from shared.buildfile import runtimes
from shared.buildfile.located import BuildFileError, Document, Strict
from shared.spec.errors import describe_value, did_you_mean
from shared.spec.located_yaml import PathKey

Scalar = str | int | float | bool
StrOrList = str | list[str]

MODE_KEYS = ("runtime", "base", "stages", "wasm")
STEP_ACTIONS = ("run", "copy", "add", "env", "workdir", "user")
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PORT = re.compile(r"^\d{1,5}(/(tcp|udp|sctp))?$")
_CHMOD = re.compile(r"^[0-7]{3,4}$")
_OWNER = re.compile(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$")


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------- models


class CacheMount(Strict):
    """A directory kept between builds for one ``run`` step (package caches)."""

    target: str
    id: str = ""
    sharing: Literal["shared", "private", "locked"] = "shared"


class Step(Strict):
    """One step: exactly one of run, copy, add, env, workdir, user."""

    run: StrOrList | None = None
    cache: list[CacheMount] = Field(default_factory=list)
    copy_: StrOrList | None = Field(default=None, alias="copy")
    add: StrOrList | None = None
    to: str | None = None
    from_: str | None = Field(default=None, alias="from")
    owner: str | None = None
    chmod: str | int | None = None
    env: dict[str, Scalar] | None = None
    workdir: str | None = None
    user: str | None = None

    @field_validator("chmod")
    @classmethod
    def _octal_mode(cls, value: str | int | None) -> str | None:
        if value is None:
            return None
        text = str(value)
        if not _CHMOD.match(text):
            if isinstance(value, int):
                raise ValueError(
                    f"YAML read this mode as the number {value} (0755 is octal to it); "
                    'write the mode quoted, like "755"'
                )
            raise ValueError(f'`{text}` is not an octal mode; write it like "755"')
        return text

    @field_validator("owner")
    @classmethod
    def _owner_form(cls, value: str | None) -> str | None:
        if value is not None and not _OWNER.match(value):
            raise ValueError(f'`{value}` is not an owner; write "uid:gid" or "user:group"')
        return value

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [name for name in STEP_ACTIONS if self.action_value(name) is not None]
        if len(actions) != 1:
            have = f"has {' and '.join(actions)}" if actions else "has none"
            raise ValueError(
                f"a step does exactly one of {', '.join(STEP_ACTIONS)}; this one {have}"
            )
        action = actions[0]
        if action in ("copy", "add") and not self.to:
            raise ValueError(f"a `{action}` step needs `to:` (where the files go)")
        misplaced = [
            key
            for key, allowed, present in (
                ("to", ("copy", "add"), self.to is not None),
                ("from", ("copy",), self.from_ is not None),
                ("owner", ("copy", "add"), self.owner is not None),
                ("chmod", ("copy", "add"), self.chmod is not None),
                ("cache", ("run",), bool(self.cache)),
            )
            if present and action not in allowed
        ]
        if misplaced:
            raise ValueError(f"`{misplaced[0]}` does not apply to a `{action}` step")
        return self

    def action_value(self, name: str) -> Any:
        return getattr(self, "copy_" if name == "copy" else name)

    @property
    def action(self) -> str:
        return next(name for name in STEP_ACTIONS if self.action_value(name) is not None)


class HealthCheck(Strict):
    """The image's HEALTHCHECK (kept by the docker image format only)."""

    cmd: StrOrList
    interval: str | None = None
    timeout: str | None = None
    start_period: str | None = None
    retries: int | None = None


class ImageMeta(Strict):
    """What the final image carries: its config, not its files."""

    env: dict[str, Scalar] | None = None
    expose: int | str | list[int | str] | None = None
    cmd: StrOrList | None = None
    entrypoint: StrOrList | None = None
    user: str | None = None
    workdir: str | None = None
    labels: dict[str, Scalar] | None = None
    volumes: StrOrList | None = None
    healthcheck: HealthCheck | None = None
    stopsignal: str | int | None = None

    @field_validator("expose")
    @classmethod
    def _ports(
        cls, value: int | str | list[int | str] | None
    ) -> int | str | list[int | str] | None:
        for port in value if isinstance(value, list) else [] if value is None else [value]:
            if not _PORT.match(str(port)):
                raise ValueError(f"`{port}` is not a port; write 8080 or 8080/udp")
        return value


class Stage(ImageMeta):
    """One named stage: a base image or an earlier stage, then steps."""

    base: str | None = None
    from_: str | None = Field(default=None, alias="from")
    steps: list[Step] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_origin(self) -> Stage:
        if (self.base is None) == (self.from_ is None):
            raise ValueError(
                "a stage starts from exactly one of `base` (an image) or `from` (an earlier stage)"
            )
        return self


class FileHeader(ImageMeta):
    version: Literal["1"] | None = None
    args: dict[str, Scalar | None] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class RuntimeFile(FileHeader):
    runtime: str

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in runtimes.TEMPLATES:
            names = list(runtimes.TEMPLATES)
            raise ValueError(
                f"`{value}` is not a runtime template; one of {', '.join(names)}"
                + did_you_mean(value, names)
            )
        return value


class SingleStageFile(FileHeader):
    base: str
    steps: list[Step] = Field(default_factory=list)


class MultiStageFile(FileHeader):
    stages: dict[str, Stage]

    @field_validator("stages")
    @classmethod
    def _named_stages(cls, value: dict[str, Stage]) -> dict[str, Stage]:
        if not value:
            raise ValueError("`stages` needs at least one stage")
        for name in value:
            if not _STAGE_NAME.match(name):
                raise ValueError(
                    f"`{name}` is not a stage name: lowercase letters, digits, `_`, `.` and `-`"
                )
        return value


class WasmSettings(Strict):
    target: Literal["preview1", "preview2"] = "preview2"
    optimize: bool = False
    language: str | None = None
    wit: str | None = None
    output: str | None = None


class WasmFile(Strict):
    version: Literal["1"] | None = None
    wasm: WasmSettings


ZImagefile = RuntimeFile | SingleStageFile | MultiStageFile | WasmFile
_MODELS: dict[str, type[Strict]] = {
    "runtime": RuntimeFile,
    "base": SingleStageFile,
    "stages": MultiStageFile,
    "wasm": WasmFile,
}


# ---------------------------------------------------------------- reading


@dataclass
class LoadedZImagefile:
    """A valid ZImagefile and where its parts sit (for located build errors)."""

    model: ZImagefile
    document: Document

    @property
    def filename(self) -> str:
        return self.document.filename

    @property
    def mode(self) -> str:
        return {
            RuntimeFile: "runtime",
            SingleStageFile: "single-stage",
            MultiStageFile: "multi-stage",
            WasmFile: "wasm",
        }[type(self.model)]


def load_zimagefile(path: str | Path) -> LoadedZImagefile:
    """Read and validate a ZImagefile; :class:`BuildFileError` says what is wrong and where."""
    document, data = Document.read(path, "ZImagefile")
    return LoadedZImagefile(validate_zimagefile(document, data), document)


def parse_zimagefile(text: str, filename: str = "ZImagefile") -> LoadedZImagefile:
    document = Document(filename, "ZImagefile")
    data = document.parse(text)
    return LoadedZImagefile(validate_zimagefile(document, data), document)


def validate_zimagefile(document: Document, data: Any) -> ZImagefile:
    if not isinstance(data, dict):
        raise document.error_at(
            (),
            f"a ZImagefile is a mapping with one of {_keys_sentence()}, not {describe_value(data)}",
        )
    modes = [key for key in MODE_KEYS if key in data]
    if len(modes) > 1:
        raise document.error_at(
            (modes[1],),
            f"`{modes[0]}` and `{modes[1]}` are different kinds of ZImagefile; use one",
            at_key=True,
        )
    if not modes:
        known = {name for model in _MODELS.values() for name in _field_names(model)} | {"steps"}
        for key in data:
            if key not in known:
                raise document.error_at(
                    (key,),
                    f"unknown key `{key}`{did_you_mean(key, sorted(known))}",
                    at_key=True,
                )
        raise document.error_at((), f"a ZImagefile needs one of {_keys_sentence()}")
    model = _MODELS[modes[0]]
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise document.validation_error(exc, data) from None
    assert isinstance(parsed, RuntimeFile | SingleStageFile | MultiStageFile | WasmFile)
    return parsed


def _field_names(model: type[Strict]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _keys_sentence() -> str:
    return "`runtime`, `base` (with `steps`), `stages` or `wasm`"


# ---------------------------------------------------------------- translation


@dataclass
class Dockerfile:
    """A generated Dockerfile and, per instruction, the ZImagefile place it came from."""

    text: str
    origins: list[tuple[str, str]] = field(default_factory=list)  # (instruction, "file:line")
    stages: list[str] = field(default_factory=list)

    def origin_of(self, instruction: str) -> str:
        """Where in the ZImagefile an instruction buildah names came from ("" if unknown)."""
        wanted = _squash(instruction)
        for text, origin in self.origins:
            if _squash(text) == wanted or _squash(text).startswith(wanted):
                return origin
        return ""


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


class _Writer:
    def __init__(self, loaded: LoadedZImagefile) -> None:
        self.loaded = loaded
        self.lines: list[str] = []
        self.origins: list[tuple[str, str]] = []
        self.stages: list[str] = []

    def emit(self, instruction: str, path: PathKey | None = None) -> None:
        self.lines.append(instruction)
        if path is not None:
            line, _ = self.loaded.document.mark(path)
            self.origins.append((instruction, f"{self.loaded.filename}:{line}"))

    def error(self, path: PathKey, message: str, at_key: bool = False) -> BuildFileError:
        return self.loaded.document.error_at(path, message, at_key)


def to_dockerfile(loaded: LoadedZImagefile, context: Path | None = None) -> Dockerfile:
    """The Dockerfile a ZImagefile means; ``context`` fills runtime templates' details."""
    model = loaded.model
    writer = _Writer(loaded)
    if isinstance(model, WasmFile):
        raise writer.error(
            ("wasm",),
            "this ZImagefile is a WebAssembly build; build it with `zlayerctl wasm build`",
            at_key=True,
        )
    _args(writer, model.args, global_scope=True)
    if isinstance(model, RuntimeFile):
        template = runtimes.render(model.runtime, context)
        writer.lines.append(f"# runtime template {model.runtime}")
        for line in template.splitlines():
            writer.emit(line, ("runtime",) if line and not line.startswith("#") else None)
        _meta(writer, model, ())
    elif isinstance(model, SingleStageFile):
        writer.emit(f"FROM {model.base}", ("base",))
        writer.stages.append("")
        _args(writer, model.args, global_scope=False)
        _stage_body(writer, model.workdir, model.env, model.steps, (), stage_names=[])
        _meta(writer, model.model_copy(update={"workdir": None, "env": None}), ())
    else:
        names = list(model.stages)
        for index, (name, stage) in enumerate(model.stages.items()):
            path: PathKey = ("stages", name)
            earlier = names[:index]
            if stage.from_ is not None:
                if stage.from_ not in earlier:
                    raise writer.error((*path, "from"), _unknown_stage(stage.from_, earlier, names))
                writer.emit(f"FROM {stage.from_} AS {name}", (*path, "from"))
            else:
                writer.emit(f"FROM {stage.base} AS {name}", (*path, "base"))
            writer.stages.append(name)
            _args(writer, model.args, global_scope=False)
            _stage_body(writer, stage.workdir, stage.env, stage.steps, path, stage_names=earlier)
            stage_meta = stage.model_copy(update={"workdir": None, "env": None})
            _meta(writer, stage_meta, path)
            if index == len(names) - 1:
                _meta(writer, model, ())
    return Dockerfile("\n".join(writer.lines) + "\n", writer.origins, writer.stages)


def _unknown_stage(name: str, earlier: list[str], every: list[str]) -> str:
    if name in every:
        return f"stage `{name}` comes later; a stage can only use stages defined before it"
    if not earlier:
        return f"there is no stage `{name}`: no stage is defined before this one"
    return (
        f"there is no stage `{name}` before this one (stages so far: {', '.join(earlier)})"
        + did_you_mean(name, earlier)
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _pairs(values: dict[str, Scalar]) -> str:
    return " ".join(f"{key}={_quote(_text(value))}" for key, value in values.items())


def _args(writer: _Writer, args: dict[str, Scalar | None] | None, *, global_scope: bool) -> None:
    for key, value in (args or {}).items():
        if global_scope and value is not None:
            writer.emit(f"ARG {key}={_quote(_text(value))}", ("args", key))
        else:
            writer.emit(f"ARG {key}", ("args", key))


def _stage_body(
    writer: _Writer,
    workdir: str | None,
    env: dict[str, Scalar] | None,
    steps: list[Step],
    path: PathKey,
    stage_names: list[str],
) -> None:
    if workdir:
        writer.emit(f"WORKDIR {workdir}", (*path, "workdir"))
    if env:
        writer.emit(f"ENV {_pairs(env)}", (*path, "env"))
    for index, step in enumerate(steps):
        _step(writer, step, (*path, "steps", index), stage_names)


def _step(writer: _Writer, step: Step, path: PathKey, stage_names: list[str]) -> None:
    action = step.action
    value = step.action_value(action)
    where = (*path, action)
    if action == "run":
        mounts = "".join(
            f"--mount=type=cache,target={c.target}"
            + (f",id={c.id}" if c.id else "")
            + f",sharing={c.sharing} "
            for c in step.cache
        )
        if isinstance(value, list):
            command = json.dumps(value)
        elif "\n" in value.strip():
            command = json.dumps(["/bin/sh", "-c", value])
        else:
            command = value.strip()
        writer.emit(f"RUN {mounts}{command}", where)
    elif action in ("copy", "add"):
        flags = ""
        if step.from_ is not None:
            looks_like_image = any(c in step.from_ for c in ":/@")
            if step.from_ not in stage_names and not looks_like_image:
                raise writer.error((*path, "from"), _unknown_stage(step.from_, stage_names, []))
            flags += f"--from={step.from_} "
        if step.owner:
            flags += f"--chown={step.owner} "
        if step.chmod:
            flags += f"--chmod={step.chmod} "
        sources = value if isinstance(value, list) else [value]
        writer.emit(f"{action.upper()} {flags}{json.dumps([*sources, step.to])}", where)
    elif action == "env":
        writer.emit(f"ENV {_pairs(value)}", where)
    elif action == "workdir":
        writer.emit(f"WORKDIR {value}", where)
    else:
        writer.emit(f"USER {value}", where)


def _command(value: StrOrList) -> str:
    return json.dumps(value) if isinstance(value, list) else value


def _meta(writer: _Writer, meta: ImageMeta, path: PathKey) -> None:
    if meta.env:
        writer.emit(f"ENV {_pairs(meta.env)}", (*path, "env"))
    if meta.workdir:
        writer.emit(f"WORKDIR {meta.workdir}", (*path, "workdir"))
    if meta.labels:
        writer.emit(f"LABEL {_pairs(meta.labels)}", (*path, "labels"))
    if meta.expose is not None:
        ports = meta.expose if isinstance(meta.expose, list) else [meta.expose]
        writer.emit(f"EXPOSE {' '.join(str(p) for p in ports)}", (*path, "expose"))
    if meta.volumes:
        volumes = meta.volumes if isinstance(meta.volumes, list) else [meta.volumes]
        writer.emit(f"VOLUME {json.dumps(volumes)}", (*path, "volumes"))
    if meta.healthcheck is not None:
        check = meta.healthcheck
        options = "".join(
            f"--{name.replace('_', '-')}={value} "
            for name, value in (
                ("interval", check.interval),
                ("timeout", check.timeout),
                ("start_period", check.start_period),
                ("retries", check.retries),
            )
            if value is not None
        )
        writer.emit(f"HEALTHCHECK {options}CMD {_command(check.cmd)}", (*path, "healthcheck"))
    if meta.stopsignal is not None:
        writer.emit(f"STOPSIGNAL {meta.stopsignal}", (*path, "stopsignal"))
    if meta.user:
        writer.emit(f"USER {meta.user}", (*path, "user"))
    if meta.entrypoint is not None:
        writer.emit(f"ENTRYPOINT {_command(meta.entrypoint)}", (*path, "entrypoint"))
    if meta.cmd is not None:
        writer.emit(f"CMD {_command(meta.cmd)}", (*path, "cmd"))
