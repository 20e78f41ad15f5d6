"""What ``zlayerctl validate`` says about a spec, as one value: ``check_spec``.

Both ways validate runs use it: zlayerctl itself when schedd does not answer,
and schedd's ``Validate``, which has the spec models loaded already, so
zlayerctl need not load them. The result is the wire's ``SpecCheck``, which
zlayerctl prints the same way whichever made it.
"""

from __future__ import annotations

from shared.spec.errors import SpecError
from shared.spec.loader import parse_spec
from shared.spec.models import AdaptiveScale, FixedScale, ServiceSpec
from shared.spec.support import node_support
from shared.wire.scheduler import EndpointSummary, ServiceSummary, SpecCheck, SpecProblem


def check_spec(text: str | bytes, filename: str) -> SpecCheck:
    """Every problem of ``text`` (labelled ``filename``), or its services and what this
    node would refuse or only warn about."""
    try:
        spec = parse_spec(text, filename)
    except SpecError as exc:
        return problems_of(exc)
    support = node_support(spec, text, filename)
    return SpecCheck(
        valid=True,
        deployment=spec.deployment,
        services=[_summary(name, service) for name, service in spec.services.items()],
        refusals=list(support.refusals),
        warnings=list(support.warnings),
    )


def problems_of(error: SpecError) -> SpecCheck:
    """The check of a spec ``error`` was raised for."""
    return SpecCheck(
        valid=False,
        problems=[
            SpecProblem(file=i.file, line=i.line, column=i.column, path=i.path, message=i.message)
            for i in error.issues
        ],
        total=error.total,
    )


def _summary(name: str, service: ServiceSpec) -> ServiceSummary:
    return ServiceSummary(
        name=name,
        rtype=service.rtype,
        schedule=(service.schedule or "") if service.rtype == "cron" else "",
        image=service.image.name,
        endpoints=[
            EndpointSummary(
                name=e.name, protocol=e.protocol, port=e.port, public=e.expose == "public"
            )
            for e in service.endpoints
        ],
        scale=_scale(service),
    )


def _scale(service: ServiceSpec) -> str:
    if service.rtype != "service" and "scale" not in service.model_fields_set:
        return "-"  # jobs and cron runs are started per trigger, not kept at a count
    scale = service.scale
    if isinstance(scale, FixedScale):
        return f"fixed {scale.replicas}"
    if isinstance(scale, AdaptiveScale):
        return f"adaptive {scale.min}-{scale.max}"
    return "manual"
