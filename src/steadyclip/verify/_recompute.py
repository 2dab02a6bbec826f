"""Recompute chosen rows of a result: the model it names, its settings, batched through the engine.

Images are read, hashed and decoded exactly as a batch job does (:func:`steadyclip.batch._prep.prepare`)
(or, an OpenAI answer's, from the request's bytes as the server decoded them), then embedded together
at the recorded micro-batch shape: N rows cost about N forwards. The weights need not be the recorded
ones: other weights are a difference the report shows (rows ``mismatch``), not an error.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steadyclip.batch._prep import Prepared, pixel_batch, prepare
from steadyclip.batch.inputs import InputItem
from steadyclip.engine import Engine
from steadyclip.engine.outcome import decode_input
from steadyclip.engine.prompts import get_template_set
from steadyclip.engine.settings import EngineSettings
from steadyclip.errors import ModelSourceError, ResultFileError, SteadyClipError
from steadyclip.model.loading import LoadedModel, load, source_from_lock
from steadyclip.verify._compare import Missing, Recomputed
from steadyclip.verify._source import ResultFile, StoredRow

_logger = logging.getLogger(__name__)

__all__ = ["build_engine", "recompute"]


def _load(result: ResultFile, model: str | None, pretrained: str | None) -> LoadedModel:
    if model is not None:
        src, pre = model, pretrained
    else:
        src, pre = source_from_lock({"model": result.model})
        pre = pretrained if pretrained is not None else pre
    try:
        loaded = load(src, pretrained=pre)
    except SteadyClipError as e:
        raise ModelSourceError(f"cannot load the model {result.path.name} was made with ({src!r}, pretrained "
                               f"{pre!r}): {e}. If its file moved, point at it with --model/--pretrained") from e
    want = result.provenance["weights_sha256"]
    if loaded.info.weights_sha256 != want:  # reported (a fact that differs, rows mismatch), not refused
        _logger.warning("the weights loaded from %r have SHA-256 %s..., but %s was made with %s...", src,
                        loaded.info.weights_sha256[:16], result.path.name, str(want)[:16])
    return loaded


def _settings(result: ResultFile) -> EngineSettings:
    if result.settings is not None:
        try:
            settings = EngineSettings.from_dict(dict(result.settings))
        except SteadyClipError as e:
            raise ResultFileError(f"{result.path} records engine settings this version cannot read: {e}") from e
    else:  # batch files written before the settings were recorded: rebuild them from the provenance
        prov = result.provenance
        scheme = str(prov.get("text_buckets", "full"))
        settings = EngineSettings(profile=prov["profile"], micro_batch=int(prov["micro_batch"]),
                                  text_micro_batch=int(prov["text_micro_batch"]),
                                  text_buckets="full" if scheme.startswith("full") else "auto")
    return settings.replace(replicas=1)  # layout is speed only; one process for a sample


def build_engine(result: ResultFile, model: str | None = None, pretrained: str | None = None) -> Engine:
    """The engine a result was made with: its model (hash checked), profile and shapes; no text cache."""
    return Engine(_load(result, model, pretrained), _settings(result), text_cache=None)


def _location(row: StoredRow, result: ResultFile, images_root: str | os.PathLike[str] | None) -> Path:
    """Where to read a row's input now: as recorded, or under ``images_root`` when the files moved."""
    path = Path(row.source)
    if images_root is None:
        return path
    root = Path(images_root)
    if result.input_root is not None:  # a folder job: the same place relative to the folder it listed
        for base in (Path(result.input_root), Path(result.input_root).absolute()):
            try:
                return root / path.relative_to(base)
            except ValueError:
                continue
    return root / path.name if path.is_absolute() else root / path


def recompute(engine: Engine, result: ResultFile, rows: Sequence[StoredRow], *,
              images_root: str | os.PathLike[str] | None = None,
              given: Mapping[int, str | bytes | Missing] | None = None) -> list[Recomputed | Missing | None]:
    """One :class:`Recomputed` per row (``None`` or :class:`Missing`: its input is missing), images embedded together.

    ``given`` holds, per row index, inputs the result file does not point at (an OpenAI answer's
    request: a text, an image's bytes, or why there is none).
    """
    given = given or {}
    out: list[Recomputed | Missing | None] = [None] * len(rows)
    pixels: list[np.ndarray] = []
    waiting: list[tuple[int, str | None]] = []
    texts: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        payload = given.get(row.index)
        if isinstance(payload, Missing):
            out[i] = payload
        elif row.kind == "text":
            texts.append((i, payload if isinstance(payload, str) else row.source))
        else:
            prepared = _prepare(engine, result, row, payload, images_root)
            if prepared is None:
                continue  # input_missing
            outcome, px = prepared
            if px is None:
                out[i] = Recomputed(outcome.sha256, outcome.error_type)
            else:
                waiting.append((i, outcome.sha256))
                pixels.append(px)
    if pixels:
        emb = engine.embed_pixels(pixel_batch(pixels))  # (N, D), at the recorded micro-batch shape
        for (i, sha), done in zip(waiting, _finish(engine, result, emb)):
            out[i] = Recomputed(sha, None, **done)
    if texts:
        temb = engine.embed_texts([t for _, t in texts])
        for (i, text), e in zip(texts, temb):
            out[i] = Recomputed(hashlib.sha256(text.encode("utf-8")).hexdigest(), None, numbers={"embedding": e})
    return out


def _prepare(engine: Engine, result: ResultFile, row: StoredRow, payload: str | bytes | None,
             images_root: str | os.PathLike[str] | None) -> Prepared | None:
    """An image row's outcome and pixels, from the bytes given or its file; ``None`` when the file is gone."""
    if isinstance(payload, bytes):
        outcome, px = decode_input(row.index, payload, engine.loaded.preprocess, source=row.source,
                                   name=row.source, sha256=True, unexpected="row")
        return outcome, None if px is None else px.numpy()
    loc = _location(row, result, images_root)
    if row.sha256 is not None and not loc.exists():
        return None
    return prepare(InputItem(row.index, row.source, str(loc)), engine.loaded.preprocess)


def _finish(engine: Engine, result: ResultFile, emb: np.ndarray) -> list[dict[str, Any]]:
    """Per embedded row, the numbers a result of this kind stores (classification where it has labels)."""
    if not result.labels:
        return [{"numbers": {"embedding": e}} for e in emb]
    tset = get_template_set(result.templates if result.templates is not None else engine.loaded.default_templates)
    want = result.provenance.get("template_sha256")
    if want is not None and tset.sha256 != want:
        raise ResultFileError(f"the template set {tset.name!r} has SHA-256 {tset.sha256[:12]} now, but "
                              f"{result.path.name} was made with {str(want)[:12]}; the templates changed")
    labels = list(result.labels)
    classes = engine.class_embeddings(labels, tset)
    ranked = engine.classify_embeddings(emb, classes, labels, tset, top_k=result.top_k)
    return [{"top_labels": tuple(lab for lab, _ in c.top), "probs_by_label": dict(zip(c.labels, c.probs)),
             "numbers": {"probs": np.asarray(c.probs, dtype=np.float64), "embedding": e}}
            for c, e in zip(ranked, emb)]
