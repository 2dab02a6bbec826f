"""CLI: steadyclip info / lock / verify / convert."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from steadyclip.cli import cli
from steadyclip.errors import IntegrityError
from steadyclip.model import registry
from steadyclip.model.integrity import state_fingerprint

DEMO_ARCH = registry.DEMO_ARCH


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_commands_are_registered_and_documented() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for name in ("info", "lock", "verify", "convert"):
        assert name in out
        code, help_text, _ = run(name, "--help")
        assert code == 0 and "--json" in help_text


def test_info_json(demo_arch_checkpoint: Path) -> None:
    code, out, _ = run("info", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["arch"] == DEMO_ARCH and len(doc["fingerprint"]) == 64
    assert doc["preprocess"]["size"] == [64, 64]
    assert doc["default_templates"] == registry.DEFAULT_TEMPLATES  # an architecture without a spec
    code, text, _ = run("info", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint))
    assert code == 0 and f"fingerprint: {doc['fingerprint']}" in text


def test_info_unknown_model_exits_1(tmp_path: Path) -> None:
    code, out, err = run("info", "ViT-Q-99", "--json")
    assert code == 1 and out == "" and "ModelSourceError" in err and "ViT-Q-99" in err


def test_lock_then_verify_ok(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    code, out, _ = run("lock", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), "-o", str(lock), "--json")
    assert code == 0
    doc = json.loads(lock.read_text())
    assert json.loads(out)["model"] == doc["model"]
    assert doc["model"]["weights_sha256"] and doc["model"]["config_hash"] and doc["model"]["tokenizer"]
    code, out, _ = run("verify", "--lock", str(lock), "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = run("verify", "--lock", str(lock))
    assert code == 0 and out.startswith("ok:")


def test_verify_mismatch_exits_3_and_names_the_field(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    assert run("lock", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), "-o", str(lock))[0] == 0
    doc = json.loads(lock.read_text())
    doc["model"]["config_hash"] = "f" * 64
    lock.write_text(json.dumps(doc))
    code, out, err = run("verify", "--lock", str(lock))
    assert code == 3 and "config_hash" in err and "f" * 64 in err
    code, out, _ = run("verify", "--lock", str(lock), "--json")
    report = json.loads(out)
    assert code == 3 and report["ok"] is False and report["field"] == "config_hash"
    assert report["expected"] == "f" * 64 and report["actual"] != report["expected"]


def test_verify_other_weights_against_lock_exits_3(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    assert run("lock", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), "-o", str(lock))[0] == 0
    pt = tmp_path / "same-weights.pt"
    torch.save(load_file(str(demo_arch_checkpoint)), pt)
    code, out, _ = run("verify", DEMO_ARCH, "--pretrained", str(pt), "--lock", str(lock), "--json")
    assert code == 3 and json.loads(out)["field"] == "weights_sha256"  # same tensors, other bytes: still refused


def test_convert_pt_to_safetensors_keeps_the_state(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    tied = dict(sd)
    tied["text_projection_alias"] = tied["text_projection"]  # shares storage: must be cloned
    src = tmp_path / "model.pt"
    torch.save({"state_dict": tied}, src)
    out_path = tmp_path / "model.safetensors"
    code, out, _ = run("convert", str(src), "-o", str(out_path), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["cloned_shared"] >= 1 and summary["tensors"] == len(tied)
    assert summary["fingerprint"] == state_fingerprint(load_file(str(out_path))) == state_fingerprint(tied)


def test_convert_that_changes_a_tensor_is_refused_and_removed(demo_arch_checkpoint: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    from steadyclip.model.convert import convert_checkpoint

    src = tmp_path / "model.pt"
    torch.save(load_file(str(demo_arch_checkpoint)), src)
    real = safetensors.torch.load_file

    def corrupted(path: str) -> dict[str, torch.Tensor]:
        sd = real(path)
        sd["logit_scale"] = sd["logit_scale"] + 1  # what a lossy writer would do
        return sd

    monkeypatch.setattr(safetensors.torch, "load_file", corrupted)
    out_path = tmp_path / "model.safetensors"
    with pytest.raises(IntegrityError, match="conversion changed the tensors"):
        convert_checkpoint(src, out_path)
    assert not out_path.exists()
    monkeypatch.setattr(safetensors.torch, "load_file", real)
    assert convert_checkpoint(src, out_path).fingerprint == state_fingerprint(load_file(str(demo_arch_checkpoint)))


def test_convert_refuses_code_running_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, src)
    code, _, err = run("convert", str(src), "-o", str(tmp_path / "out.safetensors"))
    assert code == 1 and "UnsafeCheckpointError" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["out.pt"])
def test_convert_output_must_be_safetensors(demo_arch_checkpoint: Path, tmp_path: Path, name: str) -> None:
    code, _, err = run("convert", str(demo_arch_checkpoint), "-o", str(tmp_path / name))
    assert code == 2 and ".safetensors" in err


def test_lock_into_missing_folder_is_a_clean_error(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = run("lock", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint),
                       "-o", str(tmp_path / "no" / "such" / "x.lock"))
    assert code == 1 and "cannot write lockfile" in err
