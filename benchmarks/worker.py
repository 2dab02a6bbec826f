"""Child-process entry: one benchmark task per process, so peak RSS and start-up are per task.

    python -m benchmarks.worker TASK SPEC.json OUT.json

The parent (``benchmarks.run``) writes the spec, sets the environment (thread
count, cache dirs, no ``MKL_CBWR`` for peers) and reads the result. A task
module is imported only when its task runs: a peer contender must never import
steadyclip, whose import sets ``MKL_CBWR`` for the process.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
T0_WALL = time.time()

# task name -> "module:function"
TASKS: dict[str, str] = {
    "prep": "benchmarks.prep:run_prep",
    "contender": "benchmarks.contenders:run_contender",
    "gemm": "benchmarks.probes:run_gemm",
    "startup": "benchmarks.probes:run_startup",
    "textcache": "benchmarks.probes:run_textcache",
    "stability": "benchmarks.probes:run_stability",
    "careless": "benchmarks.probes:run_careless_once",
    "batch": "benchmarks.probes:run_batch_throughput",
    "profile": "benchmarks.profile:run_profile",
}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)


def _resolve(task: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    module, func = TASKS[task].split(":")
    fn: Callable[[dict[str, Any]], dict[str, Any]] = getattr(importlib.import_module(module), func)
    return fn


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in TASKS:
        print(f"usage: python -m benchmarks.worker {{{','.join(TASKS)}}} SPEC.json OUT.json", file=sys.stderr)
        return 2
    task, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    spec["_t0_perf"], spec["_t0_wall"] = T0, T0_WALL
    threads = int(spec.get("threads", 1))
    if spec.get("uses_steadyclip"):
        import steadyclip  # noqa: F401 - first, as users do: it sets MKL_CBWR before torch starts MKL

    import torch

    torch.set_num_threads(threads)
    result = _resolve(task)(spec)
    result["process"] = {
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "mkl_cbwr_env": os.environ.get("MKL_CBWR"),
        "steadyclip_imported": "steadyclip" in sys.modules,
        "wall_s": round(time.perf_counter() - T0, 3),
        "python": platform.python_version(),
    }
    Path(out_path).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
