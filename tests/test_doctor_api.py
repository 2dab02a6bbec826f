"""`steadyclip.diagnose`'s output (JSON, HTML, the terminal report) and its refusal of bad arguments."""
from __future__ import annotations

import json
from typing import Any

import open_clip
import pytest
import torch
from _doctor_models import LABELS, build, drop_path_convnext, register_configs

from steadyclip.doctor import diagnose
from steadyclip.model.registry import DEMO_ARCH


@pytest.fixture(scope="module", autouse=True)
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return register_configs(tmp_path_factory.mktemp("cfg"))

# ---- output -------------------------------------------------------------------------------

def test_to_dict_is_stable_json_schema(images: list[Any]) -> None:
    d = diagnose(drop_path_convnext(), images=images, labels=LABELS, runs=2)
    doc = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert doc["verdict"] in ("stable", "unstable")
    assert {"verdict", "causes", "runs", "environment"} <= set(doc)
    for c in doc["causes"]:
        assert {"id", "severity", "evidence", "fix"} <= set(c)
        assert c["severity"] is None or isinstance(c["severity"], float)
    assert len(doc["runs"]) == 2
    run = doc["runs"][0]
    assert len(run["as_is"]) == len(images) and len(run["as_is"][0]) == len(LABELS)
    assert abs(sum(run["fixed"][0]) - 1.0) < 1e-9
    env = doc["environment"]
    for key in ("versions", "threads", "MKL_CBWR", "device", "flags"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["open_clip_torch"] == open_clip.__version__
    from steadyclip.numerics.identity import NUMERICS_FLAG_KEYS

    assert set(NUMERICS_FLAG_KEYS) <= set(env["flags"])  # the flags document provenance uses, same key names
    assert doc["labels"] == LABELS


def test_html_page_is_self_contained(images: list[Any]) -> None:
    from steadyclip.doctor import to_html

    d = diagnose(drop_path_convnext(), images=images, labels=LABELS, runs=3, image_names=["a", "b", "<c>"])
    page = to_html(d)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 * len(images)
    assert "<script" not in page and "http" not in page and "<link" not in page
    assert "&lt;c&gt;" in page and "<c>" not in page  # names are escaped
    assert "stochastic_layers" in page and "polyline" in page


def test_report_renders_ranked_causes(images: list[Any]) -> None:
    from rich.console import Console

    from steadyclip.doctor import render_report

    d = diagnose(drop_path_convnext(), images=images, labels=LABELS, runs=2)
    console = Console(record=True, width=120)
    render_report(d, console)
    text = console.export_text()
    assert "UNSTABLE" in text and "#1 stochastic_layers" in text and "model.eval()" in text


@pytest.mark.parametrize("bad", [
    {"labels": ["only one"]},
    {"images": []},
    {"runs": 0},
    {"image_names": ["just one"]},
])
def test_bad_arguments_are_input_errors(images: list[Any], bad: dict[str, Any]) -> None:
    from steadyclip.errors import InputError

    kwargs: dict[str, Any] = {"images": images, "labels": LABELS, "runs": 1} | bad
    with pytest.raises(InputError):
        diagnose(build(DEMO_ARCH), **kwargs)


def test_wrapped_model_is_refused_with_a_hint(images: list[Any]) -> None:
    from steadyclip.errors import InputError

    with pytest.raises(InputError, match="model.module"):
        diagnose(torch.nn.DataParallel(build(DEMO_ARCH)), images=images, labels=LABELS, runs=1)


def test_loader_must_return_a_model(images: list[Any]) -> None:
    from steadyclip.errors import InputError

    with pytest.raises(InputError, match="loader"):
        diagnose(images=images, labels=LABELS, loader=lambda: "not a model")
