"""The same batch job on Ray Data gives the same table, bit for bit, as the local engine."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from steadyclip.batch import read_metadata, run_batch
from steadyclip.engine import Engine
from steadyclip.errors import IntegrityError
from steadyclip.model.loading import load
from steadyclip.model.registry import DEMO_SPEC, demo_labels

torch.set_num_threads(1)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def engine(demo_arch_checkpoint: Path) -> Engine:
    if DEMO_SPEC.weights_file is not None and DEMO_SPEC.weights_file.is_file():
        return Engine(load(), micro_batch=4, text_cache=None)
    return Engine(load(DEMO_SPEC.arch, pretrained=str(demo_arch_checkpoint)), micro_batch=4, text_cache=None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from steadyclip.demo.shapes import generate

    root = tmp_path_factory.mktemp("ray-images")
    for i, (img, _, _) in enumerate(generate(21, seed=5)):
        img.save(root / f"{i:03d}.png")
    (root / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.fixture(autouse=True)
def _no_ray_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    yield
    if ray.is_initialized() and "shared_ray" not in request.fixturenames:
        ray.shutdown()


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[None]:
    """One local Ray that the jobs of the tests below join (each start costs seconds on a small machine).

    Its tests sit at the end of the file: the ones above need no Ray running (they start their own, or assert
    that the job stopped the one it started), and fail loudly if one were.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_engine_equals_local_engine_bitwise(engine: Engine, folder: Path, tmp_path: Path) -> None:
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    kw = {"labels": demo_labels(), "embeddings": True, "all_probs": True, "part_size": 5}
    a = run_batch(folder, engine, out=local, backend="local", workers=1, **kw)  # type: ignore[arg-type]
    b = run_batch(folder, engine, out=remote, backend="ray", workers=1, **kw)  # type: ignore[arg-type]
    assert not ray.is_initialized(), "a local Ray started by the job must be shut down by it"
    assert (a.total, a.ok, a.errors) == (b.total, b.ok, b.errors) == (22, 21, 1)
    assert pq.read_table(remote).equals(pq.read_table(local))
    assert read_metadata(remote) == read_metadata(local)
    assert remote.read_bytes() == local.read_bytes()


def test_two_node_cluster_uses_both_nodes_and_writes_the_local_rows(engine: Engine, folder: Path,
                                                                    tmp_path: Path) -> None:
    """A real 2-node Ray cluster on this machine: actors on both nodes, the same file as the local backend."""
    from ray.cluster_utils import Cluster

    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    kw = {"labels": demo_labels(), "embeddings": True, "part_size": 6}
    run_batch(folder, engine, out=local, **kw)  # type: ignore[arg-type]
    cluster: Any = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        summary = run_batch(folder, engine, out=remote, backend="ray", ray_address=cluster.address,
                            **kw)  # type: ignore[arg-type]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(summary.execution["ray_nodes"]) == 2, "one actor per CPU: both nodes must have computed rows"
    assert remote.read_bytes() == local.read_bytes()


# ---- on one shared local Ray (the job joins it; it must leave it running) ------------------------------------

def test_ray_job_resumes_a_local_one(shared_ray: None, engine: Engine, folder: Path, tmp_path: Path) -> None:
    """Parts written by the local engine and by Ray actors mix into the same file as one local run."""
    from steadyclip.batch.runner import BatchProgress

    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    run_batch(folder, engine, labels=demo_labels(), out=ref, workers=1, part_size=4)

    def stop(p: BatchProgress) -> None:
        if p.done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(folder, engine, labels=demo_labels(), out=out, workers=1, part_size=4, progress=stop)
    summary = run_batch(folder, engine, labels=demo_labels(), out=out, backend="ray", workers=1, part_size=4)
    assert summary.resumed >= 8 and summary.backend == "ray"
    assert out.read_bytes() == ref.read_bytes()


def test_ray_text_job_equals_local_text_job_bitwise(shared_ray: None, engine: Engine, tmp_path: Path) -> None:
    """Texts on Ray actors: the local job's rows and embeddings, bit for bit; error rows never leave the driver."""
    from steadyclip.batch import run_text_batch

    texts = Engine(engine.loaded, micro_batch=4, text_micro_batch=2, text_cache=None)  # Ray batches of 8 texts
    lines = [b"", b"a red circle", b"a blue square", b"\xff\xfe not utf-8", *[f"text {i}".encode() for i in range(9)],
             " ".join(["a red circle next to a blue square"] * 12).encode(), b"   ", b"last", b"\xc3"]
    src = tmp_path / "q.txt"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    a = run_text_batch(src, texts, out=local, part_size=5)
    b = run_text_batch(src, texts, out=remote, part_size=5, backend="ray", workers=2)
    assert ray.is_initialized(), "a Ray the job joined is not the job's to stop"
    assert (b.backend, b.workers, b.inputs) == ("ray", 2, "texts")
    assert (a.total, a.ok, a.errors) == (b.total, b.ok, b.errors) == (len(lines), len(lines) - 4, 4)
    got, want = pq.read_table(remote), pq.read_table(local)
    assert got.column("status").to_pylist()[:4] == ["error", "ok", "ok", "error"]
    assert got.column("truncated").to_pylist()[13] is True
    assert got.equals(want)
    assert remote.read_bytes() == local.read_bytes()


def test_cli_texts_on_ray(shared_ray: None, demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    """`steadyclip batch --texts --engine ray --workers 1` writes the local text job's file."""
    from click.testing import CliRunner
    from test_batch import model_source

    from steadyclip.batch import run_text_batch
    from steadyclip.cli import cli

    source, pretrained = model_source(demo_arch_checkpoint)
    model = ["--model", source] + (["--pretrained", pretrained] if pretrained else [])
    src = tmp_path / "q.txt"
    src.write_text("a red circle\n\na blue square\n", encoding="utf-8")
    ref = tmp_path / "ref.parquet"
    run_text_batch(src, Engine(load(source, pretrained=pretrained), text_cache=None), out=ref)
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(cli, ["batch", str(src), "--texts", "--engine", "ray", "--workers", "1", "--out",
                                      str(out), "--json", "--no-progress", *model], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert '"backend": "ray"' in result.stdout
    assert out.read_bytes() == ref.read_bytes()


def test_actor_with_different_settings_is_refused(shared_ray: None, engine: Engine, folder: Path) -> None:
    """An actor checks its own weights and settings against the driver's before computing anything."""
    from steadyclip.batch.inputs import open_inputs
    from steadyclip.batch.ray_backend import RayPipeline

    pipeline = RayPipeline(engine, dim=64, actors=1)
    pipeline.spec["settings"]["micro_batch"] = 3  # as if a node had a different steadyclip configuration
    with pytest.raises(IntegrityError, match="micro_batch: driver 4, actor 3"):
        list(pipeline.run(iter(list(open_inputs(folder))[:2]), part_size=4))
