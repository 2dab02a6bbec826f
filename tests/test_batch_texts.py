"""Text batch jobs: one row per line or cell, the bits embed_texts gives each text alone, resumable, CLI."""
from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_batch import model_source
from test_batch_resume import _run, _sha

from steadyclip.batch import BatchProgress, open_texts, read_metadata, run_text_batch
from steadyclip.engine import Engine
from steadyclip.errors import BatchJobError
from steadyclip.model.loading import LoadedModel, load

torch.set_num_threads(1)

LONG = " ".join(["a red circle next to a blue square"] * 12)  # far past the demo model's context
TEXTS = ["a red circle", "#1 blue square", "a photo of a green triangle on a white background", LONG,
         "a red circle", "  spaced  out  ", "ünïcödé 漢字 🙂", "x", "two yellow stars and a purple hexagon", "last"]


@pytest.fixture(scope="module")
def loaded(demo_arch_checkpoint: Path) -> LoadedModel:
    source, pretrained = model_source(demo_arch_checkpoint)
    return load(source, pretrained=pretrained)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    """Two replicas: the job's chunks are spread over them."""
    return Engine(loaded, micro_batch=4, text_micro_batch=2, replicas=2, text_cache=None)


@pytest.fixture(scope="module")
def solo(loaded: LoadedModel) -> Engine:
    """One process, nothing shared with the job's engine but the model and its settings."""
    return Engine(loaded, micro_batch=4, text_micro_batch=2, replicas=1, text_cache=None)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in lines), encoding="utf-8")
    return path


def embedding(row: dict[str, object]) -> bytes:
    return np.asarray(row["embedding"], dtype=np.float32).tobytes()


# ---- the rows -----------------------------------------------------------------------------------
def test_each_row_is_embed_texts_of_that_text_alone_bitwise(engine: Engine, solo: Engine, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "t.parquet"
    summary = run_text_batch(write_lines(tmp_path / "q.txt", TEXTS), engine, out=out, part_size=3)
    assert (summary.total, summary.ok, summary.errors, summary.inputs) == (10, 10, 0, "texts")
    assert summary.execution["replicas"] == 2
    rows = pq.read_table(out).to_pylist()
    assert [r["index"] for r in rows] == list(range(10)) and [r["text"] for r in rows] == TEXTS
    for r in rows:
        assert embedding(r) == solo.embed_texts([r["text"]])[0].tobytes(), r["text"]
        assert r["status"] == "ok" and r["error_type"] is None
        assert r["text_sha256"] == __import__("hashlib").sha256(r["text"].encode()).hexdigest()
        assert abs(np.linalg.norm(np.asarray(r["embedding"], dtype=np.float64)) - 1) < 1e-5
    assert [r["truncated"] for r in rows] == [t == LONG for t in TEXTS]
    assert any("truncated" in m for m in caplog.messages), "a truncated text is warned about, as embed_texts does"
    emb_type = pq.read_schema(out).field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.value_type == pa.float32()
    meta = read_metadata(out)
    assert meta["inputs"] == "texts" and (meta["rows"], meta["ok"], meta["errors"]) == (10, 10, 0)
    assert meta["provenance"]["weights_sha256"] == engine.loaded.info.weights_sha256
    assert meta["job"]["options"]["text_buckets"] == engine.provenance.text_buckets


def test_blank_and_non_utf8_lines_are_error_rows_and_rows_stay_lines(engine: Engine, tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbfa red circle\r\n\r\n   \nbad \xff\xfe bytes\n# not a comment\nlast"  # BOM, CRLF, no final \n
    manifest = tmp_path / "q.lst"
    manifest.write_bytes(raw)
    out = tmp_path / "t.parquet"
    summary = run_text_batch(manifest, engine, out=out)
    rows = pq.read_table(out).to_pylist()
    assert [r["text"] for r in rows] == ["a red circle", "", "   ", "bad \\xff\\xfe bytes", "# not a comment", "last"]
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "ok", "ok"]
    assert (summary.ok, summary.errors) == (3, 3)
    bad = rows[1:4]
    assert {r["error_type"] for r in bad} == {"TextInputError"}
    assert "line 2 is blank" in bad[0]["error_message"] and "line 4 is not valid UTF-8" in bad[2]["error_message"]
    assert all(r["embedding"] is None and r["truncated"] is None for r in bad)
    assert bad[2]["text_sha256"] == __import__("hashlib").sha256(b"bad \xff\xfe bytes").hexdigest()


# ---- CSV / Parquet columns ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_column_of_a_table_gives_the_text_file_rows(engine: Engine, tmp_path: Path, kind: str) -> None:
    texts = TEXTS[:6]
    ref = tmp_path / "ref.parquet"
    run_text_batch(write_lines(tmp_path / "q.txt", texts), engine, out=ref)
    manifest = tmp_path / f"captions.{kind}"
    if kind == "csv":
        import csv

        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "caption"])
            w.writerows([[i, t] for i, t in enumerate(texts)])
    else:
        pq.write_table(pa.table({"id": list(range(6)), "caption": texts}), manifest)
    out = tmp_path / "t.parquet"
    run_text_batch(manifest, engine, out=out, text_column="caption")
    cols = ["index", "text", "text_sha256", "status", "truncated", "embedding"]
    assert pq.read_table(out).select(cols).equals(pq.read_table(ref).select(cols))
    assert read_metadata(out)["text_column"] == "caption"


def test_table_inputs_missing_cells_and_refusals(engine: Engine, tmp_path: Path) -> None:
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a red circle", None, "x"]}), nulls)  # the default column is 'text'
    out = tmp_path / "n-out.parquet"
    run_text_batch(nulls, engine, out=out)
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and "data row 2 has no value" in rows[1]["error_message"]
    with pytest.raises(BatchJobError, match=r"has no column 'caption' \(columns: \['text'\]\).*--text-column"):
        run_text_batch(nulls, engine, out=tmp_path / "o.parquet", text_column="caption")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(BatchJobError, match="holds int64, not text"):
        run_text_batch(tmp_path / "ints.parquet", engine, out=tmp_path / "o.parquet")
    (tmp_path / "c.csv").write_text("caption\nhello\n")
    with pytest.raises(BatchJobError, match="has no column 'text'"):
        run_text_batch(tmp_path / "c.csv", engine, out=tmp_path / "o.parquet")
    with pytest.raises(BatchJobError, match="has no columns"):
        run_text_batch(write_lines(tmp_path / "q.txt", ["a"]), engine, out=tmp_path / "o.parquet", text_column="c")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(BatchJobError, match="no texts in"):
        run_text_batch(tmp_path / "empty.txt", engine, out=tmp_path / "o.parquet")
    with pytest.raises(BatchJobError, match="does not exist"):
        run_text_batch(tmp_path / "nope.txt", engine, out=tmp_path / "o.parquet")


def test_a_non_utf8_csv_cell_is_an_error_row_not_a_failed_job(tmp_path: Path) -> None:
    manifest = tmp_path / "c.csv"
    manifest.write_bytes(b"text\nfine\ncaf\xe9 latin-1\n")
    items = list(open_texts(manifest))
    assert [it.error is None for it in items] == [True, False]
    assert items[1].text == "caf\\xe9 latin-1" and "data row 2 is not valid UTF-8" in str(items[1].error)


# ---- resume -------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_resume_after_an_interruption_writes_the_same_file(engine: Engine, tmp_path: Path) -> None:
    manifest = write_lines(tmp_path / "q.txt", TEXTS * 10)  # 100 texts: several chunks of 32
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    run_text_batch(manifest, engine, out=ref, part_size=4)

    def stop(p: BatchProgress) -> None:
        if p.done >= 9:
            raise _Stop

    with pytest.raises(_Stop):
        run_text_batch(manifest, engine, out=out, part_size=4, progress=stop)
    assert not out.exists() and list(out.with_name(out.name + ".parts").glob("part-*.parquet"))
    summary = run_text_batch(manifest, engine, out=out, part_size=4)
    assert 0 < summary.resumed < 100 and summary.processed == 100 - summary.resumed
    assert out.read_bytes() == ref.read_bytes()
    again = run_text_batch(manifest, engine, out=out, part_size=4)
    assert again.already_complete and again.processed == 0


def test_resume_refused_when_the_texts_or_settings_change(engine: Engine, loaded: LoadedModel,
                                                          tmp_path: Path) -> None:
    manifest = write_lines(tmp_path / "q.txt", TEXTS * 2)
    out = tmp_path / "out.parquet"

    def stop(p: BatchProgress) -> None:
        if p.done >= 5:
            raise _Stop

    with pytest.raises(_Stop):
        run_text_batch(manifest, engine, out=out, part_size=4, progress=stop)
    write_lines(manifest, [*TEXTS[:-1], "changed", *TEXTS])
    with pytest.raises(BatchJobError, match=r"input list changed.*restart=True \(--restart\)"):
        run_text_batch(manifest, engine, out=out, part_size=4)
    write_lines(manifest, TEXTS * 2)
    other = Engine(loaded, micro_batch=4, text_micro_batch=4, replicas=1, text_cache=None)
    with pytest.raises(BatchJobError, match="option text_micro_batch changed"):
        run_text_batch(manifest, other, out=out, part_size=4)
    with pytest.raises(BatchJobError, match="option part_size changed"):
        run_text_batch(manifest, engine, out=out, part_size=5)
    assert run_text_batch(manifest, engine, out=out, part_size=4).resumed > 0, "the same job still resumes"


@pytest.mark.slow  # three cold CLI starts; the in-process resume above is the fast suite's check
def test_kill_9_during_a_part_write_then_the_same_command_resumes(tmp_path: Path,
                                                                  demo_arch_checkpoint: Path) -> None:
    manifest = write_lines(tmp_path / "q.txt", [f"{t} {i}" for i in range(3) for t in TEXTS])
    cmd = ["env", f"STEADYCLIP_CACHE_DIR={tmp_path / 'cache'}", sys.executable, "-m", "steadyclip", "batch",
           str(manifest), "--texts", "--part-size", "8", "--replicas", "2", "--no-progress", "--json"]
    source, pretrained = model_source(demo_arch_checkpoint)
    cmd += ["--model", source] + (["--pretrained", pretrained] if pretrained else [])
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    assert _run(cmd + ["--out", str(ref)]).returncode == 0
    killed = _run(cmd + ["--out", str(out)], kill_at="part-tmp:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (out.with_name(out.name + ".parts") / "job.json").is_file()
    resumed = _run(cmd + ["--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["total"], summary["resumed"], summary["processed"]) == (30, 8, 22)
    assert _sha(out) == _sha(ref), "the resumed file is byte-identical to an uninterrupted run's"


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_texts_and_text_column(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    from steadyclip.cli import cli

    source, pretrained = model_source(demo_arch_checkpoint)
    model = ["--model", source] + (["--pretrained", pretrained] if pretrained else [])
    txt = write_lines(tmp_path / "q.txt", [*TEXTS[:4], ""])
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(cli, ["batch", str(txt), "--texts", "--out", str(out), "--replicas", "1", "--json",
                                      "--no-progress", *model], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["total"], doc["ok"], doc["errors"], doc["inputs"]) == (5, 4, 1, "texts")
    assert pq.read_table(out).column("truncated").to_pylist() == [False, False, False, True, None]
    pq.write_table(pa.table({"caption": TEXTS[:4]}), tmp_path / "c.parquet")
    col = CliRunner().invoke(cli, ["batch", str(tmp_path / "c.parquet"), "--text-column", "caption", "--out",
                                   str(tmp_path / "c-out.parquet"), "--replicas", "1", "--no-progress", *model],
                             catch_exceptions=False)
    assert col.exit_code == 0, col.output
    assert "4 rows: 4 ok, 0 errors" in col.stderr and "text/s" in col.stderr
    a, b = pq.read_table(out).slice(0, 4), pq.read_table(tmp_path / "c-out.parquet")
    assert a.column("embedding").equals(b.column("embedding"))
    usage = CliRunner().invoke(cli, ["batch", str(txt), "--texts", "--labels", "a,b", "--out", str(out)])
    assert usage.exit_code == 2 and "--labels/--labels-file do(es) not apply to a text job" in usage.output
    local_only = CliRunner().invoke(cli, ["batch", str(txt), "--texts", "--workers", "2", "--out", str(out)])
    assert local_only.exit_code == 2 and "--workers apply to --engine ray" in local_only.output
    missing = CliRunner().invoke(cli, ["batch", str(tmp_path / "c.parquet"), "--texts", "--out",
                                       str(tmp_path / "x.parquet"), "--replicas", "1", *model])
    assert missing.exit_code == 1 and "BatchJobError" in missing.stderr and "no column 'text'" in missing.stderr


def test_ray_text_pipeline_keeps_error_rows_on_the_driver_in_order(solo: Engine, tmp_path: Path) -> None:
    """Only embeddable texts are sent; error rows slot back in order around each returned batch (no Ray here)."""
    from steadyclip.batch.ray_texts import RayTextPipeline
    from steadyclip.batch.text_job import text_rows

    src = tmp_path / "q.txt"
    src.write_bytes(b"\n\xff\nalpha\n\nbeta\ngamma\n  \ndelta\n\xc3\n")
    items = list(open_texts(src))
    sent: list[list[str]] = []

    def stream(rows: list[dict[str, object]], actor: type, kwargs: dict[str, object]) -> Iterator[dict[str, np.ndarray]]:
        for k in range(0, len(rows), 3):  # Ray batches of 3, as actors would return them
            batch = rows[k:k + 3]
            sent.append([str(r["text"]) for r in batch])
            texts = [str(r["text"]) for r in batch]
            yield {"index": np.array([r["index"] for r in batch]), "embedding": solo.embed_texts(texts)}

    pipeline = RayTextPipeline(solo, lambda chunk, emb: text_rows(solo, chunk, emb), actors=1)
    pipeline.stream = stream  # type: ignore[method-assign]
    chunks = list(pipeline.run(iter(items), part_size=4))
    rows = [r for c in chunks for r in c]
    assert sent == [["alpha", "beta", "gamma"], ["delta"]]
    assert [r.index for r in rows] == list(range(len(items)))
    assert [r.ok for r in rows] == [False, False, True, False, True, True, False, True, False]
    for r in rows:
        if r.ok:
            assert r.embedding.tobytes() == solo.embed_texts([str(r.text)])[0].tobytes()
    only_errors = RayTextPipeline(solo, lambda chunk, emb: text_rows(solo, chunk, emb), actors=1)
    assert [r.ok for c in only_errors.run(iter(items[:2]), 4) for r in c] == [False, False]  # Ray never started
