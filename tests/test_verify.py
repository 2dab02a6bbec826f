"""``steadyclip verify RESULT``: every verdict, every result format landed, and the bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_batch import write_images

from steadyclip.batch import run_batch
from steadyclip.batch.table import METADATA_KEY
from steadyclip.cli import cli
from steadyclip.engine import Engine
from steadyclip.errors import ModelSourceError, ResultFileError
from steadyclip.model.loading import load
from steadyclip.model.registry import demo_labels
from steadyclip.verify import select_rows, verify_results

torch.set_num_threads(1)

LABELS = demo_labels()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A batch file over 8 shape images and 5 corrupt ones (labels, all probs, embeddings): (file, folder)."""
    root = tmp_path_factory.mktemp("verify")
    folder = root / "images"
    write_images(folder, 8)
    engine = Engine(load(), micro_batch=4, replicas=1, text_cache=None)
    out = root / "job.parquet"
    run_batch(folder, engine, labels=LABELS, out=out, embeddings=True, all_probs=True, workers=0, part_size=5)
    return out, folder


def edited(src: Path, dst: Path, *, meta: Any = None, row: int | None = None, delta: float = 0.0) -> Path:
    """A copy of a batch file: its metadata passed through ``meta``, and ``delta`` added to one embedding value."""
    table = pq.read_table(src)
    doc = json.loads(table.schema.metadata[METADATA_KEY])
    if meta is not None:
        meta(doc)
    if row is not None:
        emb = table.column("embedding").combine_chunks()
        values = np.nan_to_num(emb.values.to_numpy(zero_copy_only=False))  # null rows: zeros under the mask
        values[row * emb.type.list_size] += np.float32(delta)
        fixed = pa.FixedSizeListArray.from_arrays(pa.array(values), emb.type.list_size, mask=emb.is_null())
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", fixed)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(doc).encode()}), dst)
    return dst


def first_ok(path: Path) -> int:
    statuses: list[str] = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    return statuses.index("ok")


# ---- verdicts ----------------------------------------------------------------------------------
def test_every_row_of_a_fresh_batch_file_is_bitwise_error_rows_included(job: tuple[Path, Path]) -> None:
    out, _ = job
    report = verify_results(out, sample=None)
    assert report.ok and report.verdict == "bitwise" and report.kind == "batch"
    assert report.totals["bitwise"] == report.total_rows == 13 and report.sample["mode"] == "all"
    assert report.differences == ()
    code, text, _ = run("verify", str(out), "--all", "--json")
    doc = json.loads(text)
    assert code == 0 and doc["verdict"] == "bitwise" and len(doc["rows"]) == 13
    assert {"index", "source", "verdict"} <= set(doc["rows"][0]) and doc["rows"][0]["source"].endswith(".jpg")


def test_a_stored_number_edited_is_a_mismatch_exit_3(job: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = job
    row = first_ok(out)
    bad = edited(out, tmp_path / "bad.parquet", row=row, delta=1e-3)
    report = verify_results(bad, sample=None)
    verdicts = {r.index: r.verdict for r in report.rows}
    assert verdicts.pop(row) == "mismatch" and set(verdicts.values()) == {"bitwise"}
    assert report.verdict == "mismatch" and not report.ok
    code, text, _ = run("verify", str(bad), "--all")
    assert code == 3 and "mismatch" in text and "FAILED" in text


def test_a_tiny_difference_made_on_another_cpu_is_drift(job: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = job
    row = first_ok(out)

    def other_cpu(doc: dict[str, Any]) -> None:
        doc["provenance"]["flags"]["build"] |= {"cpu_vendor": "GenuineIntel", "cpu_model": "Intel Xeon (then)"}

    moved = edited(out, tmp_path / "other-cpu.parquet", meta=other_cpu, row=row, delta=2e-7)
    report = verify_results(moved, sample=None)
    drifted = next(r for r in report.rows if r.index == row)
    assert drifted.verdict == "drift" and drifted.max_abs is not None and 0 < drifted.max_abs < 1e-4
    assert drifted.min_cosine is not None and drifted.min_cosine > 0.9999
    assert report.ok and report.verdict == "drift"
    assert {d.fact for d in report.differences} == {"build.cpu_vendor", "build.cpu_model"}
    code, text, _ = run("verify", str(moved), "--all", "--json")
    doc = json.loads(text)
    assert code == 0 and doc["differences"][0]["then"] in ("Intel Xeon (then)", "GenuineIntel")
    # beyond the tolerance, another CPU is no excuse
    far = edited(out, tmp_path / "far.parquet", meta=other_cpu, row=row, delta=1e-2)
    assert verify_results(far, sample=None).verdict == "mismatch"


def test_inputs_rewritten_or_deleted_under_images_root(job: tuple[Path, Path], tmp_path: Path) -> None:
    out, folder = job
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    rows = pq.read_table(out, columns=["path", "status"]).to_pylist()
    ok_paths = [Path(r["path"]).relative_to(folder) for r in rows if r["status"] == "ok"]
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(moved / ok_paths[0])  # rewritten
    (moved / ok_paths[1]).unlink()  # deleted
    report = verify_results(out, sample=None, images_root=moved)
    by_source = {Path(r.source).relative_to(folder): r.verdict for r in report.rows}
    assert by_source[ok_paths[0]] == "input_changed" and by_source[ok_paths[1]] == "input_missing"
    assert report.totals["bitwise"] == 11 and not report.ok
    code, _, _ = run("verify", str(out), "--all", "--images-root", str(moved), "--json")
    assert code == 3


def test_sample_is_seeded_and_spread_over_the_file(job: tuple[Path, Path]) -> None:
    picks = select_rows(1000, 32, seed=5)
    assert picks == select_rows(1000, 32, seed=5) != select_rows(1000, 32, seed=6)
    assert len(picks) == 32 and all(i * 1000 // 32 <= p < (i + 1) * 1000 // 32 + 1 for i, p in enumerate(picks))
    report = verify_results(job[0], sample=4, seed=1)
    assert len(report.rows) == 4 and report.sample == {"mode": "sample", "size": 4, "seed": 1}


# ---- the CLI's JSON documents ---------------------------------------------------------------------
def test_classify_json_document_verifies_and_an_edit_is_caught(job: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = job
    images = sorted(str(p) for p in folder.glob("shape*.png"))[:3] + [str(folder / "bad" / "notes.jpg")]
    code, text, _ = run("classify", *images, "--labels", ",".join(LABELS), "--json", "--replicas", "1")
    assert code == 1  # one error row
    doc = json.loads(text)
    assert doc["recipe"]["settings"]["micro_batch"] == 8 and len(doc["results"][0]["sha256"]) == 64
    saved = tmp_path / "classify.json"
    saved.write_text(text)
    code, out, _ = run("verify", str(saved), "--json")
    assert code == 0 and json.loads(out)["totals"]["bitwise"] == 4
    doc["results"][1]["top"][0]["prob"] += 1e-3
    saved.write_text(json.dumps(doc))
    report = verify_results(saved)
    assert [r.verdict for r in report.rows] == ["bitwise", "mismatch", "bitwise", "bitwise"]


def test_embed_json_document_verifies_images_and_texts(job: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = job
    image = min(folder.glob("shape*.png"))
    code, text, _ = run("embed", str(image), "--text", "a red circle", "--json", "--replicas", "1")
    assert code == 0
    saved = tmp_path / "embed.json"
    saved.write_text(text)
    report = verify_results(saved)
    assert report.kind == "embed" and [r.verdict for r in report.rows] == ["bitwise", "bitwise"]
    assert report.rows[1].source == "a red circle"


def test_server_answers_verify_against_the_uploaded_files(job: tuple[Path, Path], tmp_path: Path) -> None:
    """A /v1/classify and a base64 /v1/embed answer saved for an audit; the uploads kept in a folder."""
    from fastapi.testclient import TestClient

    from steadyclip.server import ServerSettings, create_app

    _, folder = job
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    names = [p.name for p in sorted(folder.glob("shape*.png"))[:2]]
    for name in names:
        shutil.copy(folder / name, uploads / name)
    files = [("images", (n, (uploads / n).read_bytes())) for n in names]
    engine = Engine(load(), replicas=1, text_cache=None)
    with TestClient(create_app(engine, settings=ServerSettings())) as client:
        classified = client.post("/v1/classify", files=files, data={"labels": LABELS})
        embedded = client.post("/v1/embed", files=[files[0]], data={"encoding": "base64"})
    assert classified.status_code == embedded.status_code == 200
    for name, resp in (("classify", classified), ("embed", embedded)):
        saved = tmp_path / f"{name}.json"
        saved.write_bytes(resp.content)
        code, out, _ = run("verify", str(saved), "--images-root", str(uploads), "--json")
        report = json.loads(out)
        assert code == 0 and report["kind"] == name and report["totals"]["bitwise"] == report["checked"] >= 1, out
    (uploads / names[0]).write_bytes((folder / names[1]).read_bytes())  # the kept upload is not the one sent
    saved = tmp_path / "classify.json"
    assert [r.verdict for r in verify_results(saved, images_root=uploads).rows] == ["input_changed", "bitwise"]


# ---- bad input -------------------------------------------------------------------------------------
def test_files_that_are_not_results_are_typed_errors(job: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = job
    cases = {
        "notes.txt": b"a shopping list\n",
        "truncated.parquet": out.read_bytes()[:400],
        "plain.parquet": None,
        "nonsense.json": json.dumps({"results": "x", "provenance": {}, "recipe": {"labels": 3}}).encode(),
        "old.json": json.dumps({"results": [], "provenance": {}}).encode(),
        "list.json": b"[1, 2]",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is None:
            pq.write_table(pa.table({"x": [1, 2]}), path)
        else:
            path.write_bytes(data)
        with pytest.raises(ResultFileError):
            verify_results(path)
        code, stdout, err = run("verify", str(path), "--json")
        assert code == 1 and stdout == "" and "ResultFileError" in err and "Traceback" not in err, name


def test_a_result_whose_model_cannot_be_found(job: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = job

    def moved_weights(doc: dict[str, Any]) -> None:
        doc["recipe"]["model"] = {"model_id": "steadyclip-shapes", "arch": "steadyclip-shapes", "source": "file",
                                  "pretrained": str(tmp_path / "gone.safetensors")}

    lost = edited(out, tmp_path / "lost.parquet", meta=moved_weights)
    with pytest.raises(ModelSourceError, match="--model/--pretrained"):
        verify_results(lost)
    code, _, err = run("verify", str(lost))
    assert code == 1 and "ModelSourceError" in err and "Traceback" not in err
    # pointing at the weights again proves it
    code, _, _ = run("verify", str(lost), "--model", "steadyclip-demo", "--sample", "3")
    assert code == 0


def test_other_weights_are_reported_and_a_gone_weights_file_is_typed(job: tuple[Path, Path], demo_copy: Path,
                                                                     tmp_path: Path) -> None:
    """A result made with a checkpoint file: checked against other weights of its architecture, then lost."""
    image = min(job[1].glob("shape*.png"))
    code, text, _ = run("embed", str(image), "--text", "a red circle", "--model", "steadyclip-shapes",
                        "--pretrained", str(demo_copy), "--json", "--replicas", "1")
    assert code == 0
    saved = tmp_path / "embed.json"
    saved.write_text(text)
    # the bundled demo weights: the same architecture, another checkpoint; a report, not a refusal
    report = verify_results(saved, model="steadyclip-demo")
    assert [r.verdict for r in report.rows] == ["mismatch", "mismatch"] and not report.ok
    assert all(str(r.reason).startswith("other weights: SHA-256") for r in report.rows)
    assert "weights_sha256" in {d.fact for d in report.differences}
    code, out, _ = run("verify", str(saved), "--model", "steadyclip-demo")
    assert code == 3 and "weights_sha256" in out and "other weights" in out
    # the recorded file is gone: a typed error naming it and the fix, exit 1, no traceback
    moved = demo_copy.rename(tmp_path / "moved.safetensors")
    with pytest.raises(ModelSourceError, match="--model/--pretrained"):
        verify_results(saved)
    code, out, err = run("verify", str(saved), "--json")
    assert code == 1 and out == "" and "ModelSourceError" in err and str(demo_copy) in err
    assert "Traceback" not in err
    code, out, _ = run("verify", str(saved), "--model", "steadyclip-shapes", "--pretrained", str(moved), "--json")
    assert code == 0 and json.loads(out)["verdict"] == "bitwise"


def test_usage_errors_exit_2(job: tuple[Path, Path], tmp_path: Path) -> None:
    assert run("verify", str(tmp_path / "nope.parquet"))[0] == 2
    assert run("verify", str(job[0]), "--all", "--sample", "3")[0] == 2
    assert run("verify")[0] == 2
