"""Texts at the size of the text: sequence-length buckets that keep strict's promise."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from steadyclip import Engine, load
from steadyclip.engine.text_shapes import text_shapes
from steadyclip.model.loading import LoadedModel

# Short queries and prompts, one long enough for the context length's bucket on the demo model (16).
TEXTS = ["red circle", "a photo of a blue square", "x", "a small green star drawn on a white page today",
         "two birds", "a diagram of a dog and a cat and a circle and a square and a star", "sunset", "a cat"]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load()


def _engine(loaded: LoadedModel, **kw: object) -> Engine:
    return Engine(loaded, text_cache=None, replicas=1, **kw)  # type: ignore[arg-type]


def test_the_demo_model_runs_texts_in_buckets_and_provenance_says_so(demo: LoadedModel) -> None:
    engine = _engine(demo)
    shapes = engine.text_shapes
    assert shapes.buckets == (8, 12, 16) and shapes.pool == "argmax"
    assert engine.provenance.text_buckets == "buckets:8x8,12x8,16x8"  # length x rows
    lengths = shapes.lengths(demo.tokenizer(TEXTS))
    assert lengths[0] == 4 and lengths[2] == 3  # start, 2 words, end; start, "x", end
    assert _engine(demo, text_buckets="full").provenance.text_buckets == "full:16x8"


def test_buckets_equal_the_full_length_rows_to_float_tolerance(demo: LoadedModel) -> None:
    bucketed = _engine(demo).embed_texts(TEXTS)
    full = _engine(demo, text_buckets="full", text_micro_batch=32).embed_texts(TEXTS)
    assert bucketed.shape == full.shape
    assert float(np.abs(bucketed - full).max()) <= 1e-5
    assert float((bucketed * full).sum(-1).min()) >= 0.99999


@pytest.mark.slow
def test_a_real_architecture_in_buckets_matches_its_full_length_rows(arch_checkpoint: Callable[[str], Path]) -> None:
    loaded = load("ViT-B-32", pretrained=str(arch_checkpoint("ViT-B-32")))
    engine = _engine(loaded)
    assert engine.provenance.text_buckets == "buckets:8x8,12x8,16x8,24x8,32x8,48x8,77x8"
    texts = [*TEXTS, "word " * 40]  # the last one needs the 77-token bucket
    bucketed = engine.embed_texts(texts)
    full = _engine(loaded, text_buckets="full").embed_texts(texts)
    assert float(np.abs(bucketed - full).max()) <= 1e-5
    assert np.array_equal(bucketed[-1], full[-1])  # the context-length bucket is the full shape itself


def test_a_texts_row_is_bitwise_the_same_whatever_its_neighbours_and_batch(demo: LoadedModel) -> None:
    engine = _engine(demo)
    alone = np.stack([engine.embed_texts([t])[0] for t in TEXTS])  # (8, D): one text per call
    together = engine.embed_texts(TEXTS)
    shuffled = engine.embed_texts(TEXTS[::-1] * 3)[: len(TEXTS)][::-1]  # other neighbours, 24 rows
    assert alone.tobytes() == together.tobytes() == np.ascontiguousarray(shuffled).tobytes()
    wide = _engine(demo, text_micro_batch=8).embed_texts(TEXTS * 5)  # several micro-batches per bucket
    assert wide[: len(TEXTS)].tobytes() == together.tobytes()


def test_replicas_and_the_servers_submit_path_give_the_same_bits(demo: LoadedModel) -> None:
    one = _engine(demo).embed_texts(TEXTS * 3)
    with Engine(demo, text_cache=None, replicas=2) as two:
        assert two.replicas == 2
        spread = two.embed_texts(TEXTS * 3)  # more than one micro-batch: computed in the replicas
        submitted = two.submit_texts(TEXTS[:3]).result(120)  # even a small request goes to the replicas
        assert two.replica_pids()
    assert spread.tobytes() == one.tobytes()
    assert submitted.tobytes() == one[:3].tobytes()


def test_a_tower_that_is_not_causal_runs_at_the_context_length_and_says_why(demo: LoadedModel) -> None:
    model: Any = copy.deepcopy(demo.model)
    model.attn_mask = None  # as SigLIP's bidirectional text tower: padding would change the row
    shapes = text_shapes(model, 16)
    assert shapes.scheme == "full:16x8" and "causal" in shapes.why
    last: Any = copy.deepcopy(demo.model)
    last.text_pool_type = "last"  # pooled at the last position: trimming the padding would move it
    assert "pools with 'last'" in text_shapes(last, 16).why
    assert text_shapes(demo.model, 16, buckets=(4, 12)).buckets == (4, 12, 16)


def test_the_class_embedding_cache_key_names_the_bucket_scheme(demo: LoadedModel, tmp_path: Path) -> None:
    from steadyclip.engine.prompts import get_template_set
    from steadyclip.engine.textcache import TextCache

    cache = TextCache(tmp_path / "t.db")
    tset = get_template_set("photo")
    bucketed = Engine(demo, text_cache=cache, replicas=1)
    full = Engine(demo, text_cache=cache, replicas=1, text_buckets="full")
    bucketed.class_embeddings(["red circle"], tset)
    full.class_embeddings(["red circle"], tset)
    assert bucketed.text_forward_rows > 0 and full.text_forward_rows > 0  # no hit across schemes


def test_bad_text_bucket_settings_are_typed_errors(demo: LoadedModel) -> None:
    from steadyclip.errors import InputError

    for bad in ("some", (1,), (), (8, True)):
        with pytest.raises(InputError, match="text_buckets"):
            _engine(demo, text_buckets=bad)


def test_larger_text_forwards_run_only_where_proven_to_give_the_same_bits(demo: LoadedModel) -> None:
    engine = _engine(demo)
    core = engine._core
    assert core.text_shapes.row_options(8) == (8, 16, 32, 64)  # up to 512 tokens per forward
    assert core.text_shapes.row_options(16) == (8, 16, 32)  # the demo's context length: 16 tokens
    assert core.chunks("text", 8, 5) == [8]  # a small request pays for the base rows, checks nothing
    proven = core.text_sizes(8)
    assert proven[0] == 8 and set(proven) <= {8, 16, 32, 64}
    many = [f"cat {i}" for i in range(40)]  # 4 tokens each, bucket 8: forwards larger than 8 rows where proven
    together = engine.embed_texts(many)
    alone = np.concatenate([engine.embed_texts(many[s : s + 8]) for s in range(0, 40, 8)])
    assert together.tobytes() == alone.tobytes()


def test_a_row_count_whose_bits_differ_is_never_used() -> None:
    import torch

    from steadyclip.numerics import selfcheck
    from steadyclip.numerics.profiles import get_profile

    def batch_dependent(x: torch.Tensor) -> torch.Tensor:  # a kernel whose rows change with the rows per forward
        return x.float() + (1e-3 if x.shape[0] > 16 else 0.0)

    probe = torch.arange(64 * 4).reshape(64, 4)
    sizes = selfcheck.text_rows(batch_dependent, probe, (8, 16, 32, 64), get_profile("strict"), "cpu", "basis", 1)
    assert sizes == (8, 16)
    assert selfcheck.text_rows(batch_dependent, probe, (8, 16, 32, 64), get_profile("strict"), "cpu", "basis",
                               1) == (8, 16)  # remembered: measured once per weights and stack
    assert selfcheck.text_rows(lambda x: x.float() * 2, probe, (8, 16, 32, 64), get_profile("strict"), "cpu",
                               "other weights", 1) == (8, 16, 32, 64)


def test_the_plan_fills_proven_forwards_and_pads_at_most_one(demo: LoadedModel) -> None:
    core = _engine(demo)._core
    core._text_sizes[8] = (8, 16, 32, 64)
    assert core.chunks("text", 8, 40) == [32, 8]
    assert core.chunks("text", 8, 12) == [16]  # 4 padded rows, one forward
    assert core.chunks("text", 8, 200) == [64, 64, 64, 8]
    assert core.chunks("text", 8, 64, spread=2) == [32, 32]  # one forward per replica
    assert core.chunks("text", 8, 20, spread=2) == [8, 8, 8]
    core._text_sizes[12] = (8,)  # nothing proven: base-row forwards only
    assert core.chunks("text", 12, 20) == [8, 8, 8]
