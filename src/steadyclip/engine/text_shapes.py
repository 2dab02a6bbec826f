"""Text shapes that follow the text: sequence-length buckets chosen by a text's own token count.

CLIP's text tower runs under a causal mask and pools the row at the end-of-text token, so the
tokens after it cannot change the pooled row in exact arithmetic: a text of 7 tokens computed at
length 8 equals, mathematically, the same text at the context length (77). Only the tensor shape
changes the bits, and the shape is decided by the text alone (the smallest bucket that holds its
end-of-text token), so a text's row is bitwise the same whatever its neighbours, batch, request,
entry point or replica - the strict promise, at a fraction of the cost.

Rows per forward: ``text_micro_batch`` (8) at every bucket, so a lone request of a few texts
pays for 8 rows. Bigger forwards run where a self-check has proven them equal: at each bucket,
forwards of 2, 4, ... times those rows (up to :data:`TOKEN_BUDGET` tokens) must give every row
bitwise equal to the 8-row forwards, measured once per model, stack and machine
(:func:`steadyclip.numerics.selfcheck.text_rows`) before any forward uses them. A text's bits are
therefore its bits at (its bucket, 8 rows) whichever forward it lands in; the larger forwards only
make busy servers faster (ViT-B-32, 1 thread, length 8: 8 rows 73-81 texts/s, 64 rows 95-99).

Buckets are used only where that argument holds: an open_clip text tower with a causal mask,
pooling at the end-of-text token (``argmax`` or ``eos``), no class token and no padding mask.
Any other tower (SigLIP's bidirectional one, a Hugging Face text model) runs at its context
length, and the scheme says so (``"full"``) in provenance: never a silent change of shape.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_BUCKETS", "TextShapes", "bucket_encoder", "text_shapes"]

# Plus the context length. Each step pads at most half a text: finer steps split a mix of short
# queries into more forwards, which costs more than the padding they save at light load (ViT-B-32,
# 16 queries of 4-7 tokens, 1 thread: 65 texts/s at (8, 16, 32), 40 with every length 4-8 a bucket).
DEFAULT_BUCKETS = (8, 12, 16, 24, 32, 48)
TOKEN_BUDGET = 512  # the largest forward at a bucket: rows x length up to this (where proven equal)

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TextShapes:
    """The sequence lengths text forwards run at, and how a text's length is read."""

    buckets: tuple[int, ...]  # ascending; the last is the context length
    rows: tuple[int, ...]  # rows per forward at each bucket
    pool: str  # "argmax" | "eos" | "full" (no buckets: every text at the context length)
    eos_id: int | None = None
    why: str = ""  # why buckets are off, when they are

    @property
    def scheme(self) -> str:
        """What provenance and cache keys record, (length x rows) per bucket: ``"buckets:8x8,12x8,16x8,24x8,32x8,48x8,77x8"``
        or ``"full:77x32"``."""
        kind = "full" if self.pool == "full" else "buckets"
        return f"{kind}:{','.join(f'{b}x{r}' for b, r in zip(self.buckets, self.rows))}"

    def rows_for(self, length: int | None) -> int:
        """Rows per forward at a bucket (``None``: the context length): the shape a text's bits follow."""
        return self.rows[-1] if length is None else self.rows[self.buckets.index(length)]

    def row_options(self, length: int | None) -> tuple[int, ...]:
        """Rows of the forwards a bucket may run where proven equal to :meth:`rows_for`: it, then doubled
        while rows x length stays within :data:`TOKEN_BUDGET` (``(rows,)`` without buckets)."""
        base = self.rows_for(length)
        if self.pool == "full":
            return (base,)
        steps, size = [base], base * 2
        while size * (length or self.buckets[-1]) <= TOKEN_BUDGET:
            steps.append(size)
            size *= 2
        return tuple(steps)

    def lengths(self, tokens: torch.Tensor) -> np.ndarray:
        """Tokens each row needs, through its end-of-text token: (N,) ints."""
        if self.pool == "full":
            return np.full(tokens.shape[0], self.buckets[-1], dtype=np.int64)
        if self.pool == "eos":
            pos = torch.eq(tokens, int(self.eos_id or 0)).to(torch.int32).argmax(dim=-1)
        else:  # argmax: the end-of-text token has the highest id in the row
            pos = tokens.argmax(dim=-1)
        out: np.ndarray = pos.cpu().numpy().astype(np.int64) + 1
        return out

    def bucket_of(self, tokens: torch.Tensor) -> np.ndarray:
        """The bucket (sequence length) each row runs at: (N,) ints."""
        need = self.lengths(tokens)
        edges = np.asarray(self.buckets)
        out: np.ndarray = edges[np.searchsorted(edges, need, side="left").clip(max=len(edges) - 1)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "pool": self.pool, **({"why": self.why} if self.why else {})}


def _text_parts(model: Any) -> tuple[Any, str | None]:
    """The module holding the text tower's parts (the model itself for CLIP, ``model.text`` for
    CustomTextCLIP), or ``None`` and why buckets cannot apply."""
    holder = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if holder is None or not all(hasattr(holder, n) for n in needed):
        return None, "the text tower is not open_clip's own transformer (e.g. a Hugging Face model)"
    if getattr(holder, "cls_emb", None) is not None:
        return None, "the text tower appends a class token"
    if getattr(holder, "use_pad_mask", False):
        return None, "the text tower uses a padding mask"
    mask = holder.attn_mask
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None, "the text tower has no causal mask (bidirectional attention sees the padding)"
    n = mask.shape[0]
    causal = torch.full((n, n), float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    if not torch.equal(mask, causal):
        return None, "the text tower's attention mask is not causal"
    return holder, None


def text_shapes(model: Any, context_length: int, buckets: tuple[int, ...] | str = "auto", rows: int = 8) -> TextShapes:
    """The text shapes for ``model``: ``"auto"`` buckets where the causal-pooling argument holds,
    ``"full"`` (context length only), or explicit bucket lengths; ``rows`` per forward at every bucket."""
    if buckets == "full":
        return TextShapes((context_length,), (rows,), "full", why="text buckets turned off (text_buckets='full')")
    holder, why = _text_parts(model)
    pool = (getattr(model, "text_pool_type", None) or getattr(holder, "pool_type", None)) if holder is not None else None
    if holder is not None and pool not in ("argmax", "eos"):
        holder, why = None, f"the text tower pools with {pool!r}, not at the end-of-text token"
    if holder is None:
        return TextShapes((context_length,), (rows,), "full", why=why or "")
    chosen: tuple[int, ...] = DEFAULT_BUCKETS if isinstance(buckets, str) else tuple(buckets)
    edges = tuple(sorted({b for b in chosen if 2 <= b < context_length} | {context_length}))
    eos = getattr(model, "text_eos_id", None) if holder is model else getattr(holder, "eos_id", None)
    return TextShapes(edges, tuple(rows for _ in edges), str(pool), eos_id=eos)


def bucket_encoder(model: Any, shapes: TextShapes) -> Forward | None:
    """``encode_text`` for token rows shorter than the context length (``None`` when buckets are off).

    The same modules in the same order as open_clip's ``encode_text``; only the positional
    embedding and the causal mask are cut to the rows' length.
    """
    if shapes.pool == "full":
        return None
    holder, _ = _text_parts(model)
    if holder is None:
        return None
    from open_clip.transformer import text_global_pool

    def encode(text: torch.Tensor) -> torch.Tensor:  # (N, L) -> (N, D)
        n = text.shape[1]
        cast = holder.transformer.get_cast_dtype()
        x = holder.token_embedding(text).to(cast) + holder.positional_embedding[:n].to(cast)  # (N, L, W)
        x = holder.ln_final(holder.transformer(x, attn_mask=holder.attn_mask[:n, :n]))
        pooled: torch.Tensor = text_global_pool(x, text, shapes.pool, eos_token_id=shapes.eos_id)  # (N, W)
        proj = holder.text_projection
        if proj is None:
            return pooled
        out: torch.Tensor = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return out

    return encode
