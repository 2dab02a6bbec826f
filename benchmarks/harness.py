"""Runs benchmark tasks in child processes with a controlled environment; logs progress.

The parent never imports torch or steadyclip: each task gets a fresh process (its
own peak RSS, its own start-up), the same thread settings, private cache dirs,
and no ``MKL_CBWR`` unless steadyclip itself sets it (peers run as their users do).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The environment as the user started us, before anything could add MKL_CBWR.
BASE_ENV: dict[str, str] = dict(os.environ)


class TaskError(RuntimeError):
    """A benchmark task's child process failed; the message ends with its log tail."""


class Harness:
    """Child-process runner for one benchmark run, rooted at a work directory."""

    def __init__(self, work: Path, threads: int, *, verbose: bool = True) -> None:
        self.work = work
        self.threads = threads
        self.verbose = verbose
        self.t0 = time.perf_counter()
        for sub in ("specs", "logs", "out", "caches"):
            (work / sub).mkdir(parents=True, exist_ok=True)

    def env(self, cache: str = "default", extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Children's environment: pinned threads, a private steadyclip cache, offline hubs."""
        env = dict(BASE_ENV)
        t = str(self.threads)
        env.update({
            "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "PYTHONHASHSEED": "0",
            "STEADYCLIP_CACHE_DIR": str(self.work / "caches" / cache),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(self.work / "caches" / "hf"),
            "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), BASE_ENV.get("PYTHONPATH", "")) if p),
        })
        if extra:
            env.update(extra)
        return env

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def run(self, task: str, label: str, spec: dict[str, Any], *, cache: str = "default",
            env_extra: Mapping[str, str] | None = None, timeout_s: float = 1200.0) -> dict[str, Any]:
        """Run ``task`` in a fresh process; return its result plus the parent's wall-clock view."""
        spec = {"threads": self.threads, **spec}
        spec_path = self.work / "specs" / f"{label}.json"
        out_path = self.work / "out" / f"{label}.json"
        log_path = self.work / "logs" / f"{label}.log"
        spec_path.write_text(json.dumps(spec, indent=1))
        out_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.worker", task, str(spec_path), str(out_path)]
        start_wall, start = time.time(), time.perf_counter()
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(cmd, env=self.env(cache, env_extra), cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired as e:
                raise TaskError(f"{label}: timed out after {timeout_s:.0f}s; log {log_path}") from e
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-1500:]
            raise TaskError(f"{label}: exit code {proc.returncode}; log {log_path}:\n{tail}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        result["parent"] = {"start_wall": start_wall, "wall_s": time.perf_counter() - start,
                            "loadavg_after": os.getloadavg()[0]}
        return result

    def evict(self, path: str | os.PathLike[str]) -> bool:
        """Drop one file's pages from the OS page cache (ours only; nothing global), for cold starts."""
        if not hasattr(os, "posix_fadvise"):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
