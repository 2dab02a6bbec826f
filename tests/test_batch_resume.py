"""kill -9 a real `steadyclip batch` process at chosen moments, run it again: the same file, nothing lost or twice.

The runner has a test hook: ``STEADYCLIP_BATCH_TEST_KILL_AT=POINT:N`` makes the
process SIGKILL itself the N-th time it passes POINT (see ``writer.kill_point``).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from steadyclip.model.registry import DEMO_SPEC, demo_labels

torch.set_num_threads(1)

N_GOOD, N_BAD, PART = 38, 2, 12  # micro-batch 2: a model step is 8 rows, so 2 steps per part
N = N_GOOD + N_BAD


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, demo_arch_checkpoint: Path) -> dict[str, object]:
    """Inputs, the command line (minus --out), and the output of one uninterrupted run."""
    from steadyclip.demo.shapes import generate

    root = tmp_path_factory.mktemp("resume")
    images = root / "images"
    for i, (img, _, _) in enumerate(generate(N_GOOD, seed=3)):
        sub = images / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{i:03d}.png")
    (images / "d1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "d2" / "empty.jpg").write_bytes(b"")
    labels = root / "labels.txt"
    labels.write_text("\n".join(demo_labels()) + "\n")
    cmd = [sys.executable, "-m", "steadyclip", "batch", str(images), "--labels-file", str(labels),
           "--embeddings", "--all-probs", "--part-size", str(PART), "--micro-batch", "2", "--workers", "1",
           "--no-progress", "--json"]
    if not (DEMO_SPEC.weights_file is not None and DEMO_SPEC.weights_file.is_file()):
        cmd += ["--model", DEMO_SPEC.arch, "--pretrained", str(demo_arch_checkpoint)]
    ref = root / "reference.parquet"
    # One text cache for all runs of this module: the reference runs before per-test caches exist.
    cmd = ["env", f"STEADYCLIP_CACHE_DIR={root / 'cache'}", *cmd]
    done = _run(cmd + ["--out", str(ref)])
    assert done.returncode == 0, done.stderr
    return {"cmd": cmd, "ref": ref, "root": root}


def _run(cmd: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("STEADYCLIP_BATCH_TEST_KILL_AT", None)
    if kill_at:
        env["STEADYCLIP_BATCH_TEST_KILL_AT"] = kill_at
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_as_reference(out: Path, ref: Path) -> None:
    got, want = pq.read_table(out), pq.read_table(ref)
    assert got.column("index").to_pylist() == list(range(N)), "every input exactly once, in order"
    assert len(set(got.column("path").to_pylist())) == N
    assert got.equals(want)
    assert _sha(out) == _sha(ref), "the resumed file is byte-identical to an uninterrupted run's"
    assert not out.with_name(out.name + ".parts").exists()


@pytest.mark.parametrize("kill_at", [
    # the one kept in the fast suite: during a part write, temp file complete but not yet renamed
    "part-tmp:2",
    pytest.param("part-written:1", marks=pytest.mark.slow),  # right after the first part is safely on disk
    pytest.param("embedded:3", marks=pytest.mark.slow),  # mid-way: part 1 half computed, nothing of it written
    pytest.param("assemble-tmp:1", marks=pytest.mark.slow),  # final file written, not renamed
    pytest.param("assembled:1", marks=pytest.mark.slow),  # final file renamed, parts not yet removed
])
def test_kill_then_resume_gives_the_uninterrupted_file(job: dict[str, object], tmp_path: Path, kill_at: str) -> None:
    cmd, ref = job["cmd"], job["ref"]
    assert isinstance(cmd, list) and isinstance(ref, Path)
    out = tmp_path / "out.parquet"
    killed = _run(cmd + ["--out", str(out)], kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    parts = out.with_name(out.name + ".parts")
    if kill_at.startswith(("part", "embedded")):
        assert not out.exists() and (parts / "job.json").is_file()
    resumed = _run(cmd + ["--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["total"] == N and summary["ok"] == N_GOOD and summary["errors"] == N_BAD
    if kill_at in ("part-tmp:2", "part-written:1", "embedded:3"):
        # exactly part 0 survives: an unrenamed or half-computed part is recomputed, never trusted
        assert (summary["resumed"], summary["processed"]) == (PART, N - PART)
    _assert_same_as_reference(out, ref)


@pytest.mark.slow
def test_external_kill_9_at_an_arbitrary_moment_then_resume(job: dict[str, object], tmp_path: Path) -> None:
    """SIGKILL from outside as soon as a part exists; the decoder processes must not linger."""
    import psutil

    cmd, ref = job["cmd"], job["ref"]
    assert isinstance(cmd, list) and isinstance(ref, Path)
    out = tmp_path / "out.parquet"
    parts = out.with_name(out.name + ".parts")
    env = {k: v for k, v in os.environ.items() if k != "STEADYCLIP_BATCH_TEST_KILL_AT"}
    proc = subprocess.Popen(cmd + ["--part-size", "2", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    children: list[psutil.Process] = []
    while proc.poll() is None and time.monotonic() < deadline:
        if any(parts.glob("part-*.parquet")):
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"decoder processes outlived their killed parent: {alive}"
    resumed = _run(cmd + ["--part-size", "2", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    ref2 = _run(cmd + ["--part-size", "2", "--out", str(tmp_path / "ref2.parquet")])
    assert ref2.returncode == 0, ref2.stderr
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "ref2.parquet"))
    assert pq.read_table(out).select(["index", "probs", "embedding"]).equals(
        pq.read_table(ref).select(["index", "probs", "embedding"])), "part size never changes the numbers"

