"""ZPipeline files: several images built in dependency order.

Owns reading a ZPipeline (``${VAR}`` substitution from ``vars`` and
``--set``, ``defaults`` merged under each image), checking it before anything
builds (unknown or cyclic dependencies, missing files: each one located
sentence), choosing a subset (``--only`` with what it depends on) and
ordering it into waves: wave 0 depends on nothing, wave N only on earlier
waves; the images of one wave build in parallel.

Paths (``file``, ``context``) are relative to the directory of the ZPipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from shared.buildfile.located import Document, Strict, file_error
from shared.spec.errors import describe_value, did_you_mean
from shared.spec.located_yaml import PathKey

Scalar = str | int | float | bool
ImageFormat = Literal["oci", "docker"]
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class PipelineImage(Strict):
    file: str
    context: str = "."
    tags: list[str] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    build_args: dict[str, Scalar] = Field(default_factory=dict)
    no_cache: bool | None = None
    format: ImageFormat | None = None
    target: str | None = None


class PipelineDefaults(Strict):
    format: ImageFormat = "oci"
    build_args: dict[str, Scalar] = Field(default_factory=dict)
    no_cache: bool = False


class PushSettings(Strict):
    after_all: bool = False


class ZPipelineModel(Strict):
    version: Literal["1"] | None = None
    vars: dict[str, Scalar] = Field(default_factory=dict)
    defaults: PipelineDefaults = Field(default_factory=PipelineDefaults)
    images: dict[str, PipelineImage]
    push: PushSettings = Field(default_factory=PushSettings)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("images")
    @classmethod
    def _some_images(cls, value: dict[str, PipelineImage]) -> dict[str, PipelineImage]:
        if not value:
            raise ValueError("`images` lists no images")
        return value


@dataclass(frozen=True)
class PlannedImage:
    """One image of a pipeline, everything resolved: absolute paths, merged build args."""

    name: str
    file: Path
    context: Path
    tags: list[str]
    depends_on: list[str]
    build_args: dict[str, str]
    no_cache: bool
    format: ImageFormat
    target: str | None = None

    @property
    def is_zimagefile(self) -> bool:
        return is_zimagefile(self.file)


@dataclass
class Pipeline:
    filename: str
    images: dict[str, PlannedImage]
    push_after_all: bool = False
    vars: dict[str, str] = field(default_factory=dict)

    def select(self, only: list[str]) -> list[str]:
        """``only`` and everything they depend on, in file order; all images if empty."""
        if not only:
            return list(self.images)
        for name in only:
            if name not in self.images:
                raise file_error(
                    self.filename,
                    f"--only names `{name}`, which is not an image of this pipeline "
                    f"({', '.join(self.images)}){did_you_mean(name, list(self.images))}",
                )
        wanted: set[str] = set()
        pending = list(only)
        while pending:
            name = pending.pop()
            if name not in wanted:
                wanted.add(name)
                pending.extend(self.images[name].depends_on)
        return [name for name in self.images if name in wanted]

    def waves(self, selected: list[str] | None = None) -> list[list[str]]:
        """``selected`` (default: all) in waves; each depends only on earlier ones."""
        remaining = list(self.images if selected is None else selected)
        done: set[str] = set()
        waves: list[list[str]] = []
        while remaining:
            wave = [n for n in remaining if all(d in done for d in self.images[n].depends_on)]
            assert wave, "cycles are refused when the pipeline is read"
            waves.append(wave)
            done.update(wave)
            remaining = [n for n in remaining if n not in done]
        return waves


def is_zimagefile(path: Path) -> bool:
    """A ZImagefile by its name (ZImagefile*, *.yml, *.yaml); anything else is a Dockerfile."""
    return path.name.startswith("ZImagefile") or path.suffix in (".yml", ".yaml")


def load_pipeline(path: str | Path, overrides: dict[str, str] | None = None) -> Pipeline:
    """Read, substitute, validate and check a ZPipeline; :class:`BuildFileError` if it is wrong."""
    document, data = Document.read(path, "ZPipeline")
    if not isinstance(data, dict):
        raise document.error_at(
            (), f"a ZPipeline is a mapping with `images`, not {describe_value(data)}"
        )
    variables = _variables(document, data, overrides or {})
    substituted = {
        key: value if key == "vars" else _substitute(document, value, (key,), variables)
        for key, value in data.items()
    }
    try:
        model = ZPipelineModel.model_validate(substituted)
    except ValidationError as exc:
        raise document.validation_error(exc, substituted) from None
    base_dir = Path(document.filename).resolve().parent
    images = {
        name: _plan(document, name, image, model.defaults, base_dir)
        for name, image in model.images.items()
    }
    _check_dependencies(document, images)
    return Pipeline(document.filename, images, model.push.after_all, variables)


def _variables(
    document: Document, data: dict[str, Any], overrides: dict[str, str]
) -> dict[str, str]:
    raw = data.get("vars", {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise document.error_at(("vars",), f"expected a mapping, got {describe_value(raw)}")
    variables: dict[str, str] = {}
    for key, value in raw.items():
        if not _VAR_NAME.match(key):
            raise document.error_at(("vars", key), f"`{key}` is not a variable name", at_key=True)
        if not isinstance(value, str | int | float | bool):
            raise document.error_at(
                ("vars", key), f"a variable is a string or number, not {describe_value(value)}"
            )
        variables[key] = _text(value)
    variables.update(overrides)
    return variables


def _substitute(document: Document, value: Any, path: PathKey, variables: dict[str, str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in variables:
                known = sorted(variables)
                hint = did_you_mean(name, known) or (
                    f" (defined: {', '.join(known)})" if known else " (`vars` defines none)"
                )
                raise document.error_at(
                    path, f"unknown variable `${{{name}}}`{hint}; define it in `vars` or with --set"
                )
            return variables[name]

        return _VAR.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(document, item, (*path, i), variables) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {k: _substitute(document, v, (*path, k), variables) for k, v in value.items()}
    return value


def _plan(
    document: Document,
    name: str,
    image: PipelineImage,
    defaults: PipelineDefaults,
    base_dir: Path,
) -> PlannedImage:
    where: PathKey = ("images", name)
    context = (base_dir / image.context).resolve()
    if not context.is_dir():
        raise document.error_at(
            (*where, "context"), f"the build context {image.context} is not a directory"
        )
    file = (base_dir / image.file).resolve()
    if not file.is_file():
        raise document.error_at((*where, "file"), f"no such file {image.file}")
    return PlannedImage(
        name=name,
        file=file,
        context=context,
        tags=list(image.tags),
        depends_on=list(image.depends_on),
        build_args={k: _text(v) for k, v in {**defaults.build_args, **image.build_args}.items()},
        no_cache=defaults.no_cache if image.no_cache is None else image.no_cache,
        format=image.format or defaults.format,
        target=image.target,
    )


def _check_dependencies(document: Document, images: dict[str, PlannedImage]) -> None:
    names = list(images)
    for name, image in images.items():
        for index, dependency in enumerate(image.depends_on):
            where = ("images", name, "depends_on", index)
            if dependency == name:
                raise document.error_at(where, f"image `{name}` cannot depend on itself")
            if dependency not in images:
                others = [n for n in names if n != name]
                raise document.error_at(
                    where,
                    f"unknown image `{dependency}` (images: {', '.join(names)})"
                    + did_you_mean(dependency, others),
                )
    cycle = _find_cycle(images)
    if cycle:
        raise document.error_at(
            ("images", cycle[0], "depends_on"),
            f"the images {' -> '.join([*cycle, cycle[0]])} depend on each other in a cycle",
        )


def _find_cycle(images: dict[str, PlannedImage]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for dependency in images[name].depends_on:
            if state.get(dependency) == 1:
                return path[path.index(dependency) :]
            if dependency not in state:
                found = visit(dependency)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return []

    for name in images:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []
