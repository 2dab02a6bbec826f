"""Helpers for the server tests: a real ``steadyclip serve`` subprocess, images, the CLI's answer."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# A fixed label set for the demo model; its images are coloured shapes.
LABELS = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange ring"]


def import_loadtest() -> ModuleType:
    """``benchmarks.loadtest``, importable however pytest was started."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.loadtest")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for a child steadyclip process: private caches, offline, one thread."""
    env = dict(os.environ)
    env.update({
        "STEADYCLIP_CACHE_DIR": str(cache_dir / "steadyclip"), "HF_HOME": str(cache_dir / "hf"),
        "XDG_CACHE_HOME": str(cache_dir / "xdg"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
    })
    env.pop("STEADYCLIP_TOKEN", None)
    env.update(extra)
    return env


def demo_images(folder: Path) -> list[Path]:
    """PNG files of demo shapes: the repository's examples/ if present, else rendered here."""
    found = sorted(EXAMPLES.glob("*.png")) if EXAMPLES.is_dir() else []
    if len(found) >= 3:
        return found[:6]
    from steadyclip.demo.shapes import render

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(LABELS):
        colour, shape = label.split()
        path = folder / f"{colour}_{shape}.png"
        render(colour, shape, np.random.default_rng(100 + i)).save(path)
        paths.append(path)
    return paths


def expected_label(path: Path) -> str | None:
    """The label a demo image shows, from its file name (``red_circle.png`` -> ``red circle``)."""
    words = path.stem.split("_")
    return " ".join(words[:2]) if len(words) >= 2 else None


@contextlib.contextmanager
def serve_process(cache_dir: Path, *args: str, token: str | None = None,
                  timeout_s: float = 180.0) -> Iterator[str]:
    """Run ``python -m steadyclip serve`` on a free loopback port; yield its base URL once /readyz is 200."""
    port = free_port()
    log_path = cache_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "steadyclip", "serve", *args, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    env = subprocess_env(cache_dir, **({"STEADYCLIP_TOKEN": token} if token else {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log_path, timeout_s)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout_s:.0f}s ({last}):\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


def cli_classify(cache_dir: Path, images: Sequence[Path], labels: Sequence[str], *extra: str) -> dict[str, object]:
    """``steadyclip classify --json`` in a fresh process, parsed."""
    cmd = [sys.executable, "-m", "steadyclip", "classify", *map(str, images), "--labels", ",".join(labels),
           "--json", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(cache_dir), capture_output=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    doc: dict[str, object] = json.loads(out.stdout)
    return doc
