"""Loading: verified bytes, strictly applied, safe formats only, locked in inference state."""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from steadyclip.errors import (
    InferenceStateError,
    InputError,
    IntegrityError,
    ModelSourceError,
    NumericsError,
    UnsafeCheckpointError,
    WeightsError,
)
from steadyclip.model import registry
from steadyclip.model.integrity import sha256_file, state_fingerprint
from steadyclip.model.loading import (
    LoadedModel,
    ModelInfo,
    load,
    quiet_random_init_warning,
)

DEMO_ARCH = registry.DEMO_ARCH


# --- the bundled demo model ------------------------------------------------------

_demo_missing = pytest.mark.skipif(
    registry.DEMO_SPEC.weights_file is None or not registry.DEMO_SPEC.weights_file.is_file(),
    reason="bundled demo weights not built yet (python -m steadyclip.demo.train writes them)",
)


@_demo_missing
def test_bundled_demo_loads_and_matches_pinned_hash() -> None:
    m = load()
    assert m.info.model_id == "steadyclip-demo"
    assert m.info.source == "bundled"
    assert m.info.weights_sha256 == registry.DEMO_SPEC.sha256
    assert sha256_file(registry.DEMO_SPEC.weights_file, cache=None) == registry.DEMO_SPEC.sha256  # type: ignore[arg-type]
    assert not m.model.training
    assert load("steadyclip-demo").info.fingerprint == m.info.fingerprint


@pytest.fixture
def fake_bundled(demo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> registry.ModelSpec:
    """The bundled-model code path, pointed at a private copy of demo-architecture weights."""
    spec = dataclasses.replace(registry.DEMO_SPEC, weights_file=demo_copy, sha256=sha256_file(demo_copy, cache=None))
    monkeypatch.setitem(registry._SPECS, "steadyclip-demo", spec)
    return spec


def test_bundled_path_verifies_hash_and_returns_inference_model(fake_bundled: registry.ModelSpec) -> None:
    m = load()
    assert isinstance(m, LoadedModel)
    assert m.info.source == "bundled"
    assert m.info.weights_sha256 == fake_bundled.sha256
    assert not any(mod.training for mod in m.model.modules())
    assert not any(p.requires_grad for p in m.model.parameters())
    tokens = m.tokenizer(["red circle"])
    assert tokens.shape == (1, m.info.context_length)


def test_bundled_wrong_hash_is_integrity_error(fake_bundled: registry.ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._SPECS, "steadyclip-demo", dataclasses.replace(fake_bundled, sha256="ab" * 32))
    with pytest.raises(IntegrityError) as e:
        load("steadyclip-demo")
    msg = str(e.value)
    assert str(fake_bundled.weights_file) in msg and "ab" * 32 in msg and fake_bundled.sha256 in msg


def test_bundled_missing_weights_says_how_to_fix(fake_bundled: registry.ModelSpec, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setitem(registry._SPECS, "steadyclip-demo",
                        dataclasses.replace(fake_bundled, weights_file=tmp_path / "nope.safetensors"))
    with pytest.raises(ModelSourceError, match="steadyclip.demo.train"):
        load()


# --- local checkpoint files ----------------------------------------------------------

def test_local_file_load_is_reproducible(demo_arch_checkpoint: Path) -> None:
    a = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    b = load(DEMO_ARCH, pretrained=str(demo_arch_checkpoint))
    assert a.info.fingerprint == b.info.fingerprint
    assert a.info.fingerprint == state_fingerprint(load_file(str(demo_arch_checkpoint)))
    assert a.info.weights_sha256 == sha256_file(demo_arch_checkpoint, cache=None)
    assert a.info.source == "file"
    assert isinstance(a.info, ModelInfo)


def test_load_does_not_touch_callers_rng(demo_arch_checkpoint: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    assert torch.equal(torch.rand(3), expected)


def test_pt_and_safetensors_give_same_fingerprint(random_checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    st = load(DEMO_ARCH, pretrained=random_checkpoints[DEMO_ARCH])
    pt = load(DEMO_ARCH, pretrained=random_checkpoints.pt(DEMO_ARCH))
    assert st.info.weights_sha256 != pt.info.weights_sha256
    assert st.info.fingerprint == pt.info.fingerprint


def test_common_layouts_state_dict_wrapper_and_module_prefix(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    a = load(DEMO_ARCH, pretrained=wrapped)
    assert a.info.fingerprint == state_fingerprint(sd)


def test_missing_keys_is_an_error_not_a_random_model(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    dropped = sorted(k for k in sd if k.startswith("visual."))[:3]
    for k in dropped:
        del sd[k]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as e:
        load(DEMO_ARCH, pretrained=path)
    assert "missing keys" in str(e.value) and all(k in str(e.value) for k in dropped)
    m = load(DEMO_ARCH, pretrained=path, allow_partial=True)  # explicit opt-in only
    assert not m.model.training
    with pytest.warns(DeprecationWarning, match="allow_partial=True instead"):
        old = load(DEMO_ARCH, pretrained=path, strict=False)  # the deprecated spelling of the same switch
    assert old.info.fingerprint == m.info.fingerprint
    with pytest.warns(DeprecationWarning), pytest.raises(WeightsError, match="missing keys"):
        load(DEMO_ARCH, pretrained=path, strict=True)
    with pytest.raises(InputError, match="contradicts"):
        load(DEMO_ARCH, pretrained=path, strict=True, allow_partial=True)


def test_unexpected_keys_and_shape_mismatch_are_errors(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    sd["visual.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"unexpected keys \[visual.extra_head.weight\]"):
        load(DEMO_ARCH, pretrained=path, allow_partial=True)  # partial never excuses extra keys

    sd = load_file(str(demo_arch_checkpoint))
    sd["logit_scale"] = torch.zeros(3)
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="shape mismatch.*logit_scale"):
        load(DEMO_ARCH, pretrained=path)


def test_long_key_lists_are_sorted_and_truncated(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    kept = {k: v for k, v in sd.items() if not k.startswith("transformer.")}
    path = tmp_path / "no_text.safetensors"
    save_file(kept, str(path))
    with pytest.raises(WeightsError) as e:
        load(DEMO_ARCH, pretrained=path)
    n_missing = len(sd) - len(kept)
    assert f"and {n_missing - 10} more] ({n_missing} total)" in str(e.value)


def test_wrong_architecture_for_checkpoint(demo_arch_checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match="architecture"):
        load("RN50", pretrained=demo_arch_checkpoint)


def test_non_finite_weights_refused(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    sd["text_projection"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    with pytest.raises(NumericsError, match="text_projection"):
        load(DEMO_ARCH, pretrained=path)


@pytest.mark.parametrize(
    ("source", "pretrained", "match"),
    [
        ("ViT-B-99", None, "unknown model 'ViT-B-99'.*ViT-B-32"),
        ("ViT-B-32", None, "never runs a randomly initialised model"),
        ("ViT-B-32", "no_such_tag", "neither a pretrained tag.*laion2b_s34b_b79k"),
        ("ViT-B-32", "/does/not/exist.safetensors", "does not exist"),
        ("local-dir:/does/not/exist", None, "does not exist"),
    ],
)
def test_unknown_sources_are_clear_errors(source: str, pretrained: str | None, match: str) -> None:
    with pytest.raises(ModelSourceError, match=match):
        load(source, pretrained=pretrained)


# --- unsafe formats --------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused_and_never_runs(demo_arch_checkpoint: Path, tmp_path: Path,
                                                         legacy: bool) -> None:
    marker = tmp_path / "PWNED"
    sd: dict[str, object] = dict(load_file(str(demo_arch_checkpoint)))
    sd["payload"] = _Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match="would run code"):
        load(DEMO_ARCH, pretrained=path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load(DEMO_ARCH, pretrained=path)
    assert not marker.exists()


def test_torchscript_refused_unless_allowed(tmp_path: Path) -> None:
    import open_clip

    registry.register_demo_config()
    torch.manual_seed(0)
    model = open_clip.create_model(DEMO_ARCH)
    holder = torch.nn.Module()
    for name, t in model.state_dict().items():
        holder.register_buffer(name.replace(".", "__"), t.clone())
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted: Any = torch.jit.script(torch.nn.Linear(2, 2))  # torch.jit's ScriptModule.save is untyped
        scripted.save(str(path))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load(DEMO_ARCH, pretrained=path)
    with pytest.raises(WeightsError, match="do not fit"):  # allowed, read, but these are not CLIP weights
        load(DEMO_ARCH, pretrained=path, allow_torchscript=True)


def test_garbage_and_truncated_files_are_weights_errors(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a checkpoint format"):
        load(DEMO_ARCH, pretrained=junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(demo_arch_checkpoint.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated"):
        load(DEMO_ARCH, pretrained=cut)


# --- inference state and tamper checks ---------------------------------------------------

def test_train_mode_is_restored_with_a_warning(demo_arch_checkpoint: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    m.model.train()
    with pytest.warns(RuntimeWarning, match="left inference state"):
        m.ensure_inference_state()
    assert not any(mod.training for mod in m.model.modules())
    m.ensure_inference_state()  # quiet once restored


def test_train_mode_raises_under_strict_guard(demo_arch_checkpoint: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint, guard="raise")
    m.model.get_submodule("visual").train()
    with pytest.raises(InferenceStateError, match="visual"):
        m.ensure_inference_state()


def test_requires_grad_is_restored(demo_arch_checkpoint: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    next(m.model.parameters()).requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="requires_grad"):
        m.ensure_inference_state()
    assert not any(p.requires_grad for p in m.model.parameters())


def test_check_buffers_detects_in_place_weight_change(demo_arch_checkpoint: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    m.check_buffers()
    m.verify_full()
    with torch.no_grad():
        m.model.get_parameter("text_projection")[3, 5] += 1e-3
    with pytest.raises(IntegrityError, match="changed in memory"):
        m.check_buffers()
    with pytest.raises(IntegrityError, match=r"Changed tensors: \[text_projection\]"):
        m.verify_full()


def test_check_buffers_detects_writes_through_data(demo_arch_checkpoint: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    m.model.get_parameter("text_projection").data.mul_(2)  # bypasses the version counter; the sample still sees it
    with pytest.raises(IntegrityError):
        m.check_buffers()


@pytest.mark.slow
def test_check_buffers_detects_batchnorm_stats_updated_by_train_forward(arch_checkpoint) -> None:  # type: ignore[no-untyped-def]
    m = load("RN50", pretrained=arch_checkpoint("RN50"))
    m.check_buffers()
    m.model.get_submodule("visual").train()
    clip: Any = m.model  # open_clip's CLIP is untyped
    with torch.no_grad():
        clip.encode_image(torch.randn(2, 3, 224, 224))
    m.model.eval()
    with pytest.raises(IntegrityError, match="BatchNorm"):
        m.check_buffers()


def test_device_that_is_missing_is_an_error_not_a_fallback(demo_arch_checkpoint: Path) -> None:
    from steadyclip.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load(DEMO_ARCH, pretrained=demo_arch_checkpoint, device="cuda")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu:0"])
def test_load_refuses_the_devices_the_engine_refuses(demo_arch_checkpoint: Path, device: str) -> None:
    from steadyclip.errors import DeviceError

    with pytest.raises(DeviceError, match="not supported by steadyclip; use 'cpu', 'cuda' or 'cuda:N'"):
        load(DEMO_ARCH, pretrained=demo_arch_checkpoint, device=device)


def test_default_templates_come_from_the_models_spec(demo_arch_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    assert load().default_templates == registry.DEMO_SPEC.default_templates
    assert load(DEMO_ARCH, pretrained=demo_arch_checkpoint).default_templates == registry.DEFAULT_TEMPLATES
    spec = dataclasses.replace(registry.DEMO_SPEC, default_templates="x")
    monkeypatch.setitem(registry._SPECS, registry.DEMO_MODEL_ID, spec)
    assert load().default_templates == "x"


def test_no_weights_means_no_random_model_even_for_open_clip_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "ViT-B-32" in __import__("open_clip").list_models()
    with pytest.raises(ModelSourceError):
        load("ViT-B-32")
    assert os.environ["STEADYCLIP_CACHE_DIR"]  # sanity: the autouse fixture isolates caches


@pytest.mark.parametrize(("error", "says"), [
    (ModuleNotFoundError("No module named 'transformers'", name="transformers"), "pip install transformers"),
    (OSError("We couldn't connect to 'https://huggingface.co'"), "load once while online"),
])
def test_a_tokenizer_that_cannot_load_is_a_model_source_error_saying_what_to_do(
        demo_arch_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, says: str) -> None:
    """SigLIP & co. use Hugging Face tokenizers: no ``transformers``, or offline with nothing cached."""
    import open_clip

    from steadyclip.model import sources

    real_resolve = sources.resolve

    def resolve_hf_tokenized(*args: Any, **kwargs: Any) -> sources.ResolvedSource:
        resolved = real_resolve(*args, **kwargs)
        cfg = {**resolved.model_cfg, "text_cfg": {**resolved.model_cfg["text_cfg"], "hf_tokenizer_name": "org/tok"}}
        return dataclasses.replace(resolved, model_cfg=cfg)

    def get_tokenizer(*_: Any, **__: Any) -> Any:
        raise error

    monkeypatch.setattr(sources, "resolve", resolve_hf_tokenized)
    monkeypatch.setattr(open_clip, "get_tokenizer", get_tokenizer)
    with pytest.raises(ModelSourceError, match=f"tokenizer 'org/tok' of {DEMO_ARCH!r}.*{says}") as e:
        load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    assert e.value.__cause__ is error


def test_quiet_random_init_warning_drops_only_open_clips_false_warning(caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()  # where open_clip logs it
    false_alarm = "No pretrained weights loaded for model 'x'. Model initialized randomly."
    with caplog.at_level(logging.WARNING), quiet_random_init_warning():
        root.warning(false_alarm)
        root.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    root.warning(false_alarm)  # the filter is gone after the block
    assert caplog.records[-1].getMessage() == false_alarm


# --- real architectures, random init saved to disk ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50", "convnext_tiny"])
def test_real_architectures_load_exactly_what_was_saved(arch: str, random_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = random_checkpoints[arch]
    m = load(arch, pretrained=path)
    assert m.info.fingerprint == state_fingerprint(random_checkpoints.state_dict(arch))
    assert not any(mod.training for mod in m.model.modules())
    m.check_buffers()
    clip: Any = m.model  # open_clip's CLIP is untyped
    with torch.no_grad():
        image = clip.encode_image(torch.zeros(1, 3, *m.info.preprocess.size))
        text = clip.encode_text(m.tokenizer(["a photo"]))
    assert image.shape[-1] == text.shape[-1]
    m.check_buffers()  # an eval forward changes nothing


@pytest.mark.slow
def test_check_buffers_is_cheap_on_vit_b_32(random_checkpoints) -> None:  # type: ignore[no-untyped-def]
    """check_buffers runs before every engine call: it must cost a small fraction of a full pass."""
    import time

    m = load("ViT-B-32", pretrained=random_checkpoints["ViT-B-32"])

    def best_of(f, n: int) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    cheap, full = best_of(m.check_buffers, 5), best_of(m.verify_full, 2)
    assert cheap < 0.25 * full, (cheap, full)


def test_config_hash_keeps_the_form_existing_locks_pin() -> None:
    """config_hash moved to identity.sha256_json; for open_clip's (ASCII) configs the bytes hashed are the same."""
    import hashlib
    import json

    import open_clip

    from steadyclip.model.sources import config_hash

    for arch in ("ViT-B-32", "RN50", "convnext_base"):
        cfg = open_clip.get_model_config(arch)
        old = hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert config_hash(cfg) == old
