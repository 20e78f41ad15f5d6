"""zlayerctl's entry point, its command table and its error handling.

Commands load lazily: ``zlayerctl status`` imports the status module and what
it needs, not the build formats, wasmtime or the registry client. The table
below names each command's module and its one-line help, so ``zlayerctl
--help`` lists every command without importing any of them. The click group
itself is ``ctl.cli.cli`` (``ctl.main.cli`` too): the read commands a
command line of ``ctl.readargs`` names run without importing click at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ctl.cli import LazyGroup as LazyGroup
    from ctl.cli import cli as cli

DEBUG_ENV = "ZLAYER_DEBUG"

# command name -> ("module:attribute", short help shown by `zlayerctl --help`).
# The short help is the first sentence of the command's docstring;
# tests/unit/test_ctl_lazy.py checks the two stay the same.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "build": (
        "ctl.build_cmd:build",
        "Build an image from CONTEXT (default: here) and store it under each -t name.",
    ),
    "context": (
        "ctl.context_cmd:context",
        "Named nodes zlayerctl sends commands to: their API URL, token and CA.",
    ),
    "daemon": (
        "ctl.daemon_cmd:daemon",
        "Run the six daemons under zlayerctl's own supervisor (hosts without systemd).",
    ),
    "deploy": (
        "ctl.deploy_cmd:deploy",
        "Deploy FILE and return (or show the plan with --dry-run).",
    ),
    "dns": (
        "ctl.traffic_cmd:dns",
        "The names the service DNS answers (web.service.local, web-2.web.service.local, ...).",
    ),
    "down": (
        "ctl.deploy_cmd:down",
        "Remove a deployment and everything it runs (named volumes are kept).",
    ),
    "events": (
        "ctl.deploy_cmd:events",
        "What happened to deployments: deploys, rollouts, scaling decisions, failures.",
    ),
    "exec": (
        "ctl.replica_cmd:exec_",
        "Run COMMAND in a replica of SERVICE: zlayerctl exec web -- ls /",
    ),
    "export": (
        "ctl.registry_cmd:export",
        "Write IMAGE to FILE as an oci-archive (`image import` reads it back).",
    ),
    "image": (
        "ctl.image_cmd:image",
        "Images on this node: import archives, list, inspect, remove.",
    ),
    "job": (
        "ctl.cron_cmd:job",
        "Run jobs and see their runs and cron schedules.",
    ),
    "login": (
        "ctl.registry_cmd:login",
        "Check credentials for REGISTRY and keep them in registryd (a 0600 file).",
    ),
    "logout": (
        "ctl.registry_cmd:logout",
        "Forget the credentials registryd keeps for REGISTRY.",
    ),
    "logs": (
        "ctl.replica_cmd:logs",
        "Print a service's logs (every replica, or one with --instance).",
    ),
    "node": (
        "ctl.node_cmd:node",
        "The cluster: init, join-token, join, ls, label, drain, undrain, rm, rotate-key.",
    ),
    "pipeline": (
        "ctl.build_cmd:pipeline",
        "Build the images of a ZPipeline in dependency order.",
    ),
    "ps": (
        "ctl.deploy_cmd:ps",
        "Show deployments and their services (or replicas with --containers).",
    ),
    "pull": (
        "ctl.registry_cmd:pull",
        "Pull IMAGE from its registry (`nginx` means docker.io/library/nginx:latest).",
    ),
    "rollback": (
        "ctl.deploy_cmd:rollback",
        "Return a deployment to its previous revision (rolled out like any deploy).",
    ),
    "routes": (
        "ctl.traffic_cmd:routes",
        "The routes zlayer-proxyd serves: listener, host, path and the backends in rotation.",
    ),
    "runtimes": (
        "ctl.build_cmd:runtimes_",
        "List the runtime templates, or print the Dockerfile of template NAME.",
    ),
    "scale": (
        "ctl.deploy_cmd:scale",
        "Hold SERVICE at REPLICAS replicas until the next deploy.",
    ),
    "secret": (
        "ctl.secret_cmd:secret",
        "Secrets for `$S:NAME` in a service's env: set, list, read, remove (root only).",
    ),
    "spec": (
        "ctl.spec_cmd:spec",
        "Show a deployment spec normalised, or its JSON Schema.",
    ),
    "status": (
        "ctl.status_cmd:status",
        "Show each daemon's state, version, pid and supervisor.",
    ),
    "stop": (
        "ctl.deploy_cmd:stop",
        "Stop a deployment's replicas (or one service's) and keep the deployment.",
    ),
    "system": (
        "ctl.registry_cmd:system",
        "Node-wide housekeeping.",
    ),
    "token": (
        "ctl.token_cmd:token",
        "Bearer tokens of the REST API: create, list, revoke.",
    ),
    "up": (
        "ctl.deploy_cmd:up",
        "Deploy FILE and follow it; Ctrl-C tears the deployment down (-b/-d return instead).",
    ),
    "validate": (
        "ctl.spec_cmd:validate",
        "Check a deployment spec and list every problem in it.",
    ),
    "wasm": (
        "ctl.wasm_cmd:wasm",
        "WebAssembly binaries: build, validate, inspect, export and push as OCI artifacts.",
    ),
}


def main() -> None:
    """Run zlayerctl; any failure becomes one sentence on stderr and exit 1.

    A read command whose command line ``ctl.readargs`` understands runs
    straight away, without click; anything else goes through click. A leading
    ``--host URL`` is taken first, for both (``ctl.contexts``).
    """
    from ctl.readargs import parse, runner, take_host_option

    argv = take_host_option(sys.argv[1:])
    parsed = parse(argv)
    if parsed is None:
        _main_click(argv)
        return
    command, options = parsed
    try:
        runner(command)(**options)
        _end_now()
    except KeyboardInterrupt:
        # as click does for a command: a blank line closes the terminal's ^C, then 130
        sys.stderr.write("\n")
        sys.stderr.flush()
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            _quiet_broken_pipe()
            sys.exit(1)
        _explain_and_exit(exc)


def _end_now() -> None:
    """End the process as soon as a command run without click is done.

    What the interpreter's own shutdown does that anyone can see is done
    first (atexit handlers, then stdout and stderr flushed, so a closed pipe
    still ends as :func:`main` tells it); what is skipped is the teardown of
    every loaded module, about a tenth of a warm ``zlayerctl pull``. Not while
    another thread runs: the interpreter would wait for it.
    """
    threading = sys.modules.get("threading")  # never imported: no thread of Python's
    if threading is not None and threading.active_count() > 1:
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# commands that act on this machine itself, never on a node's API
LOCAL_ONLY = frozenset({"daemon"})


def _main_click(argv: list[str]) -> None:
    import click

    if argv and argv[0] in LOCAL_ONLY:
        from ctl.readargs import is_remote

        if is_remote():
            from ctl.output import fail

            fail(
                f"`zlayerctl {argv[0]}` runs the daemons of this machine and cannot go through "
                "a node's API; run it on the node itself, without --host, ZLAYER_HOST or a "
                "current context (`zlayerctl context use --local`)"
            )

    from ctl.cli import cli

    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except BaseException as exc:
        _explain_and_exit(exc)


def _explain_and_exit(exc: BaseException) -> NoReturn:
    if os.environ.get(DEBUG_ENV):
        raise exc
    from ctl.contexts import TargetError
    from ctl.errors import explain
    from ctl.output import fail

    fail(str(exc) if isinstance(exc, TargetError) else explain(exc))


def _quiet_broken_pipe() -> None:
    """The reader went away (``zlayerctl ps | head -1``): nothing more can be written, and
    flushing at exit must not complain, as click quiets it for its commands."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())


def __getattr__(name: str) -> Any:
    if name in ("cli", "LazyGroup"):
        import ctl.cli

        return getattr(ctl.cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
