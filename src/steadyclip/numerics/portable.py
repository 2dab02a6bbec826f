"""The portable profile's numerics: the same bits on every x86-64 CPU with AVX.

What decides a CPU forward's bits besides the input, and how portable pins each:

- **GEMMs** (linear layers, attention products, convolutions). MKL picks a kernel per CPU
  (FMA or not, vector width, blocking), and ignores its reproducibility branches on AMD CPUs
  except the slow SSE2 one (measured: docs/portable.md). Portable runs every GEMM through
  OpenBLAS (numpy's bundled copy) pinned to one kernel table, ``SandyBridge``: AVX, no FMA,
  fixed blocking; it runs on every x86-64 CPU with AVX, and its threads split rows and
  columns, never the sum. Convolutions are an unfold and such a GEMM.
- **ATen's own kernels** (layer norm, softmax, GELU, adds): compiled once per CPU capability
  and dispatched at run time; ``ATEN_CPU_CAPABILITY=default`` pins the baseline build.
- **oneDNN**: off (its kernels are chosen per ISA); attention runs as its math (two GEMMs
  and a softmax), never a fused kernel.

The environment half must be set before torch and numpy load
(:data:`steadyclip.numerics.early.PORTABLE_ENV`); :func:`check_ready` proves it took.
:class:`PortableOps` is the run-time half: a dispatch mode that routes each GEMM-family op to
the pinned GEMM and refuses any op whose kernel it does not know to be portable, so no row is
ever labelled portable that is not.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steadyclip.errors import PortableSetupError
from steadyclip.numerics.early import (
    PORTABLE_CORETYPE,
    PORTABLE_ENV,
    portable_env_problems,
)

__all__ = ["PortableOps", "PortableSetupError", "blas_facts", "check_ready", "is_ready", "set_blas_threads"]




def _how_to_fix() -> str:
    env = " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
    return (f"start the process with `{env}` in its environment (before Python imports torch or numpy), "
            "or use the steadyclip CLI/server/batch, which arrange it themselves")


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_facts() -> dict[str, Any]:
    """The BLAS numpy loaded: its library, version, kernel table (``architecture``) and threads."""
    libs = [lib for lib in _controller().info() if lib.get("user_api") == "blas"]
    return {"libraries": [{k: lib.get(k) for k in ("internal_api", "prefix", "version", "architecture")}
                          for lib in libs]}


_READY: list[bool] = []


def check_ready() -> None:
    """Raise :class:`PortableSetupError` unless this process runs the pinned kernels.

    Checks the facts, not the variables: torch's dispatched CPU capability and the kernel table
    numpy's OpenBLAS actually chose (a user's own environment, a numpy built on MKL or an old
    OpenBLAS are all caught here).
    """
    if _READY:
        return
    problems = portable_env_problems()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        problems.append(f"torch dispatches its CPU kernels for {capability}, not the baseline build")
    libs = blas_facts()["libraries"]
    tables = {str(lib.get("architecture")) for lib in libs if lib.get("internal_api") == "openblas"}
    if {t.lower() for t in tables} != {PORTABLE_CORETYPE.lower()}:
        found = ", ".join(f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')})"
                          for lib in libs) or "none"
        problems.append(f"numpy's BLAS must be OpenBLAS on its {PORTABLE_CORETYPE} kernels; found: {found}")
    if problems:
        raise PortableSetupError("the portable profile cannot run in this process: " + "; ".join(problems)
                                 + f". To fix: {_how_to_fix()}")
    _READY.append(True)  # what a process loaded stays loaded


def is_ready() -> bool:
    """Can this process compute portable rows itself (:func:`check_ready` would pass)?"""
    try:
        check_ready()
    except PortableSetupError:
        return False
    return True


def set_blas_threads(threads: int) -> int:
    """Pin OpenBLAS's thread count; returns the previous one (threads split rows, never the sum)."""
    libs = _controller().select(internal_api="openblas")
    before = max((lib["num_threads"] for lib in libs.info()), default=1)
    libs.limit(limits=threads)
    return int(before)


# ---- the pinned GEMM -------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise PortableSetupError(f"the portable profile computes fp32 on the CPU only; got a {t.dtype} "
                                 f"tensor on {t.device}")
    transposed = t.dim() == 2 and t.t().is_contiguous()  # a weight's .t(): BLAS takes it as is
    if not (t.is_contiguous() or transposed):
        t = t.contiguous()
    return t.detach().numpy()


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.matmul(_np(a), _np(b))))


def _scaled(out: torch.Tensor, alpha: Any) -> torch.Tensor:
    return out if alpha == 1 else out.mul_(alpha)


def _plus(base: torch.Tensor, out: torch.Tensor, beta: Any) -> torch.Tensor:
    if beta == 0:
        return out
    return out.add_(base if beta == 1 else base * beta)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _matmul(a, b)


def _addmm(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    return _plus(base, _scaled(_matmul(a, b), alpha), beta)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = _matmul(x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out.add_(bias)


def _convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                 padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
                 groups: int) -> torch.Tensor:
    """A 2-D convolution as an unfold (a copy) and one pinned GEMM per group."""
    if transposed or x.dim() != 4:
        raise PortableSetupError(f"the portable profile has no portable kernel for a "
                                 f"{'transposed ' if transposed else ''}{x.dim() - 2}-D convolution yet; "
                                 "use the strict profile for this model")
    n, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(n, c, h * w)
    else:
        cols = torch.nn.functional.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                                          stride=tuple(stride))
    cols = cols.reshape(n, groups, (c // groups) * kh * kw, ho * wo)  # (N, G, Cg*kh*kw, L)
    w2 = weight.reshape(groups, out_c // groups, -1)  # (G, Cout/G, Cg*kh*kw)
    out = _matmul(w2.unsqueeze(0), cols).reshape(n, out_c, ho, wo)
    return out if bias is None else out.add_(bias.reshape(1, -1, 1, 1))


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
            padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    if isinstance(padding, str):
        if padding != "valid":
            raise PortableSetupError(f"the portable profile has no portable kernel for padding={padding!r} "
                                     "convolutions yet; use the strict profile for this model")
        padding = 0
    return _convolution(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """Attention as its math: softmax(q k^T * scale + mask) v, both products on the pinned GEMM."""
    if dropout_p or enable_gqa:
        raise PortableSetupError(f"attention with dropout_p={dropout_p}, enable_gqa={enable_gqa} cannot be "
                                 "portable (dropout is training-time randomness); put the model in eval mode")
    scores = _matmul(q, k.transpose(-2, -1)).mul_(1.0 / q.shape[-1] ** 0.5 if scale is None else scale)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril_()
        scores.masked_fill_(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores.add_(attn_mask)
    return _matmul(torch.softmax(scores, dim=-1), v)


_HANDLERS: dict[str, Callable[..., torch.Tensor]] = {
    "mm": _mm, "bmm": _mm, "matmul": _mm, "addmm": _addmm, "baddbmm": _addmm, "linear": _linear,
    "convolution": _convolution, "conv2d": _conv2d, "scaled_dot_product_attention": _attention,
}
# Ops whose CPU kernels call MKL or oneDNN, or fuse GEMMs, which the pinned GEMM does not cover.
_REFUSED = frozenset({
    "addmv", "mv", "dot", "vdot", "addr", "addbmm", "cdist", "_cdist_forward", "_int_mm", "_convolution",
    "_slow_conv2d_forward", "slow_conv3d", "slow_conv_transpose2d", "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_fused_attention_overrideable",
})
_REFUSED_PREFIXES = ("mkldnn", "_mkldnn", "linalg", "_linalg", "cudnn", "miopen", "fbgemm", "quantized", "_weight_int")


@functools.cache
def _composite(func: Any) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"))


def _refused(name: str) -> bool:
    return name in _REFUSED or name.startswith(_REFUSED_PREFIXES)


class PortableOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Inside: every GEMM-family op runs on the pinned OpenBLAS kernels; an op with a CPU-specific
    kernel raises :class:`PortableSetupError` naming it. Enter with ``with PortableOps():``."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(*args, **kwargs)
        if _refused(name):
            raise PortableSetupError(f"the portable profile has no portable kernel for torch op {name!r} "
                                     "(its CPU kernel depends on the CPU); use the strict profile for this model")
        if _composite(func):
            with self:  # its parts come back through this mode (an einsum's GEMM is a GEMM)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)
