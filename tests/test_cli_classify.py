"""`steadyclip classify` end to end, in real subprocesses."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from steadyclip.cli import cli
from steadyclip.engine import Engine
from steadyclip.engine.textcache import TextCache
from steadyclip.model import registry
from steadyclip.model.loading import load

LABELS = "red circle,blue square,green triangle,yellow star,purple cross,pink ring"
EXAMPLES = sorted(str(p) for p in Path("examples").glob("*.png"))


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STEADYCLIP_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "steadyclip", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


@pytest.mark.slow
def test_three_processes_print_byte_identical_json(tmp_path: Path) -> None:
    outs = []
    for i in range(3):
        # Two start with cold text caches, the third reuses the first one's warm cache: the answer must not care.
        proc = _cli("classify", *EXAMPLES, "--labels", LABELS, "--json", cache=tmp_path / f"c{i % 2}")
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert len(set(outs)) == 1
    doc = json.loads(outs[0])
    assert len(doc["results"]) == len(EXAMPLES)


def test_api_equals_cli_bitwise(tmp_path: Path) -> None:
    proc = _cli("classify", *EXAMPLES, "--labels", LABELS, "--json", "--top-k", "6", cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    engine = Engine(load(), text_cache=TextCache(tmp_path / "api.db"))
    api = engine.classify(EXAMPLES, LABELS.split(","), top_k=6)
    for row, res in zip(cli["results"], api):
        assert row["probs"] == dict(zip(res.labels, res.probs))  # float repr round-trips exactly
        assert [t["label"] for t in row["top"]] == [lab for lab, _ in res.top]
    assert cli["provenance"]["fingerprint"] == engine.provenance.fingerprint


def test_bad_image_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    proc = _cli("classify", EXAMPLES[0], str(bad), "--labels", LABELS, "--json", cache=tmp_path / "c")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["errors"] == 1
    assert doc["results"][0]["top"]
    assert doc["results"][1]["error"]["type"] == "ImageDecodeError"


def test_readable_table_and_provenance_line(tmp_path: Path) -> None:
    proc = _cli("classify", EXAMPLES[0], "--labels", LABELS, cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert "provenance: model=steadyclip-demo weights=" in proc.stdout
    assert Path(EXAMPLES[0]).name in proc.stdout


def test_no_templates_means_the_models_own_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "shapes.txt"
    own.write_text("a drawing of a {}.\nan icon of a {}.\n")
    monkeypatch.setitem(registry._SPECS, registry.DEMO_MODEL_ID,
                        dataclasses.replace(registry.DEMO_SPEC, default_templates=str(own)))

    def classify(*extra: str) -> dict[str, Any]:
        result = CliRunner().invoke(cli, ["classify", EXAMPLES[0], "--labels", LABELS, "--json", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    default, explicit = classify(), classify("--templates", "photo")
    assert default["provenance"]["template_set"] == "file:shapes.txt"
    assert explicit["provenance"]["template_set"] == "photo"  # a given --templates still wins
    assert default["results"][0]["probs"] != explicit["results"][0]["probs"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _cli("classify", EXAMPLES[0], cache=tmp_path).returncode == 2
    proc = _cli("classify", EXAMPLES[0], "--labels", "a,a", cache=tmp_path)
    assert proc.returncode == 1 and "LabelError" in proc.stderr
