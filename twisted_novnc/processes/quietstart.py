"""A new worker's imports at the lowest CPU priority.

Starting a worker is mostly importing (about 0.6 s of CPU: Twisted, Autobahn, OpenSSL,
prometheus_client).  In an upgrade the old generation is relaying meanwhile, and on a busy host
that CPU comes out of its relays' latency.  On Linux a thread's nice value is its own: the
imports run in a thread at nice 19, which takes only the CPU nobody else needs, and the worker
itself (the main thread, at the priority it was started with) runs on when they are done.  No
privilege is needed, since nothing ever raises a priority.

Only the standard library here: this runs before anything else of the worker is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

#: The nice value of the importing thread: the lowest priority.
QUIET = 19


def import_quietly(name: str) -> None:
    """Import ``name`` (and all it imports) in a thread at nice 19, and wait for it.

    Whatever goes wrong is left for the caller's own import of the module to raise again.
    """

    def work() -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: imports at full speed
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), QUIET)
        with contextlib.suppress(BaseException):
            importlib.import_module(name)

    thread = threading.Thread(target=work, name="quiet imports", daemon=True)
    thread.start()
    thread.join()
