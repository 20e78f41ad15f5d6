"""The v1 deployment spec: models, loading with located errors, dumping, schema.

Public surface::

    load_spec(path) -> DeploymentSpec          # raises SpecError
    parse_spec(text, filename) -> DeploymentSpec
    dump_spec(spec, "yaml" | "json") -> str
    spec_to_data(spec) -> dict                 # JSON-able, defaults filled in
    spec_json_schema() -> dict
    SpecError (.issues: list[SpecIssue]), SpecIssue
    DeploymentSpec, ServiceSpec and the models in shared.spec.models
    parse_duration / format_duration / parse_size / format_size, Duration, Size
    MAX_SPEC_BYTES and the other limits in shared.spec.limits
"""

from __future__ import annotations

from shared.spec.errors import SpecError, SpecIssue
from shared.spec.limits import MAX_SPEC_BYTES
from shared.spec.loader import dump_spec, load_spec, parse_spec, spec_json_schema, spec_to_data
from shared.spec.models import (
    AdaptiveScale,
    DependsSpec,
    DeploymentSpec,
    EndpointSpec,
    FixedScale,
    HealthSpec,
    ImageSpec,
    ManualScale,
    ServiceSpec,
)
from shared.spec.quantities import (
    Duration,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "MAX_SPEC_BYTES",
    "AdaptiveScale",
    "DependsSpec",
    "DeploymentSpec",
    "Duration",
    "EndpointSpec",
    "FixedScale",
    "HealthSpec",
    "ImageSpec",
    "ManualScale",
    "ServiceSpec",
    "Size",
    "SpecError",
    "SpecIssue",
    "dump_spec",
    "format_duration",
    "format_size",
    "load_spec",
    "parse_duration",
    "parse_size",
    "parse_spec",
    "spec_json_schema",
    "spec_to_data",
]
