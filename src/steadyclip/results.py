"""Result types: frozen dataclasses that carry their provenance."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Provenance:
    """Everything needed to say which computation produced a result.

    ``batch_path`` is ``"fixed-shape"`` when every forward ran at exactly
    ``micro_batch`` rows (tail padded), or ``"verified-invariant"`` when a
    start-up self-check proved single-row forwards bitwise equal to batched ones.
    """

    model_id: str
    arch: str
    weights_sha256: str
    fingerprint: str
    profile: str
    precision: str
    deterministic: bool
    device: str
    threads: int
    micro_batch: int
    batch_path: str
    text_micro_batch: int
    text_batch_path: str
    # the text sequence-length buckets (steadyclip.engine.text_shapes): "buckets:8,16,32,77" or "full:77"
    text_buckets: str = "full"
    flags: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    template_set: str | None = None
    template_sha256: str | None = None
    # fast only (steadyclip.engine.precision / steadyclip.numerics.drift): cast dtypes, the CPU's bf16 support and any
    # explicit opt-in to emulated bf16, measured drift vs strict, and the thread-count verdict.
    reduced_precision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for humans: model, weights and profile."""
        return (
            f"model={self.model_id} weights={self.weights_sha256[:12]} fingerprint={self.fingerprint[:12]} "
            f"profile={self.profile} precision={self.precision} device={self.device} threads={self.threads} "
            f"batch={self.micro_batch}/{self.batch_path}" + self._drift_summary()
        )

    def _drift_summary(self) -> str:
        drift = (self.reduced_precision or {}).get("drift_vs_strict")
        if not drift:
            return ""
        return (f" drift_vs_strict=min_cos {drift['min_cosine']:.6f}/max_dp {drift['max_abs_prob']:.3g}/"
                f"top1 {drift['top1_agreement']:.3f}")


@dataclass(frozen=True)
class Classification:
    """Zero-shot result for one image: probabilities over all labels, in label order."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    top: tuple[tuple[str, float], ...]
    provenance: Provenance
    source: str | None = None

    @property
    def label(self) -> str:
        """The top-1 label."""
        return self.top[0][0]

    def to_dict(self, *, with_provenance: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "source": self.source,
            "top": [{"label": lab, "prob": p} for lab, p in self.top],
            "probs": dict(zip(self.labels, self.probs)),
        }
        if with_provenance:
            doc["provenance"] = self.provenance.to_dict()
        return doc


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be used (unreadable, corrupt, too large): the row says why."""

    index: int
    source: str | None
    error_type: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "error": {"type": self.error_type, "message": self.message}}


@dataclass(frozen=True)
class ClassifyReport:
    """``Engine.classify(..., on_error="row")``: one row per input, results and failures in input order."""

    rows: tuple[Classification | ImageFailure, ...]
    provenance: Provenance

    @property
    def errors(self) -> int:
        return sum(isinstance(r, ImageFailure) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document the CLI prints and the server answers (same keys, same order of rows)."""
        rows = [r.to_dict() if isinstance(r, ImageFailure) else r.to_dict(with_provenance=False) for r in self.rows]
        return {"results": rows, "provenance": self.provenance.to_dict(), "errors": self.errors}


@dataclass(frozen=True)
class EmbedReport:
    """``Engine.embed_images(..., on_error="row")``: per input an embedding (D,) float32, or a failure."""

    rows: tuple[Any, ...]  # np.ndarray | ImageFailure, in input order
    provenance: Provenance

    @property
    def errors(self) -> int:
        return sum(isinstance(r, ImageFailure) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        rows = [r.to_dict() if isinstance(r, ImageFailure) else {"embedding": r.tolist()} for r in self.rows]
        return {"images": rows, "provenance": self.provenance.to_dict(), "errors": self.errors}
