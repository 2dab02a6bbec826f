"""Load a model you can trust: verified bytes, strictly applied, locked in inference state.

``load`` resolves a source (``steadyclip.model.sources``), checks the weights' SHA-256
before reading them, builds the architecture with open_clip *without* weights,
applies the tensors itself (``steadyclip.model.checkpoints``: safe formats only, every
key accounted for), then puts the model in eval mode with gradients off and
records fingerprints so later tampering is caught.

Example:
    >>> import steadyclip
    >>> m = steadyclip.load()                                   # the bundled demo model
    >>> m = steadyclip.load("ViT-B-32", pretrained="/ckpt/vit_b_32.safetensors")
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch

from steadyclip.errors import (
    DeviceError,
    InferenceStateError,
    InputError,
    IntegrityError,
    LockMismatchError,
    ModelSourceError,
    NumericsError,
    WeightsError,
)
from steadyclip.model import (
    _fastinit,
    checkpoints,
    integrity,
    lockfile,
    registry,
    sources,
)
from steadyclip.model.info import ModelInfo, PreprocessConfig
from steadyclip.numerics import determinism
from steadyclip.numerics.environment import device_kind

_logger = logging.getLogger(__name__)

__all__ = ["Guard", "LoadedModel", "ModelInfo", "PreprocessConfig", "load", "quiet_random_init_warning",
           "source_from_lock"]

Guard = Literal["warn", "raise"]


class LoadedModel:
    """An open_clip model in inference state, with its preprocessing, tokenizer and identity.

    Attributes:
        model: the open_clip model (eval mode, ``requires_grad`` False).
        preprocess: open_clip's eval transform (PIL image -> tensor).
        tokenizer: open_clip tokenizer (list[str] -> LongTensor).
        info: the ``ModelInfo``.
        guard: what ``ensure_inference_state`` does on train mode: "warn" (restore) or "raise".
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor],
        info: ModelInfo,
        *,
        guard: Guard = "warn",
        tensor_digests: Mapping[str, str] | None = None,
    ) -> None:
        if guard not in ("warn", "raise"):
            raise InputError(f"guard must be 'warn' or 'raise', got {guard!r}; 'warn' restores eval mode, 'raise' refuses")
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.guard: Guard = guard
        self._digests = dict(tensor_digests) if tensor_digests is not None else None
        self.locked_probe: dict[str, Any] | None = None  # the probe section of the lock it was loaded with
        self._lock_in_inference_state()
        self._buffers_fp = integrity.buffers_fingerprint(model)

    def __repr__(self) -> str:
        return f"LoadedModel({self.info.model_id!r}, fingerprint={self.info.fingerprint[:12]})"

    @property
    def default_templates(self) -> str:
        """The prompt template set to classify with when none is given: the model's spec's, else "photo"."""
        return registry.default_templates(self.info.model_id)

    def _lock_in_inference_state(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def ensure_inference_state(self) -> None:
        """Make sure no module is in train mode and no parameter wants gradients.

        Called by the engine before every forward. With ``guard="warn"`` a drifted
        model is put back in eval mode with a warning; with ``guard="raise"`` it
        is an error.

        Raises:
            InferenceStateError: something left inference state and guard is "raise".
        """
        if not any(m.training for m in self.model.modules()) and not any(
                p.requires_grad for p in self.model.parameters()):
            return  # the usual case, without building every module's name
        training = [name or "<root>" for name, m in self.model.named_modules() if m.training]
        grads = [name for name, p in self.model.named_parameters() if p.requires_grad]
        what = []
        if training:
            what.append(f"{len(training)} module(s) in train mode ({checkpoints.format_keys(training, 5)})")
        if grads:
            what.append(f"{len(grads)} parameter(s) with requires_grad=True")
        msg = (f"model {self.info.model_id!r} left inference state: " + "; ".join(what) +
               ". Something called .train() or enabled gradients; dropout/BatchNorm would change results.")
        if self.guard == "raise":
            raise InferenceStateError(msg + " Call .eval() or load with guard='warn' to restore automatically.")
        warnings.warn(msg + " Restored eval mode.", RuntimeWarning, stacklevel=2)
        _logger.warning("%s Restored eval mode.", msg)
        self._lock_in_inference_state()

    def check_buffers(self) -> None:
        """Cheap tamper check (all buffers, sampled parameters, in-place writes); run before each call.

        Raises:
            IntegrityError: weights or buffers (e.g. BatchNorm statistics) changed since load.
        """
        actual = integrity.buffers_fingerprint(self.model)
        if actual != self._buffers_fp:
            raise IntegrityError(
                f"model {self.info.model_id!r} changed in memory since it was loaded (buffers fingerprint "
                f"expected {self._buffers_fp[:16]}, actual {actual[:16]}): weights were modified or a forward "
                "ran in train mode and updated BatchNorm statistics. Load the model again."
            )

    def verify_full(self) -> None:
        """Recompute the full state fingerprint (costs a pass over all weights).

        Raises:
            IntegrityError: the state differs from what was loaded.
        """
        state = self.model.state_dict()
        digests = integrity.tensor_digests(state)
        actual = integrity.fingerprint_from_digests(state, digests)
        if actual != self.info.fingerprint:
            changed = ""
            if self._digests is not None:
                names = sorted(n for n in digests.keys() | self._digests.keys()
                               if digests.get(n) != self._digests.get(n))
                changed = f" Changed tensors: {checkpoints.format_keys(names, 5)}."
            raise IntegrityError(
                f"model {self.info.model_id!r} state fingerprint expected {self.info.fingerprint}, actual {actual}: "
                f"its weights changed since load.{changed} Load the model again."
            )


def load(
    source: str | None = "steadyclip-demo",
    *,
    pretrained: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
    allow_partial: bool = False,
    allow_torchscript: bool = False,
    guard: Guard = "warn",
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    strict: bool | None = None,
) -> LoadedModel:
    """Load a verified model in inference state; never a random or silently wrong one.

    Args:
        source: "steadyclip-demo" (default), an open_clip architecture name,
            "hf-hub:ORG/REPO[@REVISION]" or "local-dir:PATH".
        pretrained: for an architecture name: a pretrained tag or a checkpoint path.
        lock: a lockfile; the loaded model must match it exactly (hub revision is pinned from it).
        allow_partial: allow missing keys (they keep their initial values; logged). The one switch
            for a partial load: unexpected keys and shape mismatches are errors either way.
        allow_torchscript: allow TorchScript archives (loading one runs its code).
        guard: "warn" restores eval mode if something switches to train; "raise" refuses.
        cache_dir: download cache for open_clip / hub sources.
        device: "cpu", "cuda" or "cuda:N": the devices ``Engine`` runs on (its determinism
            profiles are defined for those only). Anything else, "mps" included, is a
            ``DeviceError`` here rather than a model no engine would accept; never a fallback.
        strict: deprecated inverse of ``allow_partial`` (a ``DeprecationWarning``);
            ``strict=False`` still means ``allow_partial=True``.
    Returns:
        A ``LoadedModel``.
    Raises:
        ModelSourceError, WeightsError, UnsafeCheckpointError, IntegrityError, LockMismatchError,
        NumericsError, DeviceError, InputError.

    Example:
        >>> m = load("ViT-B-32", pretrained="vit_b_32.safetensors", lock="steadyclip.lock")
    """
    t0 = time.perf_counter()
    _check_device(device)
    partial = _partial_allowed(strict, allow_partial)
    resolved, lock_doc = _resolve(source, pretrained, lock, cache_dir)
    model = _build(resolved, allow_torchscript=allow_torchscript, allow_partial=partial)
    if device != "cpu":
        model.to(device)
    loaded = _lock_in(model, resolved, guard)
    if lock_doc is not None:
        lockfile.compare_lock(lock_doc, loaded.info)
        loaded.locked_probe = lock_doc.get("probe")
    _logger.info("loaded %s (sha256 %s, fingerprint %s) in %.2fs", loaded.info.model_id,
                 loaded.info.weights_sha256[:12], loaded.info.fingerprint[:12], time.perf_counter() - t0)
    return loaded


def _partial_allowed(strict: bool | None, allow_partial: bool) -> bool:
    """``allow_partial``, the one switch; ``strict`` is its deprecated inverse."""
    if strict is None:
        return allow_partial
    if strict and allow_partial:
        raise InputError("strict=True contradicts allow_partial=True; drop strict (deprecated) and keep allow_partial")
    warnings.warn(f"load(strict={strict}) is deprecated: loads are strict unless allow_partial=True; "
                  f"pass allow_partial={not strict} instead", DeprecationWarning, stacklevel=3)
    return not strict


def _resolve(
    source: str | None, pretrained: str | os.PathLike[str] | None, lock: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[sources.ResolvedSource, dict[str, Any] | None]:
    """The verified weights for ``source``; with a lock, pinned to its revision and hash (and the lock)."""
    if lock is None:
        return sources.resolve(source, pretrained, cache_dir=cache_dir), None
    lock_doc = lockfile.read_lock(lock)
    locked = lock_doc["model"]
    resolved = sources.resolve(source, pretrained, revision=locked.get("revision"), cache_dir=cache_dir,
                               expected_sha256=locked.get("weights_sha256"))
    if locked.get("weights_sha256") and locked["weights_sha256"] != resolved.weights_sha256:
        # Before a single tensor is read: the file is not the one the lock pins.
        raise LockMismatchError(
            f"lock mismatch in weights_sha256: {resolved.weights_file} has SHA-256 {resolved.weights_sha256}, "
            f"the lock {os.fspath(lock)} expects {locked['weights_sha256']}. Use the file the lock was made "
            "from, or re-create the lock with `steadyclip lock`.",
            field="weights_sha256", expected=locked["weights_sha256"], actual=resolved.weights_sha256,
        )
    return resolved, lock_doc


def _build(resolved: sources.ResolvedSource, *, allow_torchscript: bool, allow_partial: bool) -> torch.nn.Module:
    """The architecture built without weights, then the verified tensors applied, checked and eval'd (on CPU)."""
    import open_clip

    # Building initialises weights: keep the caller's RNG untouched, and drop open_clip's
    # "initialized randomly" warning, which is false here (the weights are applied below). A full
    # load overwrites every parameter, so their random fills are skipped (_fastinit); a partial
    # load builds normally, so its missing keys keep real initial values.
    skip: contextlib.AbstractContextManager[list[torch.nn.Parameter]] = (
        contextlib.nullcontext([]) if allow_partial else _fastinit.skip_parameter_init())
    with torch.random.fork_rng(devices=[]), quiet_random_init_warning(), skip as skipped:
        model: torch.nn.Module = open_clip.create_model(
            resolved.create_name,
            pretrained=None,
            load_weights=False,
            force_quick_gelu=resolved.quick_gelu,
            force_preprocess_cfg=resolved.preprocess_overrides or None,
            pretrained_image=False,
            pretrained_text=False,
            device="cpu",
        )
    # Copies and checks are memory-bound passes over every tensor: one thread streams them at
    # memory speed, while a thread team pays a fork/join per tensor (30x slower on small VMs).
    with determinism.thread_count(1):
        state = checkpoints.read_state_dict(resolved.weights_file, allow_torchscript=allow_torchscript)
        state = checkpoints.normalize_state_dict(model, state)
        checkpoints.apply_state_dict(model, state, allow_partial=allow_partial, source=str(resolved.weights_file))
        unset = _fastinit.not_loaded(model, skipped, state.keys())
        if unset:  # a parameter outside the state dict would hold uninitialised memory: never run that
            raise WeightsError(f"parameters {checkpoints.format_keys(unset)} of {resolved.model_id!r} are not in "
                               "its state dict, so the checkpoint cannot give them values; report this model")
        del state
        _check_finite(model, resolved.model_id)
    return model.eval()


def _lock_in(model: torch.nn.Module, resolved: sources.ResolvedSource, guard: Guard) -> LoadedModel:
    """The built model with its tokenizer, eval transform and identity, locked in inference state."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    final_state = model.state_dict()
    digests = integrity.tensor_digests(final_state)
    tokenizer = _get_tokenizer(resolved)
    visual: Any = model.get_submodule("visual")  # open_clip's towers are untyped
    pp_cfg = dict(visual.preprocess_cfg)
    info = ModelInfo(
        model_id=resolved.model_id,
        arch=resolved.arch,
        source=resolved.kind,
        pretrained=resolved.pretrained,
        revision=resolved.revision,
        weights_files=(str(resolved.weights_file),),
        weights_sha256=resolved.weights_sha256,
        fingerprint=integrity.fingerprint_from_digests(final_state, digests),
        config_hash=sources.config_hash(resolved.model_cfg),
        preprocess=PreprocessConfig.from_open_clip(pp_cfg),
        tokenizer=_describe_tokenizer(tokenizer),
        context_length=int(getattr(tokenizer, "context_length", 0) or 0),
    )
    preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    return LoadedModel(model, preprocess, tokenizer, info, guard=guard, tensor_digests=digests)


def _get_tokenizer(resolved: sources.ResolvedSource) -> Any:
    """open_clip's tokenizer for the model; a missing package or an unreachable HF tokenizer is a ModelSourceError."""
    import open_clip

    hf_name = resolved.model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    what = f"tokenizer {hf_name!r} of {resolved.model_id!r}" if hf_name else f"tokenizer of {resolved.model_id!r}"
    try:
        return open_clip.get_tokenizer(resolved.tokenizer_name)
    except ImportError as e:  # open_clip's HFTokenizer (SigLIP, ...) imports transformers on first use
        package = (e.name or "transformers").split(".")[0]
        raise ModelSourceError(
            f"the {what} is a Hugging Face tokenizer and needs the {package!r} package, which is not importable "
            f"({e}); install it (`pip install {package}`) and load again") from e
    except OSError as e:  # transformers/huggingface_hub: offline and not cached, or no such tokenizer
        raise ModelSourceError(
            f"could not load the {what}: {type(e).__name__}: {e}. Hugging Face tokenizers come from the hub: load "
            "once while online so it lands in the Hugging Face cache (HF_HOME), then it also loads offline") from e


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning for the block.

    For building an architecture whose weights are applied right after, where the warning is
    false; every other log record passes. (open_clip logs it on the root logger.)
    """
    f = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def source_from_lock(lock_doc: dict[str, Any]) -> tuple[str, str | None]:
    """The (source, pretrained) arguments for ``load`` that reproduce a locked model."""
    model = lock_doc["model"]
    kind = model.get("source")
    if kind in ("tag", "file"):
        return str(model["arch"]), model.get("pretrained")
    return str(model["model_id"]), None


def _check_device(device: str) -> None:
    """Only what ``Engine`` runs on (``numerics_env.device_kind``: CPU, CUDA), and only if it is here."""
    kind, _ = device_kind(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for but CUDA is not available; pass device='cpu' explicitly")


def _is_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    # A sum is NaN/Inf iff an element is (float32 accumulation cannot overflow for real weights;
    # if it ever does, the exact per-element check below decides). ~10x cheaper than isfinite().all().
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def _check_finite(model: torch.nn.Module, model_id: str) -> None:
    bad = [n for n, t in model.state_dict().items() if not _is_finite(t)]
    if bad:
        raise NumericsError(
            f"weights of {model_id!r} contain NaN/Inf in {checkpoints.format_keys(bad)}; the checkpoint is broken"
        )


def _describe_tokenizer(tokenizer: object) -> str:
    name = type(tokenizer).__name__
    hf = getattr(tokenizer, "tokenizer", None)
    hf_name = getattr(hf, "name_or_path", None)
    return f"{name}:{hf_name}" if hf_name else name
