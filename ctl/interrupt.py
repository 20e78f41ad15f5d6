"""^C in the commands that follow a stream (``logs -f``): the command ends promptly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def run_following(main: Coroutine[Any, Any, None], grace: float = 2.0) -> None:
    """Run ``main`` until it ends or ^C (SIGINT) stops it, as ``tail -f`` stops.

    At ^C the event loop is interrupted and its tasks cancelled; should their clean-up
    stall (a stream from another node whose channel does not close), the process ends
    anyway ``grace`` seconds later, with what it printed flushed: a person's ^C, or a
    script's SIGINT, must end a read-only follow, whatever a remote end does.
    """

    def interrupted(signum: int, frame: FrameType | None) -> None:
        timer = threading.Timer(grace, _exit_interrupted)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main)
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_interrupted() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)
