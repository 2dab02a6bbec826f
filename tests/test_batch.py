"""Batch jobs: one row per input, bad images as error rows, manifests, resume refusal, CLI."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from steadyclip.batch import open_inputs, read_metadata, run_batch
from steadyclip.batch.runner import BatchProgress
from steadyclip.engine import Engine
from steadyclip.errors import BatchJobError
from steadyclip.model.loading import LoadedModel, load
from steadyclip.model.registry import DEMO_SPEC, demo_labels

torch.set_num_threads(1)

LABELS = demo_labels()
CORRUPT = {  # file name -> expected error type
    "bad/empty.jpg": "ImageDecodeError",
    "bad/noise.png": "ImageDecodeError",
    "bad/notes.jpg": "ImageDecodeError",
    "bad/truncated.png": "ImageDecodeError",
    "bomb.png": "ImageTooLargeError",
}


# ---- fixtures ------------------------------------------------------------------------------
def model_source(demo_arch_checkpoint: Path) -> tuple[str, str | None]:
    """The bundled demo model when its weights exist, else a random-init one of the same architecture."""
    if DEMO_SPEC.weights_file is not None and DEMO_SPEC.weights_file.is_file():
        return DEMO_SPEC.model_id, None
    return DEMO_SPEC.arch, str(demo_arch_checkpoint)


@pytest.fixture(scope="module")
def loaded(demo_arch_checkpoint: Path) -> LoadedModel:
    source, pretrained = model_source(demo_arch_checkpoint)
    return load(source, pretrained=pretrained)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    return Engine(loaded, micro_batch=4, text_cache=None)


def _png_bytes(img: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_images(folder: Path, n_good: int, *, seed: int = 1, corrupt: bool = True) -> list[Path]:
    """``n_good`` shape images (PNG and JPEG, some nested) plus the five corrupt kinds; returns all files."""
    from steadyclip.demo.shapes import generate

    files = []
    for i, (img, _, _) in enumerate(generate(n_good, seed=seed)):
        sub = folder / ("nested/deeper" if i % 7 == 0 else "nested" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"shape{i:03d}.{'jpg' if i % 4 == 1 else 'png'}"
        img.save(path, quality=92) if path.suffix == ".jpg" else img.save(path)
        files.append(path)
    if corrupt:
        (folder / "bad").mkdir(exist_ok=True)
        good_png = _png_bytes(generate(1, seed=99)[0][0])
        contents = {
            "bad/empty.jpg": b"",
            "bad/noise.png": np.random.default_rng(0).bytes(3000),
            "bad/notes.jpg": b"this is a shopping list, not a JPEG\n",
            "bad/truncated.png": good_png[: len(good_png) * 2 // 3],
            "bomb.png": bomb_png(),
        }
        for name, data in contents.items():
            (folder / name).write_bytes(data)
            files.append(folder / name)
    (folder / "README.txt").write_text("not an image: skipped by the folder walk\n")
    (folder / ".hidden.png").write_bytes(b"hidden files are skipped")
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    files = write_images(root, 35)
    assert len(files) == 40
    return root


def table(path: Path) -> pa.Table:
    return pq.read_table(path)


# ---- one row per input, errors as rows -------------------------------------------------------
def test_forty_images_five_corrupt_give_forty_rows(engine: Engine, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    summary = run_batch(folder, engine, labels=LABELS, out=out, top_k=3, workers=1, part_size=8)
    assert (summary.total, summary.ok, summary.errors, summary.processed) == (40, 35, 5, 40)
    t = table(out).to_pylist()
    assert [r["index"] for r in t] == list(range(40))
    assert len({r["path"] for r in t}) == 40
    errors = {os.path.relpath(r["path"], folder): r["error_type"] for r in t if r["status"] == "error"}
    assert errors == CORRUPT
    for r in t:
        data = Path(r["path"]).read_bytes()
        if data or r["status"] == "ok":
            assert r["sha256"] == hashlib.sha256(data).hexdigest()
        if r["status"] == "ok":
            assert r["error_type"] is None and len(r["top_labels"]) == 3
            assert r["top_probs"] == sorted(r["top_probs"], reverse=True)
            assert set(r["top_labels"]) <= set(LABELS)
        else:
            assert r["top_labels"] is None and r["error_message"]
    assert not (tmp_path / "out.parquet.parts").exists(), "the parts folder must be removed once assembled"


def test_order_is_sorted_walk_and_skips_non_images(folder: Path) -> None:
    paths = [item.path for item in open_inputs(folder)]
    assert len(paths) == 40
    assert not any(p.endswith(("README.txt", ".hidden.png")) for p in paths)
    rel = [os.path.relpath(p, folder) for p in paths]
    assert rel[:5] == ["bad/empty.jpg", "bad/noise.png", "bad/notes.jpg", "bad/truncated.png", "bomb.png"]
    assert paths == [item.path for item in open_inputs(str(folder))], "listing must be repeatable"


def test_batch_numbers_equal_the_engine_api_bitwise(engine: Engine, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    run_batch(folder, engine, labels=LABELS, out=out, all_probs=True, embeddings=True, workers=2, part_size=16)
    rows = [r for r in table(out).to_pylist() if r["status"] == "ok"]
    paths = [r["path"] for r in rows]
    emb = engine.embed_images(paths)
    direct = engine.classify(paths, LABELS, top_k=5)
    for r, e, c in zip(rows, emb, direct):
        assert np.asarray(r["embedding"], dtype=np.float32).tobytes() == e.tobytes()
        assert tuple(r["probs"]) == c.probs
        assert r["top_labels"] == [lab for lab, _ in c.top]


def test_file_metadata_carries_provenance_and_readers_agree(engine: Engine, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    run_batch(folder, engine, labels=LABELS, out=out, embeddings=True, workers=1)
    meta = read_metadata(out)
    prov = meta["provenance"]
    assert prov["fingerprint"] == engine.loaded.info.fingerprint
    assert prov["weights_sha256"] == engine.loaded.info.weights_sha256
    assert (prov["micro_batch"], prov["template_set"]) == (4, "photo")
    assert meta["labels"] == LABELS and (meta["rows"], meta["ok"], meta["errors"]) == (40, 35, 5)
    emb_type = pq.read_schema(out).field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.value_type == pa.float32()
    df = __import__("pandas").read_parquet(out)
    assert len(df) == 40 and (df["status"] == "ok").sum() == 35
    assert df.loc[df["status"] == "ok", "embedding"].iloc[0].dtype == np.float32
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT count(*), max(len(embedding)) FROM '{out}' WHERE status = 'ok'").fetchall()
    assert rows == [(35, emb_type.list_size)]


def test_thread_decoding_equals_process_decoding(engine: Engine, folder: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    run_batch(folder, engine, labels=LABELS, out=a, embeddings=True, workers=0, part_size=7)
    run_batch(folder, engine, labels=LABELS, out=b, embeddings=True, workers=2, part_size=7)
    assert table(a).equals(table(b))


def test_embeddings_only(engine: Engine, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.parquet"
    run_batch(folder, engine, out=out, embeddings=True, workers=1)
    t = table(out)
    assert "top_labels" not in t.column_names and "embedding" in t.column_names
    ok = [np.asarray(v, dtype=np.float64) for v in t.column("embedding").to_pylist() if v is not None]
    assert len(ok) == 35 and all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in ok)


# ---- manifests ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "parquet", "txt"])
def test_manifest_order_duplicates_and_relative_paths(engine: Engine, tmp_path: Path, kind: str) -> None:
    imgs = tmp_path / "m"
    files = write_images(imgs, 6, corrupt=False)
    rel = [str(p.relative_to(tmp_path)) for p in files]
    listed = [rel[3], rel[0], "missing/nothing.png", rel[5], rel[0]]  # manifest order, a duplicate, a ghost
    manifest = tmp_path / f"list.{kind}"
    if kind == "csv":
        manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(listed)))
    elif kind == "parquet":
        pq.write_table(pa.table({"path": listed, "n": list(range(len(listed)))}), manifest)
    else:
        manifest.write_text("# images\n" + "\n".join(listed) + "\n\n")
    out = tmp_path / "out.parquet"
    summary = run_batch(manifest, engine, labels=LABELS, out=out, workers=1, part_size=2)
    rows = table(out).to_pylist()
    assert [r["path"] for r in rows] == listed
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok"]
    assert rows[2]["error_type"] == "ImageSourceError"
    assert rows[1]["top_probs"] == rows[4]["top_probs"], "the same file twice gives the same numbers"
    assert (summary.total, summary.errors) == (5, 1)


def test_glob_input(engine: Engine, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.parquet"
    summary = run_batch(f"{folder}/**/*.jpg", engine, labels=LABELS, out=out, workers=1)
    paths = table(out).column("path").to_pylist()
    assert paths == sorted(paths) and all(p.endswith(".jpg") for p in paths)
    assert summary.total == len(paths) == len(list(folder.rglob("*.jpg")))


def test_bad_inputs_are_refused_with_advice(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchJobError, match="no images found"):
        run_batch(tmp_path / "empty", engine, labels=LABELS, out=tmp_path / "o.parquet")
    (tmp_path / "m.csv").write_text("file\na.png\n")
    with pytest.raises(BatchJobError, match="no 'path' column"):
        run_batch(tmp_path / "m.csv", engine, labels=LABELS, out=tmp_path / "o.parquet")
    with pytest.raises(BatchJobError, match="does not exist"):
        run_batch(tmp_path / "nope", engine, labels=LABELS, out=tmp_path / "o.parquet")
    with pytest.raises(BatchJobError, match="nothing to compute"):
        run_batch(tmp_path, engine, out=tmp_path / "o.parquet")


# ---- resume refusal and idempotence -----------------------------------------------------------
class _Stop(Exception):
    pass


def _interrupted(engine: Engine, inputs: Path, out: Path, after_rows: int, **kw: object) -> int:
    """Run a job and abort it once ``after_rows`` rows are done, leaving its parts; returns their rows."""
    def progress(p: BatchProgress) -> None:
        if p.done >= after_rows:
            raise _Stop

    with pytest.raises(_Stop):
        run_batch(inputs, engine, out=out, workers=1, part_size=4, progress=progress, **kw)  # type: ignore[arg-type]
    parts = list(out.with_name(out.name + ".parts").glob("part-*.parquet"))
    assert parts and not out.exists()
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    root = tmp_path / "small"
    write_images(root, 14, corrupt=False)
    return root


def test_resume_in_process_matches_uninterrupted(engine: Engine, small_folder: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    run_batch(small_folder, engine, labels=LABELS, out=ref, embeddings=True, workers=1, part_size=4)
    done = _interrupted(engine, small_folder, out, 6, labels=LABELS, embeddings=True)
    summary = run_batch(small_folder, engine, labels=LABELS, out=out, embeddings=True, workers=1, part_size=4)
    assert 0 < done < 14 and summary.resumed == done and summary.processed == 14 - done
    assert table(out).equals(table(ref))
    assert out.read_bytes() == ref.read_bytes(), "a resumed job writes the very same file"


def test_resume_refused_when_inputs_change(engine: Engine, small_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    _interrupted(engine, small_folder, out, 5, labels=LABELS)
    write_images(small_folder / "more", 1, seed=7, corrupt=False)
    with pytest.raises(BatchJobError, match="input list changed.*--restart"):
        run_batch(small_folder, engine, labels=LABELS, out=out, workers=1, part_size=4)
    summary = run_batch(small_folder, engine, labels=LABELS, out=out, workers=1, part_size=4, restart=True)
    assert summary.total == 15 and summary.resumed == 0


def test_resume_refused_when_labels_or_options_change(engine: Engine, small_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    _interrupted(engine, small_folder, out, 5, labels=LABELS)
    with pytest.raises(BatchJobError, match="labels changed"):
        run_batch(small_folder, engine, labels=LABELS[:10], out=out, workers=1, part_size=4)
    with pytest.raises(BatchJobError, match="option top_k changed"):
        run_batch(small_folder, engine, labels=LABELS, out=out, workers=1, part_size=4, top_k=2)
    other = Engine(engine.loaded, micro_batch=2, text_cache=None)
    with pytest.raises(BatchJobError, match="option micro_batch changed"):
        run_batch(small_folder, other, labels=LABELS, out=out, workers=1, part_size=4)


def test_resume_refused_when_model_changes(engine: Engine, small_folder: Path, tmp_path: Path,
                                           demo_arch_checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out.parquet"
    _interrupted(engine, small_folder, out, 5, labels=LABELS)
    state = load_file(str(demo_arch_checkpoint))
    state["logit_scale"] = state["logit_scale"] + 0.5
    changed = tmp_path / "changed.safetensors"
    save_file(state, str(changed))
    other = Engine(load(DEMO_SPEC.arch, pretrained=str(changed)), micro_batch=4, text_cache=None)
    with pytest.raises(BatchJobError, match="model (weights_sha256|fingerprint|model_id) changed"):
        run_batch(small_folder, other, labels=LABELS, out=out, workers=1, part_size=4)


def test_resume_refused_when_label_embeddings_drift(engine: Engine, small_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale text cache or a changed numerics stack must not mix two sets of probabilities in one file."""
    out = tmp_path / "out.parquet"
    _interrupted(engine, small_folder, out, 5, labels=LABELS)
    real = engine.class_embeddings
    monkeypatch.setattr(engine, "class_embeddings", lambda *a, **k: real(*a, **k) * np.float32(1 + 2**-20))
    with pytest.raises(BatchJobError, match="label embeddings computed now differ"):
        run_batch(small_folder, engine, labels=LABELS, out=out, workers=1, part_size=4)


def test_embeddings_only_resume_refused_when_the_numerics_key_changes(engine: Engine, small_folder: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No label embeddings to compare: the numerics key (versions, flags, CPU) is what refuses the mix."""
    out = tmp_path / "out.parquet"
    _interrupted(engine, small_folder, out, 5, embeddings=True)
    monkeypatch.setattr(engine, "numerics_basis", lambda: "0" * 64)  # as after a torch upgrade
    with pytest.raises(BatchJobError, match=r"option numerics changed .*numerics flags.*restart=True \(--restart\)"):
        run_batch(small_folder, engine, embeddings=True, out=out, workers=1, part_size=4)
    summary = run_batch(small_folder, engine, embeddings=True, out=out, workers=1, part_size=4, restart=True)
    assert summary.resumed == 0 and summary.processed == 14


def test_finished_output_is_not_recomputed_or_overwritten(engine: Engine, small_folder: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = run_batch(small_folder, engine, labels=LABELS, out=out, workers=1)
    again = run_batch(small_folder, engine, labels=LABELS, out=out, workers=1)
    assert again.already_complete and again.processed == 0 and (again.ok, again.errors) == (first.ok, first.errors)
    with pytest.raises(BatchJobError, match=r"already exists.*out=, --out.*restart=True \(--restart\)"):
        run_batch(small_folder, engine, labels=LABELS[:5], out=out, workers=1)
    not_ours = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), not_ours)
    with pytest.raises(BatchJobError, match="already exists"):
        run_batch(small_folder, engine, labels=LABELS, out=not_ours, workers=1)
    assert pq.read_table(not_ours).column_names == ["x"], "a foreign file is never overwritten without --restart"


def test_out_must_be_a_file(engine: Engine, small_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(BatchJobError, match="is a folder; give a file name"):
        run_batch(small_folder, engine, labels=LABELS, out=tmp_path, workers=1)


def test_a_second_process_on_the_same_job_is_refused(engine: Engine, small_folder: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    out = tmp_path / "out.parquet"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    with FileLock(str(parts / "lock")), pytest.raises(BatchJobError, match="another process is already running"):
        run_batch(small_folder, engine, labels=LABELS, out=out, workers=1)


# ---- robustness -------------------------------------------------------------------------------
def test_a_decoder_that_dies_costs_one_error_row(engine: Engine, small_folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from steadyclip.batch import _prep

    victim = sorted(p.name for p in small_folder.glob("*.png"))[2]
    real = _prep.prepare

    def crashing(item: object, *args: object) -> object:
        if item.path.endswith(victim):  # type: ignore[attr-defined]
            os._exit(1)  # what a segfaulting codec looks like from outside
        return real(item, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_prep, "prepare", crashing)  # forked decoders inherit the patch
    out = tmp_path / "out.parquet"
    summary = run_batch(small_folder, engine, labels=LABELS, out=out, workers=2, start_method="fork")
    rows = table(out).to_pylist()
    assert summary.total == len(rows) == 14
    bad = [r for r in rows if r["status"] == "error"]
    assert [(Path(r["path"]).name, r["error_type"]) for r in bad] == [(victim, "DecoderCrashError")]


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_batch_json_summary(demo_arch_checkpoint: Path, small_folder: Path, tmp_path: Path) -> None:
    import json

    from steadyclip.cli import cli

    source, pretrained = model_source(demo_arch_checkpoint)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "cli.parquet"
    args = ["batch", str(small_folder), "--labels-file", str(labels_file), "--out", str(out), "--top-k", "2",
            "--workers", "1", "--micro-batch", "4", "--model", source, "--json", "--no-progress"]
    if pretrained:
        args += ["--pretrained", pretrained]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["total"], doc["ok"], doc["errors"], doc["out"]) == (14, 14, 0, str(out))
    assert table(out).column("top_labels").to_pylist()[0].__len__() == 2
    refused = CliRunner().invoke(cli, [*args[:2], "--labels", "a,b", *args[4:]], catch_exceptions=False)
    assert refused.exit_code == 1 and "BatchJobError" in refused.stderr


def test_cli_batch_needs_labels_or_embeddings(small_folder: Path, tmp_path: Path) -> None:
    from steadyclip.cli import cli

    result = CliRunner().invoke(cli, ["batch", str(small_folder), "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "labels" in result.output


def test_measure_throughput_reports_both_rates(engine: Engine, small_folder: Path) -> None:
    from steadyclip.batch import measure_throughput

    r = measure_throughput(engine, small_folder, workers=1)
    assert r.images == r.ok_images == 14 and r.micro_batch == 4 and r.threads == engine.threads
    assert r.batch_items_per_s > 0 and r.model_items_per_s > 0 and r.ratio > 0
    assert "img/s" in r.summary()
