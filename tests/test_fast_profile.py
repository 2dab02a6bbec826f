"""The ``fast`` profile: bf16 weights cast once, refused without native bf16, drift measured and recorded.

This CI machine may lack native bf16 (AMD EPYC Zen 2): tests that need bf16 numbers opt in
explicitly (``allow_emulated_bf16=True`` / ``STEADYCLIP_ASSUME_NATIVE_BF16=1``), the way a user
who knows better would; the detection itself is forced on and off through the CPU flags it reads.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from steadyclip.cli import cli
from steadyclip.engine import Engine, precision
from steadyclip.engine.layout import usable_cpus
from steadyclip.errors import DeviceError, IntegrityError
from steadyclip.model.loading import LoadedModel, load
from steadyclip.model.registry import demo_labels
from steadyclip.numerics import drift, selfcheck

EXAMPLE = "examples/red_circle.png"


def _force_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str] | None, machine: str = "x86_64") -> None:
    precision.cpu_bf16_support.cache_clear()
    monkeypatch.setattr(precision, "read_cpu_flags", lambda path=precision.CPUINFO: (flags, "Test CPU"))
    monkeypatch.setattr(platform, "machine", lambda: machine)  # the module precision reads


@pytest.fixture(autouse=True)
def _clean_detection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(precision.ASSUME_ENV, raising=False)
    precision.cpu_bf16_support.cache_clear()
    yield
    precision.cpu_bf16_support.cache_clear()


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load()


def _fast(loaded: LoadedModel, **kw: Any) -> Engine:
    return Engine(loaded, profile="fast", allow_emulated_bf16=True, text_cache=None, **kw)


def test_fast_on_a_cpu_without_native_bf16_refuses_and_names_strict(monkeypatch: pytest.MonkeyPatch,
                                                                     loaded: LoadedModel) -> None:
    _force_cpu_flags(monkeypatch, {"sse4_2", "avx2", "avx512f", "fma"})
    with pytest.raises(DeviceError, match="no native bf16") as info:
        Engine(loaded, profile="fast")
    msg = str(info.value)
    assert "'strict'" in msg and "slower than fp32" in msg and precision.ASSUME_ENV in msg
    assert "avx512_bf16" in msg  # says what it looked for


def test_the_cli_refusal_is_an_error_exit_that_names_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    _force_cpu_flags(monkeypatch, set())
    result = CliRunner().invoke(cli, ["classify", EXAMPLE, "--labels", "red circle,blue square", "--profile", "fast"])
    assert result.exit_code == 1
    assert "strict" in result.output and "native bf16" in result.output


@pytest.mark.parametrize(("flags", "machine", "native"), [
    ({"avx512f", "avx512_bf16"}, "x86_64", True),
    ({"amx_bf16", "amx_tile"}, "x86_64", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"asimd", "bf16"}, "aarch64", True),
    (None, "x86_64", False),  # no /proc/cpuinfo: nothing assumed
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str] | None,
                                                machine: str, native: bool) -> None:
    _force_cpu_flags(monkeypatch, flags, machine)
    support = precision.cpu_bf16_support()
    assert support.native is native
    assert set(support.features) <= (flags or set())


def test_cpuinfo_parsing(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel Xeon X\nflags\t\t: fpu avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Intel Xeon X\nflags\t\t: fpu avx512_bf16 amx_bf16\n")
    flags, name = precision.read_cpu_flags(info)
    assert name == "Intel Xeon X" and flags is not None and {"avx512_bf16", "amx_bf16"} <= flags
    assert precision.read_cpu_flags(tmp_path / "missing") == (None, "unknown")


def test_env_override_is_explicit_and_recorded(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel) -> None:
    _force_cpu_flags(monkeypatch, set())
    monkeypatch.setenv(precision.ASSUME_ENV, "1")
    prov = Engine(loaded, profile="fast", text_cache=None).provenance
    assert prov.reduced_precision is not None
    assert prov.reduced_precision["native_bf16"] is False
    assert prov.reduced_precision["emulated_bf16_allowed_by"] == f"{precision.ASSUME_ENV}=1"
    monkeypatch.setenv(precision.ASSUME_ENV, "perhaps")
    with pytest.raises(DeviceError, match="not understood"):
        Engine(loaded, profile="fast")


def test_on_a_native_bf16_cpu_nothing_needs_allowing(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel) -> None:
    _force_cpu_flags(monkeypatch, {"avx512_bf16"})
    engine = Engine(loaded, profile="fast", text_cache=None)
    assert engine.cast is not None and engine.cast.record["emulated_bf16_allowed_by"] is None


def test_fast_runs_bf16_weights_returns_float32_and_leaves_the_loaded_model_fp32(loaded: LoadedModel) -> None:
    strict = Engine(loaded, text_cache=None)
    before = strict.embed_images([EXAMPLE])
    fast = _fast(loaded)
    emb = fast.embed_images([EXAMPLE])
    assert emb.dtype == np.float32 and emb.shape == before.shape
    assert fast.cast is not None
    assert {p.dtype for p in fast.cast.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    loaded.check_buffers()  # the fp32 original's tamper check still holds
    assert not np.array_equal(emb, before)  # really another precision...
    assert float((emb * before).sum()) > 0.999  # ...close to strict
    assert np.array_equal(strict.embed_images([EXAMPLE]), before)  # and strict is unaffected
    res = fast.classify([EXAMPLE], demo_labels())[0]
    assert res.label == "red circle" and res.provenance.precision == "bf16"


def test_a_changed_cast_copy_refuses_inference(loaded: LoadedModel) -> None:
    fast = _fast(loaded)
    assert fast.cast is not None
    with torch.no_grad():
        next(fast.cast.model.parameters()).add_(1)
    with pytest.raises(IntegrityError, match="reduced-precision copy"):
        fast.embed_images([EXAMPLE])


def test_fast_provenance_carries_measured_drift_and_thread_verdict(loaded: LoadedModel) -> None:
    fast = _fast(loaded)
    prov = fast.classify([EXAMPLE], demo_labels())[0].provenance
    rp = prov.reduced_precision
    assert rp is not None and rp["weights_dtype"] == "bf16" and rp["outputs_dtype"] == "fp32"
    d = rp["drift_vs_strict"]
    assert 0.999 < d["min_cosine"] < 1.0  # measured: bf16 is close to but not fp32
    assert 0.0 < d["max_abs_prob"] < 0.2 and d["top1_agreement"] == 1.0
    assert rp["threads"]["pinned"] == prov.threads
    assert rp["threads"]["verdict"] == _measured_thread_verdict(fast, rp["threads"]["compared"])
    assert "drift_vs_strict=min_cos" in prov.summary()
    assert Engine(loaded, text_cache=None).provenance.reduced_precision is None


def _measured_thread_verdict(fast: Engine, compared: list[int]) -> str:
    """The thread verdict measured afresh on the fast engine's bf16 towers, at its micro-batch shapes."""
    if usable_cpus() < 2:
        return "not-applicable"
    cast = fast.cast
    assert cast is not None
    model: Any = cast.model
    h, w = fast.loaded.info.preprocess.size
    pixels = torch.randn((fast.micro_batch, 3, h, w), generator=torch.Generator().manual_seed(7))
    tokens = fast.loaded.tokenizer([f"probe text {i}" for i in range(fast.text_micro_batch)])
    towers = [(lambda x: model.encode_image(cast.cast_input(x)), pixels), (model.encode_text, tokens)]
    a, b = sorted(compared)
    same = all(selfcheck.rows_equal_threads(fn, x, fast.profile, "cpu", b, baseline=a) for fn, x in towers)
    return "thread-invariant" if same else "thread-dependent"


def test_drift_is_remembered_on_disk(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel) -> None:
    first = _fast(loaded).provenance.reduced_precision
    assert first is not None

    def must_not_measure(*a: Any, **k: Any) -> None:
        raise AssertionError("drift measured again although it was remembered")

    monkeypatch.setattr(drift, "compare", must_not_measure)
    second = _fast(loaded).provenance.reduced_precision
    assert second is not None and second["drift_vs_strict"] == first["drift_vs_strict"]
    assert second["threads"] == first["threads"]


def test_fast_rows_do_not_depend_on_the_batch_they_came_in(loaded: LoadedModel) -> None:
    from steadyclip.demo.shapes import generate

    images = [im for im, _, _ in generate(11, seed=5)]
    fast = _fast(loaded)
    alone = fast.embed_images(images[:1])
    for batch in (images[:3], images[:8], images):
        assert np.array_equal(fast.embed_images(batch)[0], alone[0])


def test_ambient_autocast_does_not_leak_into_strict(loaded: LoadedModel) -> None:
    strict = Engine(loaded, text_cache=None)
    plain = strict.embed_images([EXAMPLE])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = Engine(loaded, text_cache=None).embed_images([EXAMPLE])
    assert np.array_equal(plain, inside)


def test_lock_pins_fast_outputs_and_verify_finds_them_bitwise(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv(precision.ASSUME_ENV, "1")
    lock = tmp_path / "fast.lock"
    run = CliRunner().invoke(cli, ["lock", "steadyclip-demo", "--profile", "fast", "-o", str(lock)],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    probe = json.loads(lock.read_text())["probe"]
    kind = "native" if precision.cpu_bf16_support().native else "emulated"  # this machine's own bf16
    assert probe["stack"]["precision"] == "bf16" and probe["stack"]["bf16"] == kind
    assert probe["drift_vs_strict"]["min_cosine"] > 0.999
    assert probe["tolerance"]["min_cosine"] < 0.9999  # wider than strict's across stacks
    out = CliRunner().invoke(cli, ["verify", "--lock", str(lock), "--json"], catch_exceptions=False)
    doc = json.loads(out.output)
    assert out.exit_code == 0 and doc["probe"]["status"] == "bitwise-identical"


def test_fast_lock_on_another_stack_is_checked_within_the_fast_tolerance(monkeypatch: pytest.MonkeyPatch,
                                                                         loaded: LoadedModel) -> None:
    from steadyclip.engine.probe import compare_probe, run_probe

    stored = run_probe(_fast(loaded))
    here = stored["stack"]["cpu_capability"]
    stored["stack"]["cpu_capability"] = "AVX2" if here != "AVX2" else "AVX512"  # as if written on another CPU
    strict_written = run_probe(Engine(loaded, text_cache=None))  # fp32 outputs: within fast's tolerance
    report = compare_probe({**stored, "images": strict_written["images"], "texts": strict_written["texts"]},
                           _fast(loaded))
    assert report.status == "within-tolerance" and not report.same_stack


def test_doctor_precision_drift_measures_the_fast_profile_the_engine_way(loaded: LoadedModel) -> None:
    from steadyclip.demo.shapes import generate
    from steadyclip.doctor import diagnose

    images = [im for im, _, _ in generate(3, seed=7)]
    d = diagnose(loaded.model, loaded.preprocess, loaded.tokenizer, images=images,
                 labels=["red circle", "blue square", "green star"], runs=1)
    cause = next(c for c in d.causes if c.id == "precision_drift")  # "info": autocast not in use
    fast = cause.evidence["steadyclip_fast"]
    assert fast["dtype"] == "bfloat16" and 0.999 < fast["min_cosine"] <= 1.0
    assert 0.0 <= fast["max_abs_prob"] < 0.2 and fast["images"] == 3 and fast["labels"] == 3
