"""The engine's promises: batch invariance, thread invariance, the text cache, output checks."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from steadyclip.engine import Engine
from steadyclip.engine.textcache import TextCache
from steadyclip.errors import LabelError, NumericsError
from steadyclip.model.loading import load
from steadyclip.model.registry import demo_labels


def _images(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _pil(arrs: list[np.ndarray]) -> list[object]:
    from PIL import Image

    return [Image.fromarray(a) for a in arrs]


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    cache = TextCache(tmp_path_factory.mktemp("tc") / "t.db")
    return Engine(load(), text_cache=cache)


def _row_in_batches(engine: Engine, sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Embed the same target image at a random position inside batches of various sizes."""
    target = _pil(_images(1, 999, 96))[0]
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        others = _pil(_images(n - 1, int(rng.integers(1 << 30)), 96))
        pos = int(rng.integers(n))
        batch = others[:pos] + [target] + others[pos:]
        rows.append(engine.embed_images(batch)[pos])  # type: ignore[arg-type]
    return rows


def _assert_all_bitwise_equal(rows: list[np.ndarray]) -> None:
    for r in rows[1:]:
        assert r.tobytes() == rows[0].tobytes(), f"max diff {np.abs(r - rows[0]).max()}"


def test_demo_same_image_any_batch_is_bitwise_identical(demo_engine: Engine) -> None:
    rows = _row_in_batches(demo_engine, [1, 3, 8, 17])
    _assert_all_bitwise_equal(rows)
    # Whichever path the self-check chose (unpadded only if proven), its rows are the padded ones.
    fixed = Engine(demo_engine.loaded, text_cache=None, batch_invariance="fixed")
    assert fixed.provenance.batch_path == "fixed-shape"
    _assert_all_bitwise_equal([rows[0], _row_in_batches(fixed, [3])[0]])


def test_fixed_shape_path_also_invariant() -> None:
    engine = Engine(load(), text_cache=None, batch_invariance="fixed", micro_batch=4)
    assert engine.provenance.batch_path == "fixed-shape"
    _assert_all_bitwise_equal(_row_in_batches(engine, [1, 3, 8, 17], seed=1))


def test_strict_results_do_not_depend_on_caller_threads(demo_engine: Engine) -> None:
    imgs = _pil(_images(5, 3, 80))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = demo_engine.embed_images(imgs)  # type: ignore[arg-type]
        torch.set_num_threads(2)
        b = demo_engine.embed_images(imgs)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 2, "the engine must restore the caller's thread count"
    finally:
        torch.set_num_threads(before)
    assert a.tobytes() == b.tobytes()


def _assert_threads_follow_verdict(engine: Engine, requested: int) -> str:
    """The thread count an engine runs is what its self-check verdict allows; returns the verdict."""
    record = engine.execution
    verdict = record.threads_verdict
    if verdict == "thread-invariant":  # proven equal: runs what was asked
        assert (engine.threads, record.threads_requested) == (requested, None)
    elif verdict == "thread-dependent":  # refused: 1 thread, and the record says what was asked
        assert (engine.threads, record.threads_requested) == (1, requested)
    elif verdict == "not-applicable":  # not a CPU run: the device decides its own threads
        assert engine.device.type != "cpu" and engine.threads == requested
    else:
        assert verdict == "not-checked" and requested == 1 and engine.threads == 1
    assert record.threads == engine.threads
    return verdict


def test_strict_one_vs_two_engine_threads_demo() -> None:
    imgs = _pil(_images(5, 4, 80))
    one_engine, two_engine = Engine(load(), threads=1, text_cache=None), Engine(load(), threads=2, text_cache=None)
    one = one_engine.embed_images(imgs)  # type: ignore[arg-type]
    two = two_engine.embed_images(imgs)  # type: ignore[arg-type]
    assert _assert_threads_follow_verdict(one_engine, 1) == "not-checked"
    verdict = _assert_threads_follow_verdict(two_engine, 2)
    assert verdict in ("thread-invariant", "thread-dependent")  # measured on the CPU, never skipped
    assert one.tobytes() == two.tobytes()  # at 2 threads where invariant, at 1 (refused) otherwise


def test_rows_that_differ_across_threads_refuse_the_thread_count(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from steadyclip.numerics import selfcheck

    measured: list[int] = []

    def differ(fn: object, probe: object, profile: object, device: object, threads: int, baseline: int = 1) -> bool:
        measured.append(threads)
        return False

    monkeypatch.setattr(selfcheck, "rows_equal_threads", differ)
    with caplog.at_level("WARNING", logger="steadyclip"):
        engine = Engine(load(), threads=2, text_cache=None)
        assert engine.threads == 1
    record = engine.execution
    assert (record.threads, record.threads_requested, record.threads_verdict) == (1, 2, "thread-dependent")
    assert measured and set(measured) == {2}
    assert any(r.levelname == "WARNING" and "threads=2 refused" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_real_architectures_batch_and_thread_invariant(arch: str, arch_checkpoint: Callable[[str], Path]) -> None:
    loaded = load(arch, pretrained=str(arch_checkpoint(arch)))
    engine = Engine(loaded, micro_batch=4, text_cache=None)
    rows = _row_in_batches(engine, [1, 3, 9], seed=2)  # alone, a partial micro-batch of 4, two full and one more
    _assert_all_bitwise_equal(rows)
    two = Engine(loaded, micro_batch=4, threads=2, text_cache=None)
    _assert_all_bitwise_equal([rows[0], _row_in_batches(two, [3], seed=5)[0]])
    _assert_threads_follow_verdict(two, 2)  # equal either way: at 2 threads where proven, else refused to 1


def test_classification_is_sane(demo_engine: Engine) -> None:
    res = demo_engine.classify(["examples/red_circle.png"], demo_labels(), top_k=3)[0]
    assert res.label == "red circle"
    assert abs(sum(res.probs) - 1.0) <= 1e-5
    assert [p for _, p in res.top] == sorted((p for _, p in res.top), reverse=True)
    prov = res.provenance
    assert prov.weights_sha256 == demo_engine.loaded.info.weights_sha256
    assert prov.profile == "strict" and prov.precision == "fp32" and prov.template_set == "photo"
    assert prov.versions["torch"] == torch.__version__


def test_text_cache_hit_skips_text_tower(tmp_path: Path) -> None:
    labels = [f"{c} thing number {i}" for i, c in enumerate(["red", "blue", "green"] * 3)]
    cache_path = tmp_path / "tc.db"
    first = Engine(load(), text_cache=TextCache(cache_path))
    a = first.classify(["examples/red_circle.png"], labels, templates="openai-imagenet")
    assert first.text_forward_rows == len(labels) * 80
    second = Engine(load(), text_cache=TextCache(cache_path))
    b = second.classify(["examples/red_circle.png"], labels, templates="openai-imagenet")
    assert second.text_forward_rows == 0, "a cache hit must not run the text tower"
    assert a[0].probs == b[0].probs


def test_corrupted_cache_entry_is_recomputed(tmp_path: Path) -> None:
    import sqlite3

    cache_path = tmp_path / "tc.db"
    engine = Engine(load(), text_cache=TextCache(cache_path))
    labels = ["red circle", "blue square"]
    want = engine.classify(["examples/red_circle.png"], labels)[0].probs
    engine.text_cache.close()  # type: ignore[union-attr]
    with sqlite3.connect(cache_path) as db:
        db.execute("UPDATE entries SET value = zeroblob(LENGTH(value))")
    again = Engine(load(), text_cache=TextCache(cache_path))
    got = again.classify(["examples/red_circle.png"], labels)[0].probs
    assert again.text_cache.corrupt == 2  # type: ignore[union-attr]
    assert again.text_forward_rows == 2
    assert got == want


def test_bad_labels_rejected(demo_engine: Engine) -> None:
    with pytest.raises(LabelError):
        demo_engine.classify(["examples/red_circle.png"], [])
    with pytest.raises(LabelError):
        demo_engine.classify(["examples/red_circle.png"], ["a", "a"])


def test_train_mode_is_undone_before_inference(demo_engine: Engine) -> None:
    want = demo_engine.embed_images(["examples/red_circle.png"])
    demo_engine.loaded.model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = demo_engine.embed_images(["examples/red_circle.png"])
    assert any("eval" in str(w.message) for w in caught), "the user must be told train mode was undone"
    assert not demo_engine.loaded.model.training
    assert got.tobytes() == want.tobytes()


def test_model_changed_in_memory_is_refused(tmp_path: Path) -> None:
    from steadyclip.errors import IntegrityError

    engine = Engine(load(), text_cache=None)
    with torch.no_grad():
        next(engine.loaded.model.parameters()).add_(1e-3)
    with pytest.raises(IntegrityError):
        engine.embed_images(["examples/red_circle.png"])


def test_non_finite_embeddings_are_an_error() -> None:
    from steadyclip.numerics.head import normalise

    with pytest.raises(NumericsError, match="NaN"):
        normalise(np.array([[1.0, np.nan]]), "image")


def test_self_check_verdict_is_remembered_across_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    first = Engine(load(), text_cache=None)
    path = first.provenance.batch_path
    calls: list[str] = []
    from steadyclip.numerics import selfcheck

    monkeypatch.setattr(selfcheck, "rows_equal_single",
                        lambda fn, probe, profile, device: calls.append("image" if probe.ndim == 4 else "text"))
    second = Engine(load(), text_cache=None)
    assert second.provenance.batch_path == path
    assert calls == [], "a warm start must not re-run the batch self-check"
    other = Engine(load(), text_cache=None, micro_batch=5)  # another shape: checked anew
    assert other.provenance.batch_path == "fixed-shape"
    assert calls == ["image"], "only the image tower changed shape"


def test_onednn_is_an_explicit_recorded_choice() -> None:
    strict = Engine(load(), text_cache=None)
    fast_convs = Engine(load(), text_cache=None, onednn=True)
    assert strict.provenance.flags["onednn_enabled"] is False
    assert fast_convs.provenance.flags["onednn_enabled"] is True
    img = ["examples/red_circle.png"]
    assert fast_convs.classify(img, demo_labels())[0].label == strict.classify(img, demo_labels())[0].label


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["RN50"])
def test_embedding_dim_is_read_from_the_model(arch: str, arch_checkpoint: Callable[[str], Path]) -> None:
    engine = Engine(load(arch, pretrained=str(arch_checkpoint(arch))), text_cache=None)
    assert engine.embedding_dim == 1024
    assert engine.text_forward_rows == 0


def test_embedding_dim_of_demo(demo_engine: Engine) -> None:
    assert demo_engine.embedding_dim == demo_engine.embed_texts(["x"]).shape[1] == 64
