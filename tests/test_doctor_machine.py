"""doctor names another machine's CPU as the cause when a lock made there disagrees here, and portable as the fix."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from steadyclip._util.digest import sha256_array
from steadyclip.doctor.checks_machine import check_cross_machine
from steadyclip.doctor.result import Findings


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STEADYCLIP_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "steadyclip", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def _as_if_made_on(lock: Path, vendor: str, model: str) -> None:
    """Rewrite a lock's probe as another CPU computes it: other CPU facts, rows moved by float rounding."""
    doc = json.loads(lock.read_text())
    probe = doc["probe"]
    probe["stack"] |= {"cpu_vendor": vendor, "cpu_model": model, "cpu_capability": "AVX512"}
    rows = np.frombuffer(base64.b64decode(probe["images"]["data"]), dtype="<f4").copy()
    rows[::7] = np.nextafter(rows[::7], np.float32(2))  # one ulp: what another GEMM kernel's rounding does
    probe["images"] |= {"data": base64.b64encode(rows.tobytes()).decode(), "sha256": sha256_array(rows)}
    lock.write_text(json.dumps(doc))


def test_a_lock_from_another_cpu_is_named_as_the_cause_with_portable_as_fix(tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    made = _cli("lock", "-o", str(lock), cache=tmp_path / "c")
    assert made.returncode == 0, made.stderr
    findings = Findings()  # made here: nothing to report
    check_cross_machine(findings, lock)
    assert [(c.id, c.status) for c in findings.checks] == [("cross_machine_numerics", "ok")]

    _as_if_made_on(lock, "GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+")
    other = _cli("doctor", "--demo", "--eval", "--runs", "2", "--lock", str(lock), "--json", cache=tmp_path / "c")
    assert other.returncode == 3, other.stderr
    cause = next(c for c in json.loads(other.stdout)["causes"] if c["id"] == "cross_machine_numerics")
    assert cause["evidence"]["cpu_then"]["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cause["evidence"]["cpu_now"]["cpu_vendor"] != "GenuineIntel" or \
        cause["evidence"]["cpu_now"]["cpu_model"] != "Intel(R) Xeon(R) Platinum 8480+"
    assert 0 < cause["evidence"]["max_abs"] < 1e-5
    assert "--profile portable" in cause["fix"]
