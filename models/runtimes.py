"""One OpenVINO `Core` per process, shared by the service, `quantize` and the CPU-capability probe.

OpenVINO's CPU plugin, when a `Core` first compiles for the CPU, installs an alternate signal stack of its own on
the calling thread (`sigaltstack`) and, when the plugin is destroyed with the last model it compiled, puts back the
one it found on whichever thread destroys it and unmaps its own. A model compiled on one thread and released on
another (a hot swap, a worker thread, the garbage collector) so left the first thread's alternate stack pointing at
unmapped memory, and the next signal with a Python handler on that thread (SIGTERM at shutdown, SIGCHLD from a
subprocess, SIGINT) killed the process with a segfault. One `Core` that lives as long as the process keeps one plugin
and its stack alive: the threads that compiled keep a valid stack, whatever thread releases a model.

Two more things OpenVINO does on its own, and what this module does about them:
- `import openvino` sends a usage event to Google Analytics (the `openvino-telemetry` package, which OpenVINO's
  wheel depends on: a client ID written to ~/intel, a process forked from a thread to post it) unless a consent file
  says no. A service must not call out from its operators' hosts unasked, nor fork in a threaded server:
  `import_openvino` hides that package, and OpenVINO then falls back to its own no-op stub.
- Its CPU plugin aborts the process ("double free or corruption") when TCMalloc is preloaded, as docs/training.md
  suggests for CPU training: `openvino_core` refuses with a `UserError` first, so a command says so in one line and
  the service (which treats any runtime's error as "not available") serves on another runtime.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from .errors import UserError

_lock = threading.Lock()
_core = None


class TcmallocPreloaded(UserError, RuntimeError):
    """OpenVINO cannot run in this process: TCMalloc is loaded into it."""


def import_openvino():
    """`openvino`, imported without its telemetry (see above); ImportError when it is not installed."""
    sys.modules.setdefault("openvino_telemetry", None)  # `import openvino_telemetry` now raises ImportError
    import openvino  # every call: an environment without it (or a test hiding it) raises here

    return openvino


def loaded_tcmalloc() -> str | None:
    """The path of the TCMalloc library mapped into this process (LD_PRELOAD), or None (read from /proc/self/maps:
    the library actually loaded, whatever the environment says now)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # no procfs (macOS): nothing to detect
        return None
    return next((line.split()[-1] for line in maps.splitlines() if "/libtcmalloc" in line), None)


def openvino_core():
    """The process's `openvino.Core` (ImportError when OpenVINO is not installed, `TcmallocPreloaded` where it would
    abort the process). Thread-safe: OpenVINO's `Core` compiles from several threads at once, and two first callers
    share one."""
    global _core
    ov = import_openvino()
    with _lock:
        if _core is None:  # a preloaded library is there from the start: checked once, before the only Core
            if (tcmalloc := loaded_tcmalloc()) is not None:
                raise TcmallocPreloaded(f"OpenVINO aborts a process with TCMalloc loaded ({tcmalloc}): run this one "
                                        "without LD_PRELOAD (TCMalloc speeds up training only)")
            _core = ov.Core()
        return _core
