"""Rules of a deployment spec that span fields or services.

Owns the checks a field's type cannot express: a cron job has a schedule and
nothing else does, endpoint names are unique within a service, ``depends``
names services that exist and forms no cycle, an alias is not given beside the
field it stands for. They run on the raw document (plain dicts and lists, any
type may be wrong) so that they can be reported together with shape errors,
each with the exact path of the offending field.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PathSegment", "Problem", "format_path", "semantic_problems"]

PathSegment = str | int

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_@$-]+$")
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def format_path(path: tuple[PathSegment, ...] | list[PathSegment]) -> str:
    """``("services", "web", "endpoints", 0, "port")`` -> ``services.web.endpoints[0].port``."""
    out = ""
    for segment in path:
        if isinstance(segment, int):
            out += f"[{segment}]"
        elif _PLAIN_KEY.match(segment):
            out += f".{segment}" if out else segment
        else:
            out += f'["{segment}"]'
    return out


@dataclass(frozen=True)
class Problem:
    """A broken rule at ``path``; ``at_key`` points at the key rather than its value."""

    path: tuple[PathSegment, ...]
    message: str
    at_key: bool = False

    def describe(self) -> str:
        return f"{format_path(self.path)}: {self.message}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def semantic_problems(data: Any) -> list[Problem]:
    """Every cross-field problem in a raw spec document; wrong types are skipped
    here because validation reports them."""
    if not isinstance(data, dict):
        return []
    services = data.get("services")
    if not isinstance(services, dict):
        return []
    problems: list[Problem] = []
    names = [name for name in services if isinstance(name, str)]
    graph: dict[str, list[tuple[int, str]]] = {}
    for name, service in services.items():
        if not isinstance(name, str):
            continue
        base: tuple[PathSegment, ...] = ("services", name)
        if not _SERVICE_NAME.match(name):
            problems.append(
                Problem(
                    base,
                    f"service name {name!r} is not DNS-safe: use lowercase letters, digits "
                    "and hyphens (it becomes the DNS name `<service>.service`)",
                    at_key=True,
                )
            )
        if not isinstance(service, dict):
            continue
        problems += _schedule_problems(base, service)
        problems += _endpoint_problems(base, service)
        problems += _alias_problems(base, service)
        problems += _init_problems(base, service)
        graph[name] = []
        depends = service.get("depends")
        if not isinstance(depends, list):
            continue
        for index, entry in enumerate(depends):
            if not isinstance(entry, dict) or not isinstance(entry.get("service"), str):
                continue
            target = entry["service"]
            where = (*base, "depends", index, "service")
            if target == name:
                problems.append(Problem(where, "a service cannot depend on itself"))
            elif target not in services:
                problems.append(
                    Problem(
                        where,
                        f"there is no service `{target}` in this deployment"
                        + _did_you_mean(target, [n for n in names if n != name]),
                    )
                )
            else:
                graph[name].append((index, target))
    problems += _cycle_problems(graph)
    return problems


def _schedule_problems(base: tuple[PathSegment, ...], service: dict[Any, Any]) -> list[Problem]:
    rtype = service.get("rtype", "service")
    has_schedule = service.get("schedule") is not None
    if rtype == "cron" and not has_schedule:
        where = (*base, "rtype") if "rtype" in service else base
        return [
            Problem(
                where,
                'a cron job needs a `schedule`, e.g. schedule: "0 3 * * *" '
                '(or upstream\'s 7-field "0 0 3 * * * *")',
            )
        ]
    if has_schedule and rtype in ("service", "job"):
        return [
            Problem(
                (*base, "schedule"),
                f"only cron jobs take a schedule; set `rtype: cron` or remove it "
                f"(rtype is {rtype})",
                at_key=True,
            )
        ]
    return []


def _endpoint_problems(base: tuple[PathSegment, ...], service: dict[Any, Any]) -> list[Problem]:
    endpoints = service.get("endpoints")
    if not isinstance(endpoints, list):
        return []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for index, endpoint in enumerate(endpoints):
        if not isinstance(endpoint, dict) or not isinstance(endpoint.get("name"), str):
            continue
        name = endpoint["name"]
        if name in seen:
            problems.append(
                Problem(
                    (*base, "endpoints", index, "name"),
                    f"endpoint name `{name}` is already used by endpoints[{seen[name]}]; "
                    "names must be unique within a service",
                )
            )
        else:
            seen[name] = index
    return problems


def _alias_problems(base: tuple[PathSegment, ...], service: dict[Any, Any]) -> list[Problem]:
    problems: list[Problem] = []
    for alias, field in (("cap_add", "capabilities"), ("wasm_http", "wasm")):
        if alias in service and field in service:
            problems.append(
                Problem(
                    (*base, alias),
                    f"`{alias}` is another name for `{field}`; give one of them, not both",
                    at_key=True,
                )
            )
    if "host_network" in service:
        host = service["host_network"]
        mode = service.get("network_mode")
        if not isinstance(host, bool):
            problems.append(Problem((*base, "host_network"), "must be true or false"))
        elif host and mode is not None and mode != "host":
            problems.append(
                Problem(
                    (*base, "host_network"),
                    f"host_network: true contradicts network_mode: {mode}; keep one",
                )
            )
    return problems


def _init_problems(base: tuple[PathSegment, ...], service: dict[Any, Any]) -> list[Problem]:
    init = service.get("init")
    steps = init.get("steps") if isinstance(init, dict) else None
    if not isinstance(steps, list):
        return []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("id"), str):
            continue
        step_id = step["id"]
        if step_id in seen:
            problems.append(
                Problem(
                    (*base, "init", "steps", index, "id"),
                    f"step id `{step_id}` is already used by steps[{seen[step_id]}]",
                )
            )
        else:
            seen[step_id] = index
    return problems


def _cycle_problems(graph: dict[str, list[tuple[int, str]]]) -> list[Problem]:
    """One problem per dependency cycle, at the `depends` entry that closes it."""
    problems: list[Problem] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []
    reported: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for index, target in graph.get(node, []):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    problems.append(
                        Problem(
                            ("services", node, "depends", index, "service"),
                            "dependency cycle: " + " -> ".join(cycle),
                        )
                    )
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    return problems
