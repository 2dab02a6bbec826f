"""Per-call recording for the script observer: wraps the open_clip model classes' encode/forward methods.

Loaded by ``observer`` (by file path) once the script has imported open_clip, so
torch is importable here. What is recorded, and why each field exists, is listed
in ``observer``'s docstring; the fixes applied before a call are the ones named
in the observer's ``fixes``.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from steadyclip.doctor._script_child.observer import Observer

_MAX_DATA = 1 << 16  # outputs up to this many values travel whole (the parent computes probabilities from them)
_LIST = 20


def active_layers(model: torch.nn.Module) -> tuple[int, list[dict[str, Any]]]:
    """(modules in train mode, layers that behave randomly or batch-dependently right now).

    The same families as ``steadyclip.doctor.checks_mode.find_stochastic_layers``;
    repeated here because this process must not import steadyclip.
    """
    training, out = 0, []
    for name, m in model.named_modules():
        training += bool(m.training)
        t = type(m).__name__
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if m.training or not m.track_running_stats or m.running_mean is None:
                out.append({"path": name, "type": t, "kind": "batch_statistics", "p": None})
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            kind, p = "dropout", float(m.p)
        elif "DropPath" in t or "StochasticDepth" in t:
            kind, p = "drop_path", float(getattr(m, "drop_prob", None) or getattr(m, "p", 0.0) or 0.0)
        elif t == "PatchDropout":
            kind, p = "patch_dropout", float(getattr(m, "prob", 0.0))
        elif isinstance(m, torch.nn.MultiheadAttention):
            kind, p = "attention_dropout", float(m.dropout)
        else:
            continue
        if m.training and p > 0:
            out.append({"path": name, "type": t, "kind": kind, "p": p})
    return training, out


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap identity of every parameter and buffer: name, shape, first values and float64 sum."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(flat[:16].to("cpu", torch.float64).numpy().tobytes())
            if t.is_floating_point() and flat.numel():
                h.update(repr(float(flat.sum(dtype=torch.float64))).encode())
    return h.hexdigest()[:32]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (list, tuple)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    return []


def describe_output(out: Any) -> list[dict[str, Any]]:
    """Shape, digest, finiteness, and the values: whole, or the first rows when large (enough to measure a fix)."""
    rows = []
    for t in _tensors(out):
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        part = arr
        if arr.size > _MAX_DATA and arr.ndim >= 1 and arr.shape[0] > 1:
            per_row = max(1, arr.size // arr.shape[0])
            part = arr[: max(1, _MAX_DATA // per_row)]
        rows.append({
            "shape": list(arr.shape),
            "digest": hashlib.sha256(arr.tobytes()).hexdigest()[:32],
            "finite": bool(torch.isfinite(t.detach()).all()) if t.is_floating_point() else True,
            "data": base64.b64encode(part.tobytes()).decode("ascii") if part.size <= _MAX_DATA else None,
            "rows_sent": int(part.shape[0]) if part.ndim >= 1 else None,
        })
    return rows


def nonfinite_weights(model: torch.nn.Module) -> dict[str, Any]:
    """Which parameters/buffers hold NaN or Inf (asked only after an output was non-finite)."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return {"count": len(bad), "names": bad[:_LIST], "tensors": len(model.state_dict())}


def flags() -> dict[str, Any]:
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "threads": torch.get_num_threads(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "grad_enabled": torch.is_grad_enabled(),
    }


def autocast_state() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dev in ("cpu", "cuda"):
        on = torch.is_autocast_enabled(dev)
        out[dev] = str(torch.get_autocast_dtype(dev)).removeprefix("torch.") if on else None
    return out


def _strict_flags() -> None:
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _pin(obs: Observer, model: torch.nn.Module, k: int) -> str:
    """The same state dict before the first call of every run: saved by the first run, loaded by the others."""
    assert obs.pin_dir is not None, "pin_weights needs STEADYCLIP_DOCTOR_PIN_DIR"
    path = os.path.join(obs.pin_dir, f"model{k}.pt")
    obs.depth("pin", 1)
    try:
        if os.path.exists(path):
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
            return "loaded"
        torch.save(model.state_dict(), path + ".partial")
        os.replace(path + ".partial", path)
        return "saved"
    finally:
        obs.depth("pin", -1)


def _apply_fixes(obs: Observer, model: torch.nn.Module, k: int) -> dict[str, Any]:
    done: dict[str, Any] = {}
    if "pin_weights" in obs.fixes and k not in obs.pinned:
        obs.pinned.add(k)
        # created from the seeded RNG and never loaded into: the same weights already, nothing to save
        done["pin_weights"] = "seeded" if k in obs.seeded and k not in obs.loaded else _pin(obs, model, k)
    if "eval" in obs.fixes and model.training:
        model.eval()
        done["eval"] = True
    if "strict_flags" in obs.fixes:
        _strict_flags()
    return done


def _record(obs: Observer, model: torch.nn.Module, kind: str) -> dict[str, Any]:
    training, layers = active_layers(model)
    p = next(iter(model.parameters()), None)
    scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    rec: dict[str, Any] = {
        "model": obs.index(model), "kind": kind, "where": obs.where(), "training": bool(model.training),
        "modules_training": training, "layers": layers[:_LIST], "layer_count": len(layers),
        "autocast": autocast_state(), "flags": flags(), "weights": weights_digest(model),
        "device": p.device.type if p is not None else "cpu",
        "dtype": str(p.dtype).removeprefix("torch.") if p is not None else None,
        "logit_scale": float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else None,
        "logit_bias": float(bias.detach().double()) if isinstance(bias, torch.Tensor) else None,  # SigLIP
    }
    if kind in ("encode_image", "forward"):
        rec["transforms_used"] = dict(obs.used)
        obs.used.clear()
    if kind in ("encode_text", "forward"):
        rec["texts"] = obs.texts
    return rec


def _wrap_call(fn: Callable[..., Any], kind: str, obs: Observer) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if obs.depth("call", 1) > 1:  # forward calls encode_*: only the user's own call is recorded
            try:
                return fn(self, *args, **kwargs)
            finally:
                obs.depth("call", -1)
        try:
            k = obs.index(self)
            rec = _record(obs, self, kind)  # as the user's code left it, before any fix
            rec["fixes_applied"] = _apply_fixes(obs, self, k)
            if rec["fixes_applied"].get("pin_weights") == "loaded":
                rec["weights_pinned"] = weights_digest(self)
            with _no_autocast() if "no_autocast" in obs.fixes else contextlib.nullcontext():
                out = fn(self, *args, **kwargs)
            obs.seq += 1
            outputs = describe_output(out)
            if not all(o["finite"] for o in outputs):
                rec["nonfinite_weights"] = nonfinite_weights(self)
            obs.emit("call", seq=obs.seq, outputs=outputs, **rec)
            return out
        finally:
            obs.depth("call", -1)

    return wrapper


def patch_model_classes(obs: Observer, wrap_load_state_dict: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wrap encode_image / encode_text / forward / load_state_dict of every open_clip model class."""
    import open_clip

    classes: list[type] = [open_clip.model.CLIP, open_clip.model.CustomTextCLIP]
    coca = getattr(open_clip, "CoCa", None)
    if isinstance(coca, type):
        classes.append(coca)
    for cls in classes:
        for name in ("encode_image", "encode_text", "forward"):
            if name in cls.__dict__:
                setattr(cls, name, _wrap_call(cls.__dict__[name], name, obs))
        cls.load_state_dict = wrap_load_state_dict(cls.load_state_dict)  # type: ignore[attr-defined]
