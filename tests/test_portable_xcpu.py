"""Portable rows are the same bits on other CPUs: Intel Sandy Bridge (AVX, no FMA), Haswell (AVX2+FMA), AMD EPYC-Rome.

Each CPU is emulated by qemu-user running this venv's Python unchanged (``qemu-x86_64 -cpu X``); the
script computes everything in that one process (no exec: a process that execs leaves the emulator),
and reports the CPU its own CPUID instruction saw, so the test proves which CPU computed the rows.
CI installs qemu-user (``make qemu``); elsewhere the test is skipped when it is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from steadyclip.model.integrity import HashCache, sha256_file
from steadyclip.model.registry import DEMO_SPEC
from steadyclip.numerics.early import PORTABLE_ENV

SCRIPT = Path(__file__).parent / "scripts" / "portable_rows.py"
# (qemu CPU model, the vendor its CPUID must report, features it must have, features it must lack)
CPUS = (("SandyBridge", "GenuineIntel", {"avx"}, {"fma", "avx2"}),
        ("Haswell-v4", "GenuineIntel", {"avx", "fma", "avx2"}, {"avx512f"}),
        ("EPYC-Rome", "AuthenticAMD", {"avx", "fma", "avx2"}, {"avx512f"}))
ROWS = ("demo_images", "demo_texts", "arch_images", "arch_texts")
ARCH = "ViT-S-32"


def _qemu() -> str:
    path = shutil.which("qemu-x86_64")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: CI must install it (make qemu)")
        pytest.skip("qemu-user is not installed (make qemu)")
    return path


def _start(prefix: list[str], weights: Path, cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, **PORTABLE_ENV, "STEADYCLIP_CACHE_DIR": str(cache)}
    cmd = [*prefix, sys.executable, str(SCRIPT), "--arch", ARCH, "--weights", str(weights)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return doc


@pytest.mark.slow
def test_rows_are_bitwise_the_same_on_emulated_intel_and_amd_cpus(
        arch_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    qemu = _qemu()
    weights = arch_checkpoint(ARCH)
    # Fill the weights' hash cache the runs read (hashing 240 MB under emulation would take longer
    # than the rows), then start the host and every emulated CPU at once.
    for path in (weights, DEMO_SPEC.weights_file):
        if path is not None:
            sha256_file(path, cache=HashCache(tmp_path / "sha256-cache.json"))
    procs = {"host": _start([], weights, tmp_path)}
    procs |= {name: _start([qemu, "-cpu", name], weights, tmp_path) for name, *_ in CPUS}
    host = _result(procs["host"])
    assert host["proof"] == "proven" and host["capability"] == "DEFAULT" and host["blas"].lower() == "sandybridge"
    for name, vendor, has, lacks in CPUS:
        got = _result(procs[name])
        features = set(got["cpu"]["features"].split())
        # the emulated CPU computed these rows: its own CPUID answered, not the host's
        assert got["cpu"]["source"] == "cpuid" and got["cpu"]["cpu_vendor"] == vendor, got["cpu"]
        assert has <= features and not lacks & features, (name, features)
        assert {k: got[k] for k in ROWS} == {k: host[k] for k in ROWS}, f"{name} computed other bits"
        assert got["proof"] == "proven"
