"""A small process that starts the training children, so that their peak memory is theirs alone.

Linux records a process's peak resident memory (``ru_maxrss``) across ``exec``: a child started by a process that holds
2 GB (the harness after it evaluated a model) reports at least 2 GB, whatever it used itself. The harness therefore
starts this launcher once, early, as a fresh interpreter that imports only the standard library (~15 MB), and lets
it start every training child and reap it with :func:`os.wait4`; the ``ru_maxrss`` it reports back is the child's own
peak (or the launcher's ~15 MB, whichever is larger).

Protocol: one JSON object per line on stdin — ``{"command": [...], "env": {...}, "log": path, "cpus": [..] | null}``
— answered on stdout by ``{"pid": N}`` when the child starts and ``{"status": S, "maxrss_kib": K}`` when it ends
(``S`` is the wait status). End of input ends the launcher. Run as ``python -m benchmarks.method_comparison.launcher``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _serve_one(request: dict) -> dict:
    cpus = request.get("cpus")
    with open(request["log"], "a", encoding="utf-8") as log:
        process = subprocess.Popen(
            request["command"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=request["env"],
            preexec_fn=(lambda: os.sched_setaffinity(0, set(cpus))) if cpus else None,
        )
        print(json.dumps({"pid": process.pid}), flush=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    return {"status": status, "maxrss_kib": usage.ru_maxrss}


def main() -> int:
    """Serve requests from stdin until it closes."""
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve_one(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
