"""`steadyclip doctor --script` on scripts written the ways people write them (issue 22).

Scripts in ``tests/doctor_scripts/``: a benchmark CLI that encodes each class in
its own ``encode_text`` call, a feature comparison that never encodes text, an
evaluation loop over a DataLoader with the model's own logit scale, open_clip's
README example with a tag, a file or an ``hf-hub:`` name. Weights are
random (real or tiny open_clip architectures) and tags resolve offline from a
Hugging Face cache laid out as huggingface_hub lays one out.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _doctor_models import (
    TINY_VIT,
    TINY_VIT_CFG,
    add_config,
    build,
    drop_path_convnext,
    garble,
    hub_cache,
    register_configs,
    save_weights,
    write_config,
)
from click.testing import CliRunner, Result

from steadyclip.cli import cli
from steadyclip.model.registry import DEMO_ARCH

SCRIPTS = Path(__file__).parent / "doctor_scripts"
DEMO_CFG = Path(__file__).parents[1] / "src" / "steadyclip" / "demo" / "steadyclip-shapes.json"


def doctor(script: str, *args: str, runs: int = 2) -> tuple[Result, dict[str, Any]]:
    r = CliRunner().invoke(cli, ["doctor", "--script", str(SCRIPTS / script), "--runs", str(runs), "--json",
                                 "--", *args], catch_exceptions=False)
    doc: dict[str, Any] = json.loads(r.stdout)  # one JSON document, whatever the outcome
    return r, doc


def ids(doc: dict[str, Any], key: str = "causes") -> list[str]:
    return [c["id"] for c in doc[key]]


def assert_timing(doc: dict[str, Any]) -> None:
    """Within the budget, or the report says why not."""
    t = doc["timing"]
    assert t["within_budget"] or t["over_budget_because"], t


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wild")
    register_configs(folder)
    add_config(TINY_VIT, TINY_VIT_CFG, folder)
    demo = save_weights(build(DEMO_ARCH), folder / "demo.safetensors")
    return {
        "demo_cfg": DEMO_CFG,
        "drop_path": save_weights(drop_path_convnext(), folder / "drop_path.safetensors"),
        "vit_cfg": write_config(TINY_VIT, TINY_VIT_CFG, folder),
        "vit": save_weights(build(TINY_VIT), folder / "vit.safetensors"),
        "demo": demo,
        "garbled": garble(demo, folder / "garbled.safetensors", "text_projection"),
    }


@pytest.fixture
def hf_home() -> Path:
    return Path(os.environ["HF_HOME"])  # conftest points it at a fresh folder, with HF_HUB_OFFLINE=1


def _hub_config() -> bytes:
    return json.dumps({"model_cfg": json.loads(DEMO_CFG.read_text()), "preprocess_cfg": {}}).encode()


def test_seeded_train_mode_with_per_class_text_calls_is_wrong_exit_3(files: dict[str, Path]) -> None:
    """Point 1 (and 8): runs agree thanks to the seed; eval moves the image features: one cause, exit 3."""
    r, doc = doctor("benchmark_per_class.py", "--config", str(files["demo_cfg"]), "--model", DEMO_ARCH,
                    "--weights", str(files["drop_path"]))
    assert r.exit_code == 3, doc["causes"]
    assert {c["id"]: c["status"] for c in doc["checks"]}["runs_agree"] == "ok"
    top = doc["causes"][0]
    assert top["id"] == "train_mode" and top["level"] == "problem"
    assert top["evidence"]["runs_disagree_without_fix"] is False
    assert top["evidence"]["output_change"] > 0.01  # measured on the features the script produced
    assert "results are wrong" in top["summary"] and "benchmark_per_class.py:" in top["fix"]
    assert ids(doc).count("train_mode") == 1 and "stochastic_layers" not in ids(doc)  # one finding, one fix
    assert len(doc["runs"][0]["as_is"][0]) == 3  # one class per encode_text call, not a 1x1 [[1.0]]
    assert doc["labels"] == ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star."]
    assert_timing(doc)


def test_eval_that_changes_nothing_is_advice_not_a_cause_exit_0(files: dict[str, Path]) -> None:
    """Points 2 and 8: a ViT without dropout in train mode, features only: runs agree, eval moves ~1e-6."""
    r, doc = doctor("compare_features.py", str(files["vit_cfg"]), TINY_VIT, str(files["vit"]))
    assert r.exit_code == 0, doc["causes"]
    assert doc["verdict"] == "stable" and doc["causes"] == []
    assert ids(doc, "advice") == ["train_mode"]
    advice = doc["advice"][0]
    assert advice["summary"].startswith("advice:") and advice["evidence"]["output_change"] < 1e-4
    assert doc["script"]["kept_fixes"] == []
    assert_timing(doc)


def test_nan_outputs_from_garbled_weights_are_wrong_exit_3(files: dict[str, Path]) -> None:
    """Point 4: the file still parses, every probability is nan, every run: the weights file is the cause."""
    r, doc = doctor("dataloader_eval.py", "--config", str(files["demo_cfg"]), "--model", DEMO_ARCH,
                    "--weights", str(files["garbled"]))
    assert r.exit_code == 3
    assert "nan" in doc["script"]["processes"][0]["stdout"]
    top = doc["causes"][0]
    assert top["id"] == "non_finite"
    assert top["evidence"]["nonfinite_weights"]["names"] == ["text_projection"]
    assert str(files["garbled"]) in top["summary"] and f"rm {files['garbled']}" in top["fix"]
    assert {c["id"]: c["status"] for c in doc["checks"]}.get("non_finite") != "ok"


def test_truncated_hub_download_names_the_file_and_its_expected_hash(files: dict[str, Path], hf_home: Path) -> None:
    """Points 5 and 6: a crash while loading: exit 1, one JSON document, the bad file, the fix; no frames of ours."""
    snap = hub_cache(hf_home, "org/shapes", {"open_clip_config.json": _hub_config(),
                                             "open_clip_model.safetensors": files["demo"]},
                     cut={"open_clip_model.safetensors": 40})
    r, doc = doctor("zero_shot_pretrained.py", "hf-hub:org/shapes")
    assert r.exit_code == 1
    assert doc["verdict"] == "error" and doc["script"]["processes"][0]["returncode"] == 1
    cause = doc["causes"][0]
    assert cause["id"] == "weights_unreadable"
    ev = cause["evidence"]
    assert ev["file"] == str(snap / "open_clip_model.safetensors") and ev["size"] == 40
    assert ev["expected_sha256"] and ev["expected_sha256"] != ev["sha256"]  # the blob's name is its real hash
    assert "rm " in cause["fix"] and "steadyclip lock" in cause["fix"]
    tb = doc["script"]["processes"][0]["stderr"]
    assert "SafetensorError" in tb and "zero_shot_pretrained.py" in tb
    assert "observer.py" not in tb and "loads.py" not in tb and "in wrapper" not in tb
    assert "frame(s) of its observer hidden" in tb


def test_weights_never_downloaded_says_which_repo_and_file(hf_home: Path) -> None:
    """Point 5: a tag whose file is not in the offline cache."""
    r, doc = doctor("zero_shot_pretrained.py", "RN50", "--pretrained", "openai")
    assert r.exit_code == 1 and doc["verdict"] == "error"
    cause = doc["causes"][0]
    assert cause["id"] == "weights_missing"
    assert cause["evidence"]["repo"] == "timm/resnet50_clip.openai"
    assert "huggingface-cli download timm/resnet50_clip.openai" in cause["fix"]


def test_hub_model_without_weights_is_random_first_with_a_fix_that_works(hf_home: Path) -> None:
    """Point 7: open_clip warns and builds random weights; pretrained= would be ignored for hf-hub: names."""
    hub_cache(hf_home, "org/shapes", {"open_clip_config.json": _hub_config()})
    r, doc = doctor("zero_shot_pretrained.py", "hf-hub:org/shapes", "--no-eval")
    assert r.exit_code == 3
    top = doc["causes"][0]
    assert top["id"] == "random_init"
    assert "pretrained=TAG_OR_FILE" not in top["fix"]
    assert "huggingface-cli download org/shapes" in top["fix"] and "open_clip.load_checkpoint(model" in top["fix"]
    assert any("Could not find/download default weights" in w for w in top["evidence"]["open_clip_warnings"])
    assert_timing(doc)


@pytest.mark.slow  # RN50 (100M parameters) built and run in 4 processes
def test_openai_weights_in_a_gelu_model_are_a_config_mismatch(
        hf_home: Path, arch_checkpoint: Callable[[str], Path]) -> None:
    """Point 3: pretrained='openai' into 'RN50' (GELU): open_clip only warns; the -quickgelu name is the fix."""
    hub_cache(hf_home, "timm/resnet50_clip.openai", {"open_clip_model.safetensors": arch_checkpoint("RN50")})
    r, doc = doctor("zero_shot_pretrained.py", "RN50", "--pretrained", "openai")
    assert r.exit_code == 3, doc["causes"]
    top = doc["causes"][0]
    assert top["id"] == "config_mismatch" and top["level"] == "problem"
    assert "'RN50-quickgelu', pretrained='openai'" in top["fix"]
    assert "QuickGELU mismatch" in top["evidence"]["open_clip_warning"][0]
    assert top["evidence"]["output_change"] > 1e-3
    assert "config" in doc["script"]["kept_fixes"]
    assert_timing(doc)


@pytest.mark.parametrize(("body", "error"), [
    ("import json\njson.loads('{not json')\n", "ScriptError"),
    ("print('no model here')\n", "InputError"),
], ids=["crash", "no-open-clip-call"])
def test_json_is_one_document_for_every_outcome(tmp_path: Path, body: str, error: str) -> None:
    script = tmp_path / "plain.py"
    script.write_text(body)
    r = CliRunner().invoke(cli, ["doctor", "--script", str(script), "--runs", "2", "--json"], catch_exceptions=False)
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "error" and doc["error"].startswith(error) and doc["causes"] == []
