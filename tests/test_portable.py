"""The portable profile on this machine: its process, its proof, its files (tests/test_portable_xcpu.py: other CPUs)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import steadyclip
from steadyclip._util.digest import sha256_array
from steadyclip.batch import read_metadata
from steadyclip.errors import PortableSetupError
from steadyclip.numerics.early import PORTABLE_ENV
from steadyclip.numerics.portable import is_ready

EXAMPLES = sorted(str(p) for p in Path("examples").glob("*.png"))
LABELS = "red circle,blue square,green triangle,yellow star,purple cross,pink ring"
# One process started with the portable variables: the demo's proof against the shipped golden, a
# forged one and none, and its rows of the examples computed in that (ready) process itself.
SCRIPT = """
import json, sys
from pathlib import Path
import steadyclip
from steadyclip._util.digest import sha256_array
from steadyclip.engine import portable_proof
out = {}
for name, golden in json.loads(sys.argv[1]).items():
    if golden:
        portable_proof.GOLDEN_FILE = Path(golden)
    try:
        engine = steadyclip.Engine(steadyclip.load(), profile="portable", replicas=1)
        out[name] = engine.provenance.flags["portable_proof"]
        out["examples"] = sha256_array(engine.embed_images(sys.argv[2:]))
    except steadyclip.errors.SteadyClipError as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(out))
"""
GOLDEN = Path("src/steadyclip/demo/portable-golden.json")


def _env(cache: Path, portable: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    return {**env, "STEADYCLIP_CACHE_DIR": str(cache), **(PORTABLE_ENV if portable else {})}


def _cli(*args: str, cache: Path, portable_env: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steadyclip", *args], capture_output=True, text=True,
                          env=_env(cache, portable_env), timeout=300, check=False)


@pytest.fixture(scope="module")
def ready_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("proofs")
    forged = tmp / "golden.json"
    doc = json.loads(GOLDEN.read_text())
    for entry in doc["entries"]:
        entry["texts"] = "0" * 64
        entry["cpu"] = {"cpu_vendor": "GenuineIntel", "cpu_model": "Some Xeon", "features": "avx fma avx2 avx512f"}
    forged.write_text(json.dumps(doc))
    goldens = {"shipped": None, "forged": str(forged), "none": str(tmp / "none.json")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(goldens), *EXAMPLES], capture_output=True,
                          text=True, env=_env(tmp, True), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_a_library_process_with_other_kernels_computes_in_a_portable_worker(ready_process: dict[str, Any]) -> None:
    # This test process imported torch without the variables: the engine starts a worker that has them.
    assert not is_ready()
    with steadyclip.Engine(steadyclip.load(), profile="portable", replicas=4) as engine:
        rows = engine.embed_images(EXAMPLES)
        proof = engine.provenance.flags["portable_proof"]
        assert engine.replicas == 1 and proof["status"] == "proven" and "worker" in proof
        assert engine.provenance.flags["build"]["cpu_capability"] == "DEFAULT"  # the worker's kernels
    # the same bits as a process started with the variables computes itself
    assert sha256_array(rows) == ready_process["examples"]


def test_a_model_that_cannot_be_loaded_again_is_refused_with_the_fix() -> None:
    loaded = steadyclip.load()
    loaded.info = dataclasses.replace(loaded.info, source="object")
    with pytest.raises(PortableSetupError) as info:
        steadyclip.Engine(loaded, profile="portable")
    assert all(k in str(info.value) for k in PORTABLE_ENV)


def test_the_cli_arranges_its_own_process_and_says_portable(tmp_path: Path) -> None:
    # Started without the variables: the CLI starts itself again with them, once.
    plain = _cli("classify", *EXAMPLES, "--labels", LABELS, "--json", "--profile", "portable", cache=tmp_path / "a")
    assert plain.returncode == 0, plain.stderr
    doc = json.loads(plain.stdout)
    prov = doc["provenance"]
    assert prov["profile"] == "portable"
    assert prov["flags"]["build"]["cpu_capability"] == "DEFAULT"
    assert prov["flags"]["portable_proof"]["status"] == "proven"
    # Started with them already (no exec), at two threads per replica and two replicas: the same bytes.
    ready = _cli("classify", *EXAMPLES, "--labels", LABELS, "--json", "--profile", "portable", "--threads", "2",
                 "--replicas", "2", cache=tmp_path / "b", portable_env=True)
    assert ready.returncode == 0, ready.stderr
    assert [r["probs"] for r in json.loads(ready.stdout)["results"]] == [r["probs"] for r in doc["results"]]


def test_the_shipped_golden_digests_hold_on_this_cpu(ready_process: dict[str, Any]) -> None:
    # Whatever CPU runs the suite (CI's change from run to run): the demo's rows equal the committed golden.
    proof = ready_process["shipped"]
    assert proof.get("status") == "proven", (
        f"{proof}: the golden in {GOLDEN} does not cover this software stack; regenerate it with "
        "python -m steadyclip.demo.make_portable_golden (portable variables set)")
    assert proof["digests"]["images"] in {e["images"] for e in json.loads(GOLDEN.read_text())["entries"]}


def test_other_bits_than_the_golden_refuse_naming_both_cpus(ready_process: dict[str, Any]) -> None:
    out = ready_process["forged"]
    assert out.get("error") == "PortableProofError", out
    assert " in texts:" in out["message"] and "Some Xeon" in out["message"]


def test_without_a_golden_the_proof_says_unproven_never_proven(ready_process: dict[str, Any]) -> None:
    out = ready_process["none"]
    assert out["status"] == "unproven" and "steadyclip lock --profile portable" in out["why"]


def test_batch_files_carry_no_machine_facts_and_are_byte_identical(tmp_path: Path) -> None:
    outs = []
    for replicas in ("1", "2"):
        out = tmp_path / f"r{replicas}.parquet"
        proc = _cli("batch", "examples", "--labels", LABELS, "--embeddings", "--out", str(out), "--profile",
                    "portable", "--replicas", replicas, cache=tmp_path / f"c{replicas}")
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    meta = read_metadata(tmp_path / "r1.parquet")
    build = meta["provenance"]["flags"]["build"]
    assert meta["provenance"]["profile"] == "portable" and meta["provenance"]["threads"] is None
    assert not {"cpu_vendor", "cpu_model", "cpu_count"} & set(build)
    # verify recomputes it portably (the CLI arranges its process from the file's profile)
    check = _cli("verify", str(tmp_path / "r1.parquet"), "--all", "--json", cache=tmp_path / "v")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["verdict"] == "bitwise"
