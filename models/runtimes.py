"""One OpenVINO `Core` per process, shared by the service, `quantize` and the CPU-capability probe.

OpenVINO's CPU plugin, when a `Core` first compiles for the CPU, installs an alternate signal stack of its own on
the calling thread (`sigaltstack`) and, when the plugin is destroyed with the last model it compiled, puts back the
one it found on whichever thread destroys it and unmaps its own. A model compiled on one thread and released on
another (a hot swap, a worker thread, the garbage collector) so left the first thread's alternate stack pointing at
unmapped memory, and the next signal with a Python handler on that thread (SIGTERM at shutdown, SIGCHLD from a
subprocess, SIGINT) killed the process with a segfault. One `Core` that lives as long as the process keeps one plugin
and its stack alive: the threads that compiled keep a valid stack, whatever thread releases a model.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_core = None


def openvino_core():
    """The process's `openvino.Core` (ImportError when OpenVINO is not installed). Thread-safe: OpenVINO's `Core`
    compiles from several threads at once, and two first callers share one."""
    global _core
    import openvino as ov  # first, every call: an environment without it (or a test hiding it) raises here

    with _lock:
        if _core is None:
            _core = ov.Core()
        return _core
