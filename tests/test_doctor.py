"""`steadyclip.diagnose`: each known cause of unstable CLIP results is found, ranked first and fixable.

Small real open_clip architectures (the demo's timm ConvNeXt, a tiny ModifiedResNet
with BatchNorm), random init, 64 px images, 2-3 runs: the whole file runs in seconds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from _doctor_models import LABELS, TINY_RN, build, drop_path_convnext, register_configs
from open_clip.transform import PreprocessCfg, image_transform_v2

from steadyclip.doctor import Diagnosis, diagnose
from steadyclip.doctor.result import NUMERIC_TOL, PROB_TOL
from steadyclip.model.integrity import buffers_fingerprint, state_fingerprint
from steadyclip.model.registry import DEMO_ARCH


@pytest.fixture(scope="module", autouse=True)
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return register_configs(tmp_path_factory.mktemp("cfg"))


def ids(d: Diagnosis) -> list[str]:
    return [c.id for c in d.problems]


# ---- the causes, one by one -----------------------------------------------------------

def test_drop_path_in_train_mode_is_found_and_eval_fixes_it(images: list[Any]) -> None:
    model = drop_path_convnext()  # train mode, as open_clip returns it
    d = diagnose(model, images=images, labels=LABELS, runs=3)
    assert d.verdict == "unstable"
    assert d.top is not None and d.top.id == "stochastic_layers"
    kinds = d.top.evidence["count_by_kind"]
    assert set(kinds) == {"drop_path"} and kinds["drop_path"] == 8
    assert all(".drop_path" in lay["path"] for lay in d.top.evidence["layers"])
    assert d.top.severity is not None and d.top.severity > 1e-3  # visible run-to-run spread
    assert d.top.evidence["spread_eval"] == 0.0
    assert "model.eval()" in d.top.fix
    assert {"train_mode", "stochastic_layers"} <= set(ids(d))
    # the as-is runs really differ, the fixed ones are bitwise equal
    assert d.runs[0].as_is != d.runs[1].as_is
    assert d.runs[0].fixed == d.runs[1].fixed == d.runs[2].fixed

    model.eval()
    fixed = diagnose(model, images=images, labels=LABELS, runs=3)
    assert fixed.verdict == "stable", [c.to_dict() for c in fixed.problems]


def test_batchnorm_in_train_mode_ranks_train_mode_and_reports_mutated_stats(images: list[Any]) -> None:
    model = build(TINY_RN)
    d = diagnose(model, images=images, labels=LABELS, runs=2)
    assert d.verdict == "unstable"
    assert d.top is not None and d.top.id == "train_mode"
    stoch = d.cause("stochastic_layers")
    assert stoch is not None and set(stoch.evidence["count_by_kind"]) == {"batch_statistics"}
    # same batch every run -> no run-to-run spread, but an image's answer depends on its batch-mates
    assert stoch.evidence["spread_train_mode"] == 0.0
    assert stoch.evidence["batch_composition_effect"] > 1e-3
    mutated = d.cause("buffers_mutated")
    assert mutated is not None and mutated.level == "problem"
    assert any(n.endswith("running_mean") for n in mutated.evidence["names"])
    assert mutated.evidence["after_runs"] == 2

    model.eval()
    assert diagnose(model, images=images, labels=LABELS, runs=2).verdict == "stable"


def test_random_init_on_every_load_is_told_apart_from_a_changing_file(images: list[Any], tmp_path: Path) -> None:
    d = diagnose(images=images, labels=LABELS, runs=2, loader=lambda: open_clip.create_model(DEMO_ARCH).eval())
    assert d.top is not None and d.top.id == "random_init", [c.id for c in d.causes]
    ev = d.top.evidence
    assert ev["same_seed_reproduces_weights"] is True
    assert 0 < ev["differing_tensors"] <= ev["total_tensors"]
    assert "randomly initialised" in d.top.summary
    assert ev["fingerprints"][0] != ev["fingerprints"][1]
    assert any("initialized randomly" in w for w in ev["loader_warnings"])
    assert d.top.severity is not None and d.top.severity > PROB_TOL
    # each as-is run is a fresh load, as in a fresh process: the symptom shows in the runs
    assert d.runs[0].as_is != d.runs[1].as_is and d.runs[0].fixed == d.runs[1].fixed

    ckpt = tmp_path / "w.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in build(DEMO_ARCH).state_dict().items()}, str(ckpt))

    def pinned() -> Any:  # open_clip models are untyped
        model = open_clip.create_model(DEMO_ARCH)
        model.load_state_dict(load_file(str(ckpt)))
        return model.eval()

    assert diagnose(images=images, labels=LABELS, runs=2, loader=pinned).verdict == "stable"


@pytest.mark.parametrize("tell_file", [True, False], ids=["file-hashed", "seed-experiment"])
def test_weights_file_rewritten_between_loads(images: list[Any], tmp_path: Path, tell_file: bool) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "latest.safetensors"
    calls = {"n": 0}
    template = build(DEMO_ARCH)

    def rewrite_then_load() -> Any:  # open_clip models are untyped
        # another process "keeps training": new bytes in the file before every load
        gen = torch.Generator().manual_seed(100 + calls["n"])
        calls["n"] += 1
        state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
                 for k, v in template.state_dict().items()}
        save_file(state, str(ckpt))
        model = open_clip.create_model(DEMO_ARCH)
        model.load_state_dict(load_file(str(ckpt)))
        return model.eval()

    d = diagnose(images=images, labels=LABELS, runs=2, loader=rewrite_then_load,
                 weights_file=ckpt if tell_file else None)
    assert d.top is not None and d.top.id == "weights_changed", [c.id for c in d.causes]
    assert d.cause("random_init") is None
    if tell_file:
        hashes = d.top.evidence["file_sha256_per_load"]
        assert hashes[0] != hashes[1] and d.top.evidence["file_changed_between_loads"] is True
    else:
        assert d.top.evidence["same_seed_reproduces_weights"] is False

    def load_pinned() -> Any:  # the fix: a file nothing rewrites
        model = open_clip.create_model(DEMO_ARCH)
        model.load_state_dict(load_file(str(ckpt)))
        return model.eval()

    fixed = diagnose(images=images, labels=LABELS, runs=2, loader=load_pinned, weights_file=ckpt)
    assert fixed.verdict == "stable" and fixed.cause("weights_changed") is None


def test_bf16_autocast_drift_is_found_and_fp32_is_stable(images: list[Any]) -> None:
    model = build(DEMO_ARCH).eval()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(60.0)))  # sharp probabilities: precision shows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = diagnose(model, images=images, labels=LABELS, runs=2)
    assert d.top is not None and d.top.id == "precision_drift" and d.top.level == "problem"
    ev = d.top.evidence
    assert ev["autocast_in_use"] is True and ev["autocast_dtype"] == "bfloat16"
    assert ev["max_abs_prob_diff_autocast_vs_fp32"] > 1e-3
    assert 0.0 <= ev["top1_agreement"] <= 1.0 and "min_top1_top2_margin_fp32" in ev
    assert d.environment["autocast_in_use"] == "bfloat16"
    # the as-is runs really ran under autocast: they differ from the fixed fp32 runs
    assert d.runs[0].as_is != d.runs[0].fixed

    # the same, declared instead of ambient (autocast inside the user's own forward)
    declared = diagnose(model, images=images, labels=LABELS, runs=1, amp="bf16")
    assert declared.top is not None and declared.top.id == "precision_drift"

    fixed = diagnose(model, images=images, labels=LABELS, runs=2)  # no autocast
    assert fixed.verdict == "stable"
    note = fixed.cause("precision_drift")
    assert note is not None and note.level == "info"  # what AMP *would* do, not a problem


def test_non_finite_weights(images: list[Any]) -> None:
    model = build(DEMO_ARCH).eval()
    with torch.no_grad():
        model.visual.head.proj.weight[0, 0] = float("nan")
    d = diagnose(model, images=images, labels=LABELS, runs=1)
    c = d.cause("non_finite")
    assert c is not None and c.level == "problem" and c.severity is None
    assert "visual.head.proj.weight" in c.evidence["weights"]
    assert d.top is not None and d.top.id == "non_finite"
    drift = [c.status for c in d.checks if c.id == "precision_drift"]
    assert drift == ["skipped"], drift  # NaN compares as "no drift": never reported as ok
    json.dumps(d.to_dict(), allow_nan=False)  # NaN probabilities become null


def test_preprocess_mismatch_is_described_and_measured(images: list[Any]) -> None:
    from torchvision import transforms as T

    model = build(DEMO_ARCH).eval()
    wrong = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(),
                       T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    d = diagnose(model, wrong, images=images, labels=LABELS, runs=2)
    c = d.cause("preprocess_mismatch")
    assert c is not None and c.level == "problem"
    assert {x["field"] for x in c.evidence["differences"]} == {"mean", "std", "interpolation"}
    assert c.severity is not None and c.severity > PROB_TOL
    # the fixed runs use the model's own transform
    assert d.runs[0].fixed != d.runs[0].as_is

    right = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    assert diagnose(model, right, images=images, labels=LABELS, runs=2).verdict == "stable"


def test_training_transform_is_random_preprocess(images: list[Any]) -> None:
    model = build(DEMO_ARCH).eval()
    train_tf = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=True)
    d = diagnose(model, train_tf, images=images, labels=LABELS, runs=3)
    c = d.cause("preprocess_random")
    assert c is not None and c.level == "problem" and "RandomResizedCrop" in c.evidence["random_steps"]
    assert d.top is not None and d.top.id in ("preprocess_random", "preprocess_mismatch")


def test_weights_corrupted_against_lock_and_hash(images: list[Any], tmp_path: Path) -> None:
    model = build(DEMO_ARCH).eval()
    ckpt = tmp_path / "w.bin"
    ckpt.write_bytes(b"some weights")
    lock = {"steadyclip_lock": 1, "model": {"fingerprint": "f" * 64, "weights_sha256": "0" * 64}}
    d = diagnose(model, images=images, labels=LABELS, runs=1, lock=lock, weights_file=ckpt)
    c = d.cause("weights_corrupted")
    assert c is not None and c.level == "problem"
    assert {m["what"] for m in c.evidence["mismatches"]} == {"weights_sha256", "fingerprint"}
    assert d.top is c

    import hashlib

    digest = hashlib.sha256(b"some weights").hexdigest()
    good = {"steadyclip_lock": 1, "model": {"fingerprint": state_fingerprint(model), "weights_sha256": digest}}
    ok = diagnose(model, images=images, labels=LABELS, runs=1, lock=good, weights_file=ckpt)
    assert ok.verdict == "stable" and ok.cause("weights_corrupted") is None
    # a known hash may be a prefix (as `steadyclip verify` accepts it); another prefix is a mismatch
    prefix = diagnose(model, images=images, labels=LABELS, runs=1, expected_sha256=digest[:12].upper(),
                      weights_file=ckpt)
    assert {c.id: c.status for c in prefix.checks}["weights_corrupted"] == "ok"
    other = diagnose(model, images=images, labels=LABELS, runs=1, expected_sha256="0" * 12, weights_file=ckpt)
    assert other.top is not None and other.top.id == "weights_corrupted"


def test_a_malformed_expected_hash_is_refused_before_any_forward(images: list[Any]) -> None:
    from steadyclip.errors import InputError

    with pytest.raises(InputError, match="8 to 64 hex digits"):
        diagnose(build(DEMO_ARCH).eval(), images=images, labels=LABELS, runs=1, expected_sha256="not-a-hash")


def test_half_precision_weights_are_precision_drift_and_stay_half(images: list[Any]) -> None:
    model = build(DEMO_ARCH).eval().to(torch.bfloat16)
    d = diagnose(model, images=images, labels=LABELS, runs=2)
    c = d.cause("precision_drift")
    assert c is not None and c.level == "problem" and c.evidence["weights_dtype"] == "bfloat16"
    assert c.evidence["max_abs_prob_diff_weights_vs_fp32"] > PROB_TOL
    assert d.top is c
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the user's model is not converted


# ---- no false alarms, no side effects ---------------------------------------------------

def test_healthy_model_is_stable_and_numeric_noise_is_only_info(images: list[Any]) -> None:
    model = build(DEMO_ARCH).eval()
    d = diagnose(model, images=images, labels=LABELS, runs=3)
    assert d.verdict == "stable", [c.to_dict() for c in d.problems]
    assert d.problems == ()
    for c in d.causes:
        assert c.level == "info"
        if c.id in ("batch_variance", "thread_variance"):
            assert c.severity is not None and c.severity <= NUMERIC_TOL
    statuses = {c.id: c.status for c in d.checks}
    assert statuses["train_mode"] == "ok" and statuses["buffers_mutated"] == "ok"
    if torch.cuda.is_available():  # measured against CUDA, and CPU/CUDA rounding is at most a note
        assert statuses["device_drift"] in ("ok", "info"), statuses["device_drift"]
    else:
        assert statuses["device_drift"] == "skipped"
    # eval fp32 is repeatable as-is; it differs from the strict profile's numerics only at float rounding
    assert d.runs[0].as_is == d.runs[1].as_is == d.runs[2].as_is
    assert d.runs[0].fixed == d.runs[1].fixed == d.runs[2].fixed
    assert np.abs(np.array(d.runs[0].as_is) - np.array(d.runs[0].fixed)).max() <= NUMERIC_TOL


def test_train_mode_without_stochastic_layers_is_only_a_note(images: list[Any]) -> None:
    model = build(DEMO_ARCH)
    for m in model.modules():  # no DropPath/Dropout left: train mode changes nothing here
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    model.visual.head.drop.p = 0.0
    d = diagnose(model, images=images, labels=LABELS, runs=2)
    c = d.cause("train_mode")
    assert c is not None and c.level == "info" and c.severity is not None and c.severity <= PROB_TOL
    assert d.verdict == "stable"


def test_preprocessed_tensor_input_skips_preprocess_checks() -> None:
    model = build(DEMO_ARCH).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    d = diagnose(model, images=pixels, labels=LABELS, runs=1, image_names=["x", "y"])
    assert d.verdict == "stable" and d.images == ("x", "y")
    statuses = {c.id: c.status for c in d.checks}
    assert statuses["preprocess_mismatch"] == "skipped" and statuses["preprocess_random"] == "skipped"


def _process_state() -> dict[str, Any]:
    return {
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "onednn": torch.backends.mkldnn.enabled,
        "rng": torch.random.get_rng_state(),
    }


def test_user_model_and_process_are_left_exactly_as_found(images: list[Any]) -> None:
    model = build(TINY_RN)  # train mode + BatchNorm: the as-is runs overwrite running statistics
    model.transformer.eval()  # a mixed state must survive too
    model.visual.layer1.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    versions = {n: p._version for n, p in model.named_parameters()}
    fp, bfp = state_fingerprint(model), buffers_fingerprint(model)
    before = _process_state()
    torch.set_grad_enabled(True)

    d = diagnose(model, images=images, labels=LABELS, runs=2)

    assert d.cause("buffers_mutated") is not None  # it did change them while running as-is
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: p._version for n, p in model.named_parameters()} == versions
    assert state_fingerprint(model) == fp and buffers_fingerprint(model) == bfp
    after = _process_state()
    assert torch.equal(after.pop("rng"), before.pop("rng"))
    assert after == before
    assert d.environment["model_restored"] is True


def test_steadyclip_loaded_model_passes_and_keeps_its_tamper_checks(images: list[Any],
                                                                    demo_arch_checkpoint: Path) -> None:
    import steadyclip

    loaded = steadyclip.load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    d = diagnose(loaded.model, loaded.preprocess, loaded.tokenizer, images=images, labels=LABELS, runs=2,
                 loader=lambda: steadyclip.load(DEMO_ARCH, pretrained=demo_arch_checkpoint))
    assert d.verdict == "stable", [c.to_dict() for c in d.problems]
    loaded.check_buffers()  # in-place version counters untouched: no false tamper alarm afterwards
    loaded.verify_full()
    loaded.ensure_inference_state()
