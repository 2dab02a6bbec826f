"""Engine replicas: every K gives the same bits, a killed replica changes nothing, layout is not identity."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from steadyclip import Engine, load
from steadyclip.batch import run_batch
from steadyclip.engine.layout import cgroup_cpu_quota, usable_cpus
from steadyclip.errors import InputError
from steadyclip.model.loading import LoadedModel
from steadyclip.model.registry import demo_labels

EXAMPLES = sorted(str(p) for p in Path("examples").glob("*.png"))


def _images(tmp_path: Path, n: int, seed: int = 7) -> list[str]:
    from steadyclip.demo.shapes import generate

    paths = []
    for i, (img, _, _) in enumerate(generate(n, seed=seed)):
        path = tmp_path / f"img{i:03d}.png"
        img.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    loaded: LoadedModel = load()  # steadyclip's lazy top-level names are untyped
    return loaded


def test_every_replica_count_gives_the_same_bits_and_numerics_provenance(demo: LoadedModel, tmp_path: Path) -> None:
    imgs = _images(tmp_path, 37)  # 10 micro-batches of 4, the last one partial
    ref = Engine(demo, micro_batch=4, replicas=1, text_cache=None)
    want = ref.embed_images(imgs)
    want_cls = ref.classify(imgs, demo_labels())
    for k in (2, 3, 4):  # oversubscribed on small machines: fine for identity
        with Engine(demo, micro_batch=4, replicas=k, text_cache=None) as eng:
            got = eng.embed_images(imgs)
            assert np.array_equal(got, want), f"replicas={k} changed a bit"
            assert len(eng.replica_pids()) == k
            cls = eng.classify(imgs, demo_labels())
            assert [c.probs for c in cls] == [c.probs for c in want_cls]
            assert eng.provenance == ref.provenance
            assert eng.execution.replicas == k and ref.execution.replicas == 1


def test_a_killed_replica_is_replaced_and_nothing_changes(demo: LoadedModel, tmp_path: Path) -> None:
    imgs = _images(tmp_path, 120)
    want = Engine(demo, micro_batch=2, replicas=1, text_cache=None).embed_images(imgs)
    eng = Engine(demo, micro_batch=2, replicas=2, text_cache=None)
    assert eng.replica_pids() == []  # nothing started yet
    eng.start_replicas()
    victim = eng.replica_pids()[0]
    out: dict[str, np.ndarray] = {}
    job = threading.Thread(target=lambda: out.setdefault("emb", eng.embed_images(imgs)))
    job.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=120)
    assert np.array_equal(out["emb"], want)
    assert victim not in eng.replica_pids() and len(eng.replica_pids()) == 2
    assert eng.execution.extra["replica_restarts"] >= 1
    eng.close()


def test_bad_images_are_rows_in_every_layout(demo: LoadedModel, tmp_path: Path) -> None:
    imgs = _images(tmp_path, 9)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    mixed = imgs[:4] + [str(tmp_path / "broken.png")] + imgs[4:]
    reports = [Engine(demo, micro_batch=2, replicas=k, text_cache=None).classify(
        mixed, demo_labels(), on_error="row").to_dict() for k in (1, 3)]
    assert reports[0] == reports[1]
    assert reports[0]["errors"] == 1
    assert reports[0]["results"][4]["error"]["type"] == "ImageDecodeError"
    assert len(reports[0]["results"]) == 10


def test_threads_beyond_one_only_where_rows_stay_equal(arch_checkpoint: object, tmp_path: Path) -> None:
    loaded = load("RN50", pretrained=str(arch_checkpoint("RN50")))  # type: ignore[operator]
    imgs = _images(tmp_path, 3)
    one = Engine(loaded, micro_batch=2, threads=1, replicas=1, text_cache=None)
    two = Engine(loaded, micro_batch=2, threads=2, replicas=1, text_cache=None)
    rec = two.execution
    assert rec.threads in (1, 2)
    if rec.threads == 1:  # refused here: the record says why
        assert rec.threads_requested == 2 and rec.threads_verdict.startswith("refused")
    else:
        assert rec.threads_verdict == "verified-invariant"
    assert np.array_equal(one.embed_images(imgs), two.embed_images(imgs))
    assert one.provenance == two.provenance  # threads are layout, not identity


def test_bad_layout_arguments_are_input_errors(demo: LoadedModel) -> None:
    for kwargs in ({"replicas": 0}, {"threads": -1}, {"replicas": "many"}, {"threads": True}):
        with pytest.raises(InputError):
            Engine(demo, text_cache=None, **kwargs)


def test_cgroup_quota_caps_the_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_batch_file_is_byte_identical_for_any_replica_count(demo: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _images(folder, 21)
    outs = []
    for k in (1, 3):
        eng = Engine(demo, micro_batch=4, replicas=k, text_cache=None)
        out = tmp_path / f"k{k}.parquet"
        summary = run_batch(folder, eng, labels=demo_labels(), out=out, embeddings=True)
        assert summary.workers == k
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert pq.read_table(tmp_path / "k3.parquet").num_rows == 21


def test_a_replica_killing_file_is_one_error_row(demo: LoadedModel, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from steadyclip.batch import _prep
    from steadyclip.batch.inputs import InputItem

    folder = tmp_path / "in"
    folder.mkdir()
    paths = _images(folder, 10)
    victim = Path(paths[5]).name
    real = _prep.prepare

    def crashing(item: InputItem, transform: _prep.Transform,
                 max_file_bytes: int = _prep.DEFAULT_MAX_FILE_BYTES) -> _prep.Prepared:
        if item.path.endswith(victim):
            os._exit(1)  # a segfaulting codec, seen from outside
        return real(item, transform, max_file_bytes)

    monkeypatch.setattr(_prep, "prepare", crashing)  # forked replicas inherit the patch
    eng = Engine(demo, micro_batch=4, replicas=2, text_cache=None)
    run_batch(folder, eng, labels=demo_labels(), out=tmp_path / "o.parquet")
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert len(rows) == 10
    assert [(Path(r["path"]).name, r["error_type"]) for r in rows if r["status"] == "error"] == \
        [(victim, "DecoderCrashError")]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two CPUs")
def test_one_core_and_all_cores_print_the_same_rows_and_numerics(tmp_path: Path) -> None:
    imgs = _images(tmp_path, 13)
    cmd = [sys.executable, "-m", "steadyclip", "embed", *imgs, "--micro-batch", "4", "--json"]
    docs = []
    for prefix in (["taskset", "-c", "0"], []):
        proc = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=300, check=True)
        docs.append(json.loads(proc.stdout))
    one, many = docs
    assert one["execution"]["cpus"] == 1 and many["execution"]["cpus"] >= 2
    assert one["execution"]["replicas"] == 1 and many["execution"]["replicas"] >= 2
    assert one["images"] == many["images"] and one["provenance"] == many["provenance"]


def test_an_upload_that_kills_replicas_fails_alone(demo: LoadedModel, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's path: uploads batched with a crashing one still get their (bitwise) embeddings."""
    from steadyclip.engine import images
    from steadyclip.engine._rows import CRASH_MESSAGE

    datas = [Path(p).read_bytes() for p in _images(tmp_path, 6)]
    with Engine(demo, micro_batch=4, replicas=2, text_cache=None) as eng:
        clean = eng.embed_uploads(datas, None).result(120)
    real = images.decode_into

    def crashing(sink: list[str], src: object, **kw: object) -> Image.Image:
        if src == b"boom":
            os._exit(1)  # a segfaulting codec, seen from outside
        return real(sink, src, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "decode_into", crashing)  # forked replicas inherit the patch
    with Engine(demo, micro_batch=4, replicas=2, text_cache=None) as eng:
        rows = eng.embed_uploads([*datas[:2], b"boom", *datas[2:]], None).result(120)
        restarts = eng.execution.extra["replica_restarts"]
    assert [None if r.ok else (r.error_type, r.error_message) for r in rows] == \
        [None, None, ("ImageDecodeError", CRASH_MESSAGE), None, None, None, None]
    good = np.stack([r.embedding for r in rows if r.embedding is not None])  # (6, D)
    assert np.array_equal(good, np.stack([r.embedding for r in clean if r.embedding is not None]))
    assert restarts >= 4  # the chunk twice, then the culprit alone twice
