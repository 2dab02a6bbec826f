"""Smoke tests of the benchmark harness (the benchmarks themselves run with `make bench`, never here)."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks import report
from benchmarks.images import describe, make_images


@pytest.fixture
def _root_log_level() -> Iterator[None]:
    """The benchmark tasks quieten the root logger (they own their process); give it back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_images_are_deterministic_photo_sized_files(tmp_path: Path) -> None:
    a = make_images(tmp_path / "a", 4)
    b = make_images(tmp_path / "b", 4)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    info = describe(a)
    sizes = info["sizes"]
    assert isinstance(sizes, list)
    assert info["count"] == 4 and info["png"] == 1 and "640x480" in sizes


@pytest.mark.usefixtures("_root_log_level")
def test_open_clip_and_steadyclip_contenders_measure_the_same_model(tmp_path: Path,
                                                                    demo_arch_checkpoint: Path) -> None:
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from benchmarks.contenders import run_contender
    from steadyclip.model.registry import register_demo_config

    register_demo_config()
    paths = [str(p) for p in make_images(tmp_path / "img", 3)]
    model = open_clip.create_model("steadyclip-shapes")
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    np.save(tmp_path / "px.npy", torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).numpy())
    results = {}
    for name in ("openclip-best", "steadyclip-strict"):
        spec = {"contender": name, "arch": "steadyclip-shapes", "weights": str(demo_arch_checkpoint),
                "paths": paths, "pixels": str(tmp_path / "px.npy"), "micro_batch": 2, "threads": 1,
                "repeats_model": 2, "repeats_e2e": 1, "emb_out": str(tmp_path / f"emb-steadyclip-shapes-{name}.npy")}
        results[name] = run_contender(spec)
        assert results[name]["model_only"]["best_ips"] > 0 and results[name]["e2e"]["best_ips"] > 0
        assert results[name]["repeat_identical"]
    report.add_agreement(results, tmp_path, "steadyclip-shapes")
    assert results["steadyclip-strict"]["max_abs_vs_baseline"] < 1e-5  # same weights, same pixels


def test_goals_never_pass_what_was_not_measured() -> None:
    goals = report.goals({"errors": {}})
    assert goals and all(g["status"] == "NOT MEASURED" for g in goals)
    assert report.spread([[0.2, 0.8], [0.2, 0.8]])["max_spread"] == 0.0
