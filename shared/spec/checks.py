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

from shared.spec.limits import MAX_DEPENDS_CHAIN

__all__ = ["PathSegment", "Problem", "format_path", "semantic_problems"]

PathSegment = str | int

# Used with fullmatch: `$` alone would let a trailing newline through.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_@$-]+")
_SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Did-you-mean hints compare a word with every service name: only for the first problems.
_HINTED = 100


def format_path(path: tuple[PathSegment, ...] | list[PathSegment]) -> str:
    """``("services", "web", "endpoints", 0, "port")`` -> ``services.web.endpoints[0].port``."""
    out = ""
    for segment in path:
        if isinstance(segment, int):
            out += f"[{segment}]"
        elif _PLAIN_KEY.fullmatch(segment):
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
        if not _SERVICE_NAME.fullmatch(name):
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
                        + (
                            _did_you_mean(target, [n for n in names if n != name])
                            if len(problems) < _HINTED
                            else ""
                        ),
                    )
                )
            else:
                graph[name].append((index, target))
    cycles = _cycle_problems(graph)
    problems += cycles or _chain_problems(graph)
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
    """One problem per dependency cycle, at the `depends` entry that closes it.

    Walked with an explicit stack: a chain of thousands of services must not
    exhaust Python's recursion limit.
    """
    problems: list[Problem] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    reported: set[frozenset[str]] = set()
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        path.append(root)
        pending = [iter(graph.get(root, []))]
        while pending:
            node = path[-1]
            step = next(pending[-1], None)
            if step is None:
                pending.pop()
                path.pop()
                state[node] = 2
                continue
            index, target = step
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    problems.append(
                        Problem(
                            ("services", node, "depends", index, "service"),
                            "dependency cycle: " + _shown_cycle(cycle),
                        )
                    )
            elif target not in state:
                state[target] = 1
                path.append(target)
                pending.append(iter(graph.get(target, [])))
    return problems


def _shown_cycle(cycle: list[str]) -> str:
    """``a -> b -> a``; a long cycle by its ends and its length."""
    if len(cycle) <= 12:
        return " -> ".join(cycle)
    return (
        " -> ".join(cycle[:5])
        + " -> ... -> "
        + " -> ".join(cycle[-3:])
        + f" ({len(cycle) - 1:,} services)"
    )


def _chain_problems(graph: dict[str, list[tuple[int, str]]]) -> list[Problem]:
    """A problem when services wait on one another in a row past :data:`MAX_DEPENDS_CHAIN`.

    The graph has no cycle here. The depth of each service (the longest chain
    it waits on) comes from a topological order, so no recursion either.
    """
    waiting = {node: 0 for node in graph}
    for targets in graph.values():
        for _, target in targets:
            if target in waiting:
                waiting[target] += 1
    order = [node for node, count in waiting.items() if count == 0]
    for node in order:  # grows as it goes: Kahn's algorithm, dependants first
        for _, target in graph.get(node, []):
            if target in waiting:
                waiting[target] -= 1
                if waiting[target] == 0:
                    order.append(target)
    depth: dict[str, int] = {}
    for node in reversed(order):  # dependencies first
        depth[node] = 1 + max((depth.get(t, 0) for _, t in graph.get(node, [])), default=0)
    deepest = max(depth, key=lambda n: depth[n], default=None)
    if deepest is None or depth[deepest] <= MAX_DEPENDS_CHAIN:
        return []
    return [
        Problem(
            ("services", deepest, "depends"),
            f"this service begins a chain of {depth[deepest]:,} services, each waiting on the "
            f"next through `depends`; a chain may hold at most {MAX_DEPENDS_CHAIN} services",
            at_key=True,
        )
    ]
