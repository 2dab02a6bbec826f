"""Profiles set torch's numeric flags for a block and put back exactly what was there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch

from steadyclip.engine.settings import EngineSettings
from steadyclip.errors import DeviceError, InputError
from steadyclip.numerics import determinism
from steadyclip.numerics.determinism import (
    applied,
    autocast,
    get_profile,
    mkl_cbwr_state,
)


def snapshot() -> dict[str, Any]:
    """What a user would see of torch's global numerics, through torch's public API."""
    def safe(fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError:
            return "unreadable"
    return {
        "threads": torch.get_num_threads(),
        "det": torch.are_deterministic_algorithms_enabled(),
        "det_warn": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_det": torch.backends.cudnn.deterministic,
        "cudnn_bench": torch.backends.cudnn.benchmark,
        "cudnn_tf32": safe(lambda: torch.backends.cudnn.allow_tf32),
        "cuda_tf32": safe(lambda: torch.backends.cuda.matmul.allow_tf32),
        "matmul_precision": safe(torch.get_float32_matmul_precision),
        "mkldnn_matmul": torch.backends.mkldnn.matmul.fp32_precision,  # type: ignore[attr-defined]
        "grad": torch.is_grad_enabled(),
    }


STRICT_INSIDE = {"det": True, "det_warn": False, "cudnn_det": True, "cudnn_bench": False, "cudnn_tf32": False,
                 "cuda_tf32": False, "matmul_precision": "highest", "mkldnn_matmul": "ieee", "grad": False}


def test_strict_flags_inside_and_everything_restored_after() -> None:
    before = snapshot()
    with applied(get_profile("strict")) as flags:
        inside = snapshot()
    assert {k: inside[k] for k in STRICT_INSIDE} == STRICT_INSIDE
    assert inside["threads"] == 1 == flags["threads"]
    assert flags["profile"]["name"] == "strict" and flags["autocast_dtype"] is None
    assert flags["deterministic_algorithms"] is True and flags["cudnn_allow_tf32"] is False
    assert snapshot() == before


def test_restored_after_an_exception_inside_the_block() -> None:
    before = snapshot()
    with pytest.raises(ZeroDivisionError), applied(get_profile("fast")):
        assert snapshot()["cuda_tf32"] is True
        1 / 0  # noqa: B018
    assert snapshot() == before


def test_fast_is_reduced_precision_but_still_deterministic() -> None:
    profile = get_profile("fast")
    assert (profile.precision, profile.tf32, profile.deterministic_algorithms) == ("bf16", True, True)
    with applied(profile) as flags:
        inside = snapshot()
    assert inside["det"] and inside["cudnn_det"] and not inside["cudnn_bench"]
    assert inside["cuda_tf32"] is True and inside["matmul_precision"] == "high"
    assert inside["mkldnn_matmul"] == "ieee"  # no silent bf16 for fp32 ops on CPU: the weights are cast explicitly
    assert flags["autocast_dtype"] is None and flags["compute_dtype"] == "bfloat16"
    assert "not bitwise equal to strict" in flags["guarantee"]


def test_nested_profiles_restore_the_outer_one() -> None:
    before = snapshot()
    with applied(get_profile("strict"), threads=2):
        outer = snapshot()
        with applied(get_profile("fast"), threads=1):
            assert snapshot()["cuda_tf32"] is True and snapshot()["threads"] == 1
        assert snapshot() == outer
    assert snapshot() == before


def test_thread_count_is_applied_and_restored() -> None:
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with applied(get_profile("strict")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with applied(get_profile("strict"), threads=2) as flags:
            assert torch.get_num_threads() == 2 and flags["threads"] == 2
    finally:
        torch.set_num_threads(original)


def test_state_set_through_either_torch_api_comes_back_exactly(fresh: dict[str, Any]) -> None:
    # torch >= 2.9 raises on reading legacy TF32 switches that disagree with the new
    # per-backend ones; this runs in a fresh process so its mutations can't leak.
    assert fresh["tf32_states"] == [True] * 10


def test_flags_are_json_serialisable_and_carry_provenance() -> None:
    with applied(get_profile("strict")) as flags:
        pass
    assert json.loads(json.dumps(flags)) == flags
    assert flags["build"]["torch"] == torch.__version__
    assert flags["mkl_cbwr"] == mkl_cbwr_state()
    assert {"mkl_available", "onednn", "cpu_capability", "parallel_backend"} <= set(flags["build"])


def test_rng_is_seeded_inside_and_the_callers_stream_is_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with applied(get_profile("strict", seed=5)):
        first = torch.rand(3)
    with applied(get_profile("strict", seed=5)):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.rand(3), expected)


def test_autocast_is_off_in_every_profile_even_inside_a_callers_autocast() -> None:
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16  # the caller's ambient autocast...
        for name in ("strict", "fast"):
            with autocast(get_profile(name), "cpu"):
                assert (a @ a).dtype == torch.float32  # ...does not reach a steadyclip forward


def test_threads_are_serialised_and_each_sees_its_own_profile() -> None:
    seen: list[tuple[str, bool]] = []
    active = [0]
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for _ in range(5):
                with applied(get_profile(name)):
                    active[0] += 1
                    time.sleep(0.002)
                    seen.append((name, snapshot()["cuda_tf32"] is (name == "fast") and active[0] == 1))
                    active[0] -= 1
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    before = snapshot()
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("strict", "fast", "strict", "fast")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 20 and all(ok for _, ok in seen)
    assert snapshot() == before


def test_unknown_or_unsupported_choices_are_typed_errors() -> None:
    with pytest.raises(InputError, match="unknown profile 'exact'"):
        get_profile("exact")
    with pytest.raises(InputError, match="fp32 only"):
        get_profile("strict", precision="bf16")
    with pytest.raises(InputError, match="threads must be an int >= 1"):
        EngineSettings(threads=0)
    with pytest.raises(InputError, match="precision"):
        get_profile("fast", precision="int8")
    with pytest.raises(DeviceError, match="not supported"):
        get_profile("strict", device="mps")
    with pytest.raises(ValueError):  # InputError is a ValueError too
        get_profile("fastest")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            get_profile("strict", device="cuda")


def test_strict_profile_cannot_be_built_with_loose_settings() -> None:
    with pytest.raises(InputError, match="strict profile is fp32"):
        determinism.Profile("strict", "fp32", tf32=True, deterministic_algorithms=True)


def test_cublas_workspace_is_set_before_cuda_or_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")  # set at import
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    determinism._ensure_cublas_config()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(DeviceError, match="export CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        determinism._ensure_cublas_config()


# ---- MKL conditional numerical reproducibility (needs fresh processes) -------------------
_ROWS = textwrap.dedent("""
    import json, os, sys
    late = sys.argv[1] == "late"
    if not late:
        import steadyclip  # runs early_init before torch's first GEMM
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 512)
    x = torch.randn(17, 768)
    with torch.no_grad():
        rows = {n: lin(x[:n])[0] for n in (1, 4, 8, 17)}
        rows["1_padded_to_8"] = lin(torch.cat([x[:1], torch.zeros(7, 768)]))[0]  # what the engine does
    if late:
        import steadyclip  # after a GEMM: too late for MKL to notice
    from steadyclip.numerics.determinism import current_flags, mkl_cbwr_effective, mkl_cbwr_state
    print(json.dumps({"state": mkl_cbwr_state(), "effective": mkl_cbwr_effective(),
                      "status": current_flags()["mkl_cbwr_status"],
                      "equal_to_8": {n: bool(torch.equal(r, rows[8])) for n, r in rows.items()},
                      "max_diff_1_vs_8": float((rows[1] - rows[8]).abs().max())}))
""")


_TF32_STATES = textwrap.dedent("""
    import json, torch
    from steadyclip.numerics.determinism import applied, get_profile
    setups = [lambda: None, lambda: torch.set_float32_matmul_precision("medium"),
              lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
              lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
              lambda: setattr(torch.backends, "fp32_precision", "tf32")]
    def state():
        leaves = [("generic", "all")] + [(b, o) for b in ("cuda", "mkldnn") for o in ("all", "matmul", "conv", "rnn")]
        out = [torch._C._get_fp32_precision_getter(b, o) for b, o in leaves]
        for f in (torch.get_float32_matmul_precision, lambda: torch.backends.cudnn.allow_tf32):
            try: out.append(f())
            except RuntimeError: out.append("unreadable")
        return out
    same = []
    for setup in setups:
        setup(); before = state()
        for name in ("strict", "fast"):
            with applied(get_profile(name)):
                pass
            same.append(state() == before)
    print(json.dumps(same))
""")


# restore() puts back deterministic mode without torch.use_deterministic_algorithms' import of torch._inductor
_RESTORE_IMPORTS = textwrap.dedent("""
    import json, sys, torch
    from steadyclip.numerics import determinism
    saved = determinism.snapshot()
    torch._C._set_deterministic_algorithms(True)
    changed = determinism.restore(saved)
    print(json.dumps({"changed": changed, "deterministic": torch.are_deterministic_algorithms_enabled(),
                      "inductor_imported": "torch._inductor.config" in sys.modules}))
""")


@pytest.fixture(scope="module")
def fresh() -> dict[str, Any]:
    """Run the scripts that need a process of their own, all at once (each pays a torch import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_VERBOSE")}
    jobs = {"mkl_early": (_ROWS, "early"), "mkl_late": (_ROWS, "late"), "tf32_states": (_TF32_STATES, ""),
            "restore_imports": (_RESTORE_IMPORTS, "")}
    procs = {name: subprocess.Popen([sys.executable, "-c", code, arg], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (code, arg) in jobs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: {err}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def test_mkl_strict_cnr_reaches_mkl_and_fixed_batch_rows_agree(fresh: dict[str, Any],
                                                               record_property: Any) -> None:
    early = fresh["mkl_early"]
    assert early["state"] == "AUTO,STRICT"
    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        assert early["effective"] is None and early["status"] == "unknown"
    else:  # a torch with MKL must let us ask it, and MKL must report the strict mode
        assert early["effective"] is not None and early["effective"].endswith(",STRICT")
        assert early["status"] == "in effect"
    assert early["equal_to_8"]["17"] and early["equal_to_8"]["4"], (
        "a row at batch 8 vs 17 differs even with MKL_CBWR strict: only fixed batch shapes are safe here")
    record_property("mkl_batch1_equals_batch8_strict", early["equal_to_8"]["1"])
    record_property("mkl_batch1_vs_8_max_diff_strict", early["max_diff_1_vs_8"])
    record_property("mkl_batch1_equals_batch8_without_cbwr", fresh["mkl_late"]["equal_to_8"]["1"])


def test_mkl_cbwr_set_after_the_first_gemm_is_reported_as_off(fresh: dict[str, Any]) -> None:
    late = fresh["mkl_late"]
    assert late["state"] == "AUTO,STRICT"  # the environment asks for it...
    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        assert late["effective"] is None and late["status"] == "unknown"
    else:
        assert late["effective"] == "OFF" and late["status"] == "too late"  # ...but MKL had already decided


def test_a_row_padded_to_the_fixed_batch_equals_its_row_in_a_full_batch(fresh: dict[str, Any]) -> None:
    # MKL_CBWR alone does not make batch 1 equal batch 8 everywhere (AMD EPYC, MKL 2024.2: batch 1-3
    # take another GEMM kernel; recorded above); padding to the fixed shape, as the engine does, does.
    for job in ("mkl_early", "mkl_late"):
        assert fresh[job]["equal_to_8"]["1_padded_to_8"], job


def test_restore_puts_back_what_the_callers_code_changed() -> None:
    torch.manual_seed(7)
    before, rng = snapshot(), torch.get_rng_state()
    saved = determinism.snapshot()
    torch.set_num_threads(2)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("medium")
    torch._C._set_mkldnn_enabled(not torch._C._get_mkldnn_enabled())
    torch.set_grad_enabled(not torch.is_grad_enabled())
    torch.rand(5)  # the RNG stream moves on
    try:
        changed = determinism.restore(saved)
    finally:
        torch.set_grad_enabled(before["grad"])
    assert sorted(changed) == ["cudnn_benchmark", "fp32_precision", "grad_enabled", "onednn_enabled", "threads"]
    assert snapshot() == before and torch.equal(torch.get_rng_state(), rng)
    assert determinism.restore(saved) == []  # nothing differs any more


def test_restore_does_not_pay_for_torch_inductor(fresh: dict[str, Any]) -> None:
    out = fresh["restore_imports"]
    assert out == {"changed": ["deterministic_algorithms"], "deterministic": False, "inductor_imported": False}


def test_thread_count_changes_only_the_threads_for_the_block() -> None:
    before = snapshot()
    other = 2 if before["threads"] == 1 else 1
    with determinism.thread_count(other):
        inside = snapshot()
    assert inside == before | {"threads": other}
    assert snapshot() == before


def test_user_mkl_cbwr_wins_and_state_is_recorded_in_process() -> None:
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    code = "import os, steadyclip; print(os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "COMPATIBLE"
    assert mkl_cbwr_state() == os.environ.get("MKL_CBWR")


def test_strict_turns_onednn_off_and_restores_it() -> None:
    from steadyclip.numerics.determinism import applied, get_profile

    before = torch._C._get_mkldnn_enabled()
    with applied(get_profile("strict")) as flags:
        assert flags["onednn_enabled"] is False
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled() == before
    with applied(get_profile("fast")):
        assert torch._C._get_mkldnn_enabled()
