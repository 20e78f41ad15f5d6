"""Images, builds and registry credentials: the registryd calls ``zlayerctl image``, ``pull``,
``push``, ``system prune``, ``login``, ``logout`` and ``build`` make.

Pulls, pushes and builds are registryd jobs: the route answers 202 with the
operation to follow (``/operations/registry/{id}``, or ``/build/{id}`` for a
build). A build's context comes as a tar in the request body: apid spools it
to an unnamed file in its state directory (at most the setting
``max_build_context_bytes``, as sent and once unpacked), checks its members'
names, and hands it to registryd with ``Receive`` under one top directory, as
``zlayerctl build`` sends a context registryd cannot see; registryd extracts
it with its own checks and removes it when the build ends. A login's registry
must be a host name before registryd is asked to reach it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import posixpath
import re
import tempfile
from typing import IO

from aiohttp import web
from msgspec import structs

from daemons.apid.base import api, body_as, query_flag, reply
from daemons.apid.problems import ApiProblem
from daemons.apid.routes_deployments import operation_accepted
from daemons.apid.routing import API_PREFIX, JOB_ID, Role, route
from shared import logread
from shared.bus import SEND_COMPLETE
from shared.paths import Paths
from shared.reference import InvalidReferenceError, parse_reference
from shared.wire.api import OperationRef, PullRequest, PushRequest, RegistryLogin
from shared.wire.jobs import JobInfo
from shared.wire.registry import RUNTIME_AUTO, BuildRequest, ImageDetail, ImageInfo, PruneResult

IMAGE_TAGS = ("images",)
BUILD_TAGS = ("builds",)
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip")

CONTEXT_TOP = "context"  # the one top directory registryd's Receive wants
UPLOAD_CHUNK = 1024 * 1024
LOG_CHUNK = 64 * 1024
_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
# a DNS name or an [IPv6] address, and a port
_REGISTRY_HOST = re.compile(
    rf"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>{_HOST_LABEL}(?:\.{_HOST_LABEL})*))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


# ---------------------------------------------------------------- images


@route(
    "GET",
    "/images",
    role=Role.VIEWER,
    summary="Stored images (zlayerctl image ls)",
    returns=list[ImageInfo],
    tags=IMAGE_TAGS,
)
async def images_list(request: web.Request) -> web.StreamResponse:
    return reply(await api(request).registry.list_images())


@route(
    "GET",
    "/images/{image:.+}",
    role=Role.VIEWER,
    summary="An image and its config (zlayerctl image inspect); the reference URL-encoded",
    returns=ImageDetail,
    tags=IMAGE_TAGS,
)
async def image_inspect(request: web.Request) -> web.StreamResponse:
    return reply(await api(request).registry.inspect_image(request.match_info["image"]))


@route(
    "DELETE",
    "/images/{image:.+}",
    role=Role.ADMIN,
    summary="Untag an image and delete what nothing else uses (zlayerctl image rm); "
    "what was removed",
    returns=list[str],
    query={"force": "true: remove it even when several names point at it"},
    tags=IMAGE_TAGS,
)
async def image_remove(request: web.Request) -> web.StreamResponse:
    removed = await api(request).registry.remove_image(
        request.match_info["image"], query_flag(request, "force")
    )
    return reply(removed)


@route(
    "POST",
    "/images/pull",
    role=Role.ADMIN,
    summary="Pull an image with registryd's credentials, as a job (zlayerctl pull)",
    body=PullRequest,
    returns=OperationRef,
    status=202,
    tags=IMAGE_TAGS,
)
async def image_pull(request: web.Request) -> web.StreamResponse:
    asked: PullRequest = await body_as(request, PullRequest)
    job = await api(request).registry.pull(asked.reference, asked.pull_policy, "")
    return operation_accepted("registry", job)


@route(
    "POST",
    "/images/push",
    role=Role.ADMIN,
    summary="Push a stored image to its registry or a destination, as a job (zlayerctl push)",
    body=PushRequest,
    returns=OperationRef,
    status=202,
    tags=IMAGE_TAGS,
)
async def image_push(request: web.Request) -> web.StreamResponse:
    asked: PushRequest = await body_as(request, PushRequest)
    job = await api(request).registry.push(asked.reference, asked.destination, "")
    return operation_accepted("registry", job)


@route(
    "POST",
    "/system/prune",
    role=Role.ADMIN,
    summary="Remove images no replica uses, then unreferenced blobs (zlayerctl system prune)",
    returns=PruneResult,
    tags=IMAGE_TAGS,
)
async def system_prune(request: web.Request) -> web.StreamResponse:
    return reply(await api(request).registry.prune())


@route(
    "POST",
    "/registry/login",
    role=Role.ADMIN,
    summary="Check credentials against a registry and keep them in registryd (zlayerctl login)",
    body=RegistryLogin,
    returns=dict[str, str],
    tags=IMAGE_TAGS,
)
async def registry_login(request: web.Request) -> web.StreamResponse:
    asked: RegistryLogin = await body_as(request, RegistryLogin)
    check_registry_host(asked.registry)
    host = await api(request).registry.login(asked.registry, asked.username, asked.password)
    return reply({"registry": host, "username": asked.username})


def check_registry_host(registry: str) -> None:
    """400 for a registry that names no host registryd could reach, before it tries (it
    takes ``https://host/path`` as ``host``, as ``docker login`` does)."""
    host = registry.strip().removeprefix("https://").removeprefix("http://").split("/")[0]
    if not host:
        raise ApiProblem(400, "give a registry host name, like registry.example.com")
    found = _REGISTRY_HOST.fullmatch(host)
    valid = found is not None and 0 < int(found["port"] or 443) < 65536
    if found is not None and found["ip6"]:
        try:
            ipaddress.IPv6Address(found["ip6"])
        except ValueError:
            valid = False
    elif found is not None:
        valid = valid and len(found["name"]) <= 253
    if not valid:
        raise ApiProblem(
            400,
            f"{registry!r} is not a registry host name; give one like registry.example.com "
            "or host:5000",
        )


@route(
    "DELETE",
    "/registry/login/{registry}",
    role=Role.ADMIN,
    summary="Forget the credentials registryd keeps for a registry (zlayerctl logout)",
    returns=dict[str, str],
    tags=IMAGE_TAGS,
)
async def registry_logout(request: web.Request) -> web.StreamResponse:
    registry = request.match_info["registry"]
    if not await api(request).registry.logout(registry):
        raise ApiProblem(404, f"no credentials were kept for {registry}")
    return reply({"registry": registry})


# ---------------------------------------------------------------- build


class _Refused(Exception):
    """A build context apid will not pass on; the sentence says why (400)."""


def _context_member_name(name: str) -> str:
    """``name`` under the one top directory; _Refused for a name leaving the context."""
    if "\0" in name:
        raise _Refused(f"{name!r} has a NUL byte in its name")
    if name.startswith("/"):
        raise _Refused(f"{name} points outside the context (an absolute path)")
    if ".." in name.split("/"):
        raise _Refused(f"{name} points outside the context ('..')")
    relative = posixpath.normpath(name)
    return CONTEXT_TOP if relative == "." else f"{CONTEXT_TOP}/{relative}"


def wrap_context(upload: IO[bytes], out: IO[bytes], limit: int) -> None:
    """Copy the tar (maybe compressed) in ``upload`` to ``out`` under one top directory, as
    ``Registry1.Receive`` reads it (ended by SEND_COMPLETE); _Refused for a member that is
    a device or a named pipe, or whose name or hard link leaves the context, or when the
    files hold more than ``limit`` bytes."""
    import tarfile  # with the first build sent (with bz2 and lzma), not at apid's start

    total = 0
    try:
        with (
            tarfile.open(fileobj=upload, mode="r|*") as source,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as target,
        ):
            top = tarfile.TarInfo(CONTEXT_TOP)
            top.type, top.mode = tarfile.DIRTYPE, 0o755
            target.addfile(top)
            for member in source:
                if member.ischr() or member.isblk() or member.isfifo():
                    raise _Refused(f"{member.name} is a device or a named pipe")
                name = _context_member_name(member.name)
                if name == CONTEXT_TOP:
                    continue  # the context's own directory: the top stands for it
                if member.islnk():
                    linked = _context_member_name(member.linkname)
                    if linked == CONTEXT_TOP:
                        raise _Refused(f"{member.name} is a hard link to the context itself")
                    member.linkname = linked
                member.name = name
                total += max(member.size, 0)
                if total > limit:
                    raise _Refused(
                        f"the build context holds more than {limit // 1048576} MiB; "
                        "leave out what the build does not need"
                    )
                target.addfile(member, source.extractfile(member) if member.isreg() else None)
    except (tarfile.TarError, EOFError, ValueError, OverflowError, IndexError) as exc:
        raise _Refused(f"the request body is not a complete tar archive ({exc})") from None
    out.write(SEND_COMPLETE)
    out.flush()


def _temporary() -> IO[bytes]:
    """An unnamed file in apid's state directory (private to root), or the system's temp
    without one: gone when closed, or if apid dies."""
    state = Paths.from_env().daemon_state("apid")
    return tempfile.TemporaryFile(dir=str(state) if state.is_dir() else None)


async def _spool_body(request: web.Request, limit: int) -> IO[bytes]:
    """The request body in an unnamed file (gone when closed, or if apid dies)."""
    spool = await asyncio.to_thread(_temporary)
    try:
        size = 0
        while chunk := await request.content.read(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiProblem(
                    413,
                    f"the build context is larger than {limit // 1048576} MiB; "
                    "leave out what the build does not need",
                )
            await asyncio.to_thread(spool.write, chunk)
        if size == 0:
            raise ApiProblem(400, "the request body is empty; send the build context as a tar")
        await asyncio.to_thread(spool.seek, 0)
        return spool
    except BaseException:
        await _close(spool)
        raise


async def _close(spooled: IO[bytes]) -> None:
    """Close a spooled file in a thread: the last close of an unlinked file of up to
    the context limit frees its blocks and pages in the call. Shielded, so a second
    cancellation does not leave it open."""
    await asyncio.shield(asyncio.to_thread(spooled.close))


def _inside_context(relative: str, what: str) -> str:
    """A file the query names (``file=``), checked to be inside the context; "" stays "".
    Checked before the upload is read, so a wrong one costs neither spooling nor a
    received context registryd would keep."""
    if relative.startswith("/") or ".." in relative.split("/") or "\0" in relative:
        raise ApiProblem(400, f"?{what}= must name a file inside the context, not {relative}")
    return posixpath.normpath(relative) if relative else ""


def _in_received(context: str, relative: str) -> str:
    """A checked relative file as registryd sees it, under the context it received."""
    return posixpath.join(context, relative) if relative else ""


def _build_request(request: web.Request) -> BuildRequest:
    """The query's build options, checked as ``zlayerctl build`` checks them (the context
    is filled in once registryd has it)."""
    query = request.query
    tags = query.getall("tag", [])
    for tag in tags:
        try:
            parse_reference(tag)
        except InvalidReferenceError as exc:
            raise ApiProblem(400, str(exc)) from None
    build_args: dict[str, str] = {}
    for pair in query.getall("build_arg", []):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ApiProblem(400, f"build_arg={pair}: write it as KEY=VALUE")
        build_args[key] = value
    runtime = query.get("runtime", "")
    image_format = query.get("format", "oci")
    if image_format not in ("oci", "docker"):
        raise ApiProblem(400, f"?format= must be oci or docker, not {image_format}")
    return BuildRequest(
        context="",
        dockerfile=_inside_context(query.get("file", ""), "file"),
        zimagefile=_inside_context(query.get("zimagefile", ""), "zimagefile"),
        runtime=RUNTIME_AUTO if runtime == "auto" else runtime,
        tags=tags,
        build_args=build_args,
        target=query.get("target", ""),
        no_cache=query_flag(request, "no_cache"),
        format="docker" if image_format == "docker" else "oci",
    )


@route(
    "POST",
    "/build",
    role=Role.ADMIN,
    summary="Build an image from a context sent as a tar, as a registryd job (zlayerctl build)",
    body=bytes,
    body_content="application/x-tar|application/gzip",
    returns=OperationRef,
    status=202,
    query={
        "tag": "name the image (repeat for several)",
        "file": "the Dockerfile, relative to the context (default: its ZImagefile, else "
        "its Dockerfile)",
        "zimagefile": "the ZImagefile, relative to the context",
        "target": "build up to this stage",
        "build_arg": "KEY=VALUE (repeat for several)",
        "runtime": "build with a runtime template (auto: pick one from the files)",
        "no_cache": "true: rebuild every step",
        "format": "oci (default) or docker (keeps HEALTHCHECK)",
    },
    tags=BUILD_TAGS,
)
async def build_start(request: web.Request) -> web.StreamResponse:
    content_type = request.content_type
    if content_type not in TAR_TYPES:
        raise ApiProblem(
            415, f"send the build context as application/x-tar, not {content_type or 'nothing'}"
        )
    build = _build_request(request)
    registry, limit = api(request).registry, api(request).max_build_context_bytes
    upload = await _spool_body(request, limit)
    try:
        wrapped = await asyncio.to_thread(_temporary)
        try:
            try:
                await asyncio.to_thread(wrap_context, upload, wrapped, limit)
            except _Refused as exc:
                raise ApiProblem(400, str(exc)) from None
            await _close(upload)
            await asyncio.to_thread(wrapped.seek, 0)
            context = await registry.receive(wrapped.fileno())
        finally:
            await _close(wrapped)
    finally:
        await _close(upload)
    sendable = structs.replace(
        build,
        context=context,
        dockerfile=_in_received(context, build.dockerfile),
        zimagefile=_in_received(context, build.zimagefile),
    )
    job = await registry.build(sendable)
    response = operation_accepted("registry", job)
    response.headers["Location"] = f"{API_PREFIX}/build/{job}"
    return response


async def _build_job(request: web.Request) -> JobInfo:
    job_id = int(request.match_info["id"])  # the route's pattern holds digits only
    info = await api(request).registry.get_job(job_id)
    if info.kind != "build":
        raise ApiProblem(404, f"there is no build {job_id} (job {job_id} is a {info.kind})")
    return info


@route(
    "GET",
    "/build/" + JOB_ID,
    role=Role.ADMIN,
    summary="A build's state, progress and result (GetJob)",
    returns=JobInfo,
    tags=BUILD_TAGS,
)
async def build_status(request: web.Request) -> web.StreamResponse:
    return reply(await _build_job(request))


def _read_log(path: str, position: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(position)
            return handle.read(LOG_CHUNK * 16)
    except OSError:
        return b""


@route(
    "GET",
    "/build/" + JOB_ID + "/logs",
    role=Role.ADMIN,
    summary="A build's log as plain text; with follow, until the build ends",
    returns=str,
    content="text/plain",
    query={"follow": "true: keep the stream open until the build ends"},
    tags=BUILD_TAGS,
)
async def build_logs(request: web.Request) -> web.StreamResponse:
    info = await _build_job(request)
    follow = query_flag(request, "follow")
    registry = api(request).registry
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    position = 0
    try:
        while True:
            ended = info.state != "running"
            while info.log_path:
                data = await asyncio.to_thread(_read_log, info.log_path, position)
                if not data:
                    break
                position += len(data)
                await response.write(data)
            if ended or not follow:
                break
            await asyncio.sleep(logread.FOLLOW_POLL)
            try:
                info = await registry.get_job(info.id)
            except Exception:  # gone from GetJob (registryd restarted): what was read is all
                break
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    return response
