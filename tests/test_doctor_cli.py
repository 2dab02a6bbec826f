"""`steadyclip doctor` on the command line: JSON schema, exit codes, --demo, --html, --lock."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from steadyclip.cli import cli
from steadyclip.model.registry import DEMO_ARCH, DEMO_SPEC

LABELS = "red circle,blue square,green star"


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from steadyclip.demo.shapes import generate

    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, (im, colour, shape) in enumerate(generate(2, seed=3)):
        p = folder / f"{i}_{colour}_{shape}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def doc_of(result: Result) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_checkpoint_in_train_mode_is_unstable_exit_3(image_files: list[str], demo_arch_checkpoint: Path) -> None:
    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), *image_files,
            "--labels", LABELS, "--runs", "2", "--json")
    assert r.exit_code == 3, r.output
    doc = doc_of(r)
    assert doc["verdict"] == "unstable"
    assert doc["causes"][0]["id"] in ("stochastic_layers", "train_mode")
    assert {c["id"] for c in doc["causes"] if c["level"] == "problem"} >= {"stochastic_layers", "train_mode"}
    assert {c["id"]: c["status"] for c in doc["checks"]}["random_init"] == "ok"  # a real checkpoint: same weights
    assert doc["images"] == [Path(p).name for p in image_files]
    assert doc["environment"]["model_restored"] is True


def test_eval_flag_healthy_model_is_stable_exit_0(image_files: list[str], demo_arch_checkpoint: Path) -> None:
    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), *image_files,
            "--labels", LABELS, "--runs", "2", "--eval", "--json")
    assert r.exit_code == 0, r.output
    doc = doc_of(r)
    assert doc["verdict"] == "stable"
    assert all(c["level"] == "info" for c in doc["causes"])


def test_no_pretrained_means_random_init_every_load(image_files: list[str]) -> None:
    r = run("doctor", "--model", DEMO_ARCH, *image_files, "--labels", LABELS, "--runs", "2", "--eval", "--json")
    assert r.exit_code == 3, r.output
    top = doc_of(r)["causes"][0]
    assert top["id"] == "random_init"
    assert "pretrained=" in top["fix"]


def test_lock_mismatch_is_weights_corrupted(image_files: list[str], demo_arch_checkpoint: Path,
                                            tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    import steadyclip
    from steadyclip.model.lockfile import write_lock

    lock = tmp_path / "steadyclip.lock"
    write_lock(lock, steadyclip.load(DEMO_ARCH, pretrained=demo_arch_checkpoint).info)
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(DEMO_ARCH).state_dict().items()}, str(other))

    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(other), "--lock", str(lock), *image_files,
            "--labels", LABELS, "--runs", "1", "--eval", "--json")
    assert r.exit_code == 3, r.output
    top = doc_of(r)["causes"][0]
    assert top["id"] == "weights_corrupted"
    assert {m["what"] for m in top["evidence"]["mismatches"]} == {"weights_sha256", "fingerprint"}

    ok = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), "--lock", str(lock),
             *image_files, "--labels", LABELS, "--runs", "1", "--eval", "--json")
    assert ok.exit_code == 0, ok.output


def test_html_report_is_written_and_self_contained(image_files: list[str], demo_arch_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), *image_files,
            "--labels", LABELS, "--runs", "3", "--html", str(page))
    assert r.exit_code == 3
    html = page.read_text(encoding="utf-8")
    assert "<svg" in html and "polyline" in html
    assert "<script" not in html and "http" not in html and "<link" not in html
    # the human report went to stdout: runs first, then the ranked causes
    out = r.stdout
    assert "probability per run" in out and "UNSTABLE" in out
    assert out.index("probability per run") < out.index("#1 ")


@pytest.mark.parametrize("args", [
    ["doctor", "--labels", LABELS],  # nothing to diagnose
    ["doctor", "--model", DEMO_ARCH, "--labels", LABELS],  # no images
    ["doctor", "--model", DEMO_ARCH, "x.png"],  # no labels
    ["doctor", "--demo", "--labels", "a,b", "--labels-file", __file__],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).exit_code == 2


def test_labels_and_json_options_are_the_ones_every_command_shares() -> None:
    from steadyclip.cli.classify import classify
    from steadyclip.cli.doctor import doctor

    def info(command: Any) -> dict[str, Any]:
        return {p.name: p.to_info_dict() for p in command.params if p.name in ("labels", "labels_file", "as_json")}

    assert info(doctor) == info(classify) and len(info(doctor)) == 3


def test_labels_file_is_read_like_classify_reads_it(image_files: list[str], demo_arch_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# shapes\nred circle\n\nblue square\n", encoding="utf-8")
    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", str(demo_arch_checkpoint), *image_files,
            "--labels-file", str(labels), "--runs", "1", "--eval", "--json")
    assert r.exit_code == 0, r.stderr
    assert doc_of(r)["labels"] == ["red circle", "blue square"]


def test_unknown_tag_is_an_error_exit_1(image_files: list[str]) -> None:
    r = run("doctor", "--model", DEMO_ARCH, "--pretrained", "no_such_tag", *image_files, "--labels", LABELS)
    assert r.exit_code == 1
    assert "ModelSourceError" in r.stderr and "no_such_tag" in r.stderr


def test_doctor_is_listed_in_help() -> None:
    r = run("--help")
    assert "doctor" in r.output
    assert "--demo" in run("doctor", "--help").output


def test_demo_path_with_stand_in_weights(monkeypatch: pytest.MonkeyPatch, demo_arch_checkpoint: Path,
                                         tmp_path: Path) -> None:
    """--demo's careless loader, generated images and 48 labels, on random-init weights of the demo architecture."""
    import dataclasses

    from steadyclip.model import registry
    from steadyclip.model.integrity import sha256_file

    stand_in = dataclasses.replace(registry.DEMO_SPEC, weights_file=demo_arch_checkpoint,
                                   sha256=sha256_file(demo_arch_checkpoint))
    monkeypatch.setattr(registry, "DEMO_SPEC", stand_in)
    page = tmp_path / "demo.html"
    r = run("doctor", "--demo", "--runs", "3", "--json", "--html", str(page))
    assert r.exit_code == 3, r.output
    doc = doc_of(r)
    assert doc["causes"][0]["id"] in ("stochastic_layers", "train_mode")
    assert len(doc["labels"]) == 48 and len(doc["images"]) == 4
    assert all(name.endswith("(generated)") for name in doc["images"])
    assert doc["runs"][0]["as_is"] != doc["runs"][1]["as_is"]
    assert doc["runs"][0]["fixed"] == doc["runs"][1]["fixed"] == doc["runs"][2]["fixed"]
    checks = {c["id"]: c["status"] for c in doc["checks"]}
    assert checks["random_init"] == "ok" and checks["weights_changed"] == "ok"
    assert checks["weights_corrupted"] == "ok"  # checked against the registry's pinned hash
    assert page.read_text(encoding="utf-8").count("<svg") == 8

    assert run("doctor", "--demo", "--eval", "--runs", "2", "--json").exit_code == 0

    # a bundled file that is not the pinned bytes
    monkeypatch.setattr(registry, "DEMO_SPEC", dataclasses.replace(stand_in, sha256="ab" * 32))
    bad = run("doctor", "--demo", "--eval", "--runs", "1", "--json")
    assert bad.exit_code == 3 and doc_of(bad)["causes"][0]["id"] == "weights_corrupted"


needs_demo = pytest.mark.skipif(DEMO_SPEC.weights_file is None or not DEMO_SPEC.weights_file.is_file(),
                                reason="bundled demo weights not built yet (python -m steadyclip.demo.train)")


@needs_demo
def test_demo_shows_varying_runs_then_the_diagnosis() -> None:
    r = run("doctor", "--demo", "--runs", "3", "--json")
    assert r.exit_code == 3, r.output
    doc = doc_of(r)
    assert doc["causes"][0]["id"] in ("stochastic_layers", "train_mode")
    assert len(doc["labels"]) == 48 and len(doc["images"]) == 4
    as_is = [run_["as_is"] for run_ in doc["runs"]]
    fixed = [run_["fixed"] for run_ in doc["runs"]]
    assert as_is[0] != as_is[1] and fixed[0] == fixed[1] == fixed[2]
    checks = {c["id"]: c["status"] for c in doc["checks"]}
    assert checks["random_init"] == "ok" and checks["preprocess_mismatch"] == "ok"


@needs_demo
def test_demo_in_eval_is_stable() -> None:
    r = run("doctor", "--demo", "--eval", "--runs", "2", "--json")
    assert r.exit_code == 0, r.output
    assert doc_of(r)["verdict"] == "stable"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_big_healthy_models_are_stable(arch: str, image_files: list[str], arch_checkpoint: Any) -> None:
    r = run("doctor", "--model", arch, "--pretrained", str(arch_checkpoint(arch)), *image_files,
            "--labels", LABELS, "--runs", "2", "--eval", "--json")
    assert r.exit_code == 0, r.output
    doc = doc_of(r)
    assert doc["verdict"] == "stable"
    for c in doc["causes"]:
        assert c["level"] == "info", c
