"""``diagnose``: run the user's model the way their code does, then change one thing at a time.

The order matters: the as-is runs come first (they may overwrite BatchNorm
statistics, which is itself a finding), then the model is restored to its
snapshot before every measurement in eval mode, and restored once more - and
verified by fingerprint - before returning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadyclip.doctor import (
    checks_machine,
    checks_mode,
    checks_numerics,
    checks_preprocess,
    checks_weights,
)
from steadyclip.doctor.context import Context
from steadyclip.doctor.harness import (
    amp_autocast,
    amp_dtype,
    fp32_view,
    max_abs_diff,
    model_device,
    model_float_dtype,
    prepare_inputs,
    probs_of,
    spread,
    stack_pixels,
)
from steadyclip.doctor.result import (
    Cause,
    Diagnosis,
    Findings,
    Run,
    rank_causes,
    verdict_of,
)
from steadyclip.doctor.state import ModelSnapshot, changed_tensors
from steadyclip.errors import InputError
from steadyclip.model import integrity
from steadyclip.numerics import determinism, identity

_logger = logging.getLogger(__name__)

__all__ = ["diagnose"]

_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _resolve_amp(amp: bool | str | torch.dtype | None, device_type: str) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype the user's code runs under, and whether it is already active around this call."""
    if amp is None:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type), True
        return None, False
    if amp is False:
        return None, False
    if amp is True:
        return amp_dtype(device_type), False
    if isinstance(amp, torch.dtype):
        return amp, False
    if isinstance(amp, str) and amp.lower() in _AMP_NAMES:
        return _AMP_NAMES[amp.lower()], False
    raise InputError(f"amp={amp!r}: use None (detect), False, True, 'bf16' or 'fp16'")


def environment(model: torch.nn.Module, flags: dict[str, Any], amp_in_use: torch.dtype | None) -> dict[str, Any]:
    """Versions, threads, MKL_CBWR and device: what a result on this machine depends on."""
    return {
        "versions": identity.software_stack(),
        "platform": platform.platform(),
        "device": str(model_device(model)),
        "cuda_available": torch.cuda.is_available(),
        "threads": flags["threads"],
        "MKL_CBWR": flags["env"]["MKL_CBWR"],
        "weights_dtype": str(model_float_dtype(model)).removeprefix("torch."),
        "autocast_in_use": str(amp_in_use).removeprefix("torch.") if amp_in_use is not None else None,
        "flags": flags,
    }


def diagnose(
    model: torch.nn.Module | None = None,
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Callable[..., torch.Tensor] | None = None,
    images: Sequence[Any] | torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
    *,
    loader: Callable[[], object] | None = None,
    runs: int = 5,
    templates: str | Sequence[str] | None = None,
    amp: bool | str | torch.dtype | None = None,
    expected_preprocess: Mapping[str, Any] | None = None,
    weights_file: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    expected_sha256: str | None = None,
    image_names: Sequence[str] | None = None,
) -> Diagnosis:
    """Find out why an open_clip model gives different results from run to run.

    The model is run ``runs`` times exactly as it is (train mode, autocast, flags
    and all), then every suspected cause is switched off one at a time and the
    change in probabilities measured. The model object, the global torch flags,
    the thread count and the RNG state are restored afterwards (verified by a
    state fingerprint).

    Args:
        model: the user's open_clip model, in whatever state their code left it.
            May be omitted when ``loader`` is given (the first load is diagnosed).
        preprocess: the image transform the user's code uses (default: the
            model's own eval transform, from ``model.visual.preprocess_cfg``).
        tokenizer: the tokenizer (default: open_clip's CLIP tokenizer at the
            model's context length).
        images: a few image paths / PIL images, or a preprocessed (N, 3, H, W) tensor.
        labels: the labels to classify against (at least two).
        loader: zero-argument callable that builds the model the way the user's
            code does (``lambda: open_clip.create_model_and_transforms(...)``);
            called 2-3 times to test whether loading gives the same weights.
        runs: repetitions as-is and after the fixes.
        templates: prompt templates (default ``"a photo of a {}."``).
        amp: whether the user's code runs under autocast: None detects an
            autocast active around this call; ``"bf16"``/``"fp16"``/True say so.
        expected_preprocess: the preprocess config the model was trained with
            (default: ``model.visual.preprocess_cfg``).
        weights_file: the checkpoint the loader reads (hashed per load).
        lock: a steadyclip lockfile (path or dict) the weights must match.
        expected_sha256: the weights file's known SHA-256.
        image_names: how to call each image in reports (default: file names).
    Returns:
        A :class:`Diagnosis`; ``.verdict`` is ``"stable"`` or ``"unstable"``.
    Raises:
        InputError: missing or bad images/labels/arguments.
        IntegrityError: an unreadable lockfile, or the model could not be restored.

    Example:
        >>> model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained="...")
        >>> d = steadyclip.diagnose(model, preprocess, images=["cat.jpg"], labels=["a cat", "a dog"])
        >>> d.verdict, d.top.id if d.top else None
        ('unstable', 'stochastic_layers')
    """
    if model is None and loader is None:
        raise InputError("give the model to diagnose, or a loader=... that builds it the way your code does")
    if images is None or labels is None:
        raise InputError("give images=[...] (a few paths or PIL images) and labels=[...] to classify against")
    _check_arguments(images, runs, image_names)
    if expected_sha256 is not None:
        expected_sha256 = integrity.parse_sha256(expected_sha256)
    t0 = time.perf_counter()
    wfile = Path(weights_file).expanduser() if weights_file is not None else None
    with determinism.restoring() as saved:  # the caller's flags, threads and RNG, as they were
        d = _diagnose(model, preprocess, tokenizer, images, labels, loader, runs, templates, amp,
                      dict(expected_preprocess) if expected_preprocess is not None else None,
                      wfile, lock, expected_sha256, saved.settings["threads"], t0)
    if image_names is not None:
        d = dataclasses.replace(d, images=tuple(str(n) for n in image_names))
    return d


def _check_arguments(images: Sequence[Any] | torch.Tensor, runs: int, image_names: Sequence[str] | None) -> None:
    if not isinstance(runs, int) or runs < 1:
        raise InputError(f"runs must be a positive integer, got {runs!r}")
    if image_names is not None:
        count = images.shape[0] if isinstance(images, torch.Tensor) else (
            len(images) if isinstance(images, Sequence) and not isinstance(images, (str, bytes)) else 1)
        if len(image_names) != count:
            raise InputError(f"image_names has {len(image_names)} name(s) for {count} image(s); give one per image")


def _diagnose(
    model: torch.nn.Module | None, preprocess: Callable[[Any], torch.Tensor] | None,
    tokenizer: Callable[..., torch.Tensor] | None, images: Sequence[Any] | torch.Tensor, labels: Sequence[str],
    loader: Callable[[], object] | None, runs: int, templates: str | Sequence[str] | None,
    amp: bool | str | torch.dtype | None, expected: dict[str, Any] | None, wfile: Path | None,
    lock: str | os.PathLike[str] | Mapping[str, Any] | None, expected_sha256: str | None,
    threads: int, t0: float,
) -> Diagnosis:
    first = None
    if loader is not None:
        first = checks_weights.call_loader(loader, seed=checks_weights.SEED_A, weights_file=wfile)
        if model is None:
            model = first.model
            preprocess = preprocess if preprocess is not None else first.preprocess
    assert model is not None
    if not (callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None))):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        hint = " (it wraps one: pass model.module / model._orig_mod)" if inner is not None else ""
        raise InputError(f"{type(model).__name__} is not an open_clip model with encode_image/encode_text{hint}")
    device_type = model_device(model).type
    amp_in_use, amp_ambient = _resolve_amp(amp, device_type)
    flags = determinism.current_flags(device_type)
    env = environment(model, flags, amp_in_use)
    inputs = prepare_inputs(model, images, labels, preprocess=preprocess, tokenizer=tokenizer,
                            templates=templates, expected=expected)
    snap = ModelSnapshot.take(model)
    try:
        ctx = Context(model, fp32_view(model), inputs, device_type, threads, runs, snap, amp_in_use, flags)
        diag = _measure(ctx, loader, first, wfile, lock, expected_sha256, amp_ambient, expected)
    finally:
        restored = snap.restore(model)
    env.update({"model_restored": True, "tensors_restored": len(restored),
                "seconds": round(time.perf_counter() - t0, 3)})
    return Diagnosis(diag.verdict, diag.causes, diag.runs, env, diag.checks, diag.labels, diag.images)


def _measure(
    ctx: Context, loader: Callable[[], object] | None, first: checks_weights.Loaded | None, wfile: Path | None,
    lock: str | os.PathLike[str] | Mapping[str, Any] | None, expected_sha256: str | None, amp_ambient: bool,
    expected: dict[str, Any] | None,
) -> Diagnosis:
    findings = Findings()
    model, inputs, n = ctx.model, ctx.inputs, ctx.runs
    layers = checks_mode.find_stochastic_layers(model)
    repeats = checks_preprocess.random_pixels(ctx, 2)
    random_pre = any(px.shape != inputs.pixels_user.shape or not torch.equal(px, inputs.pixels_user)
                     for px in repeats)
    weight_cause, second = _check_loads(ctx, findings, loader, first, wfile)  # 2. the same weights on every load?
    as_is, errors = _as_is_runs(ctx, loader, second, weight_cause, random_pre, amp_ambient)
    del second

    # -- 3. did those runs change the model?
    changed = changed_tensors(model, ctx.snapshot)
    p_mut = ctx.eval_probs(model=fp32_view(model)) if changed else None
    ctx.restore_weights()
    try:
        baseline = ctx.compute_baseline()
    except Exception as e:
        raise InputError(
            f"the model fails on these inputs even in eval mode ({type(e).__name__}: {e}); check that the "
            f"preprocess gives the size the model expects ({list(inputs.pixels_user.shape[1:])} given)"
        ) from e
    mut_effect = max_abs_diff(p_mut, baseline) if p_mut is not None else None

    # -- 1. train mode, isolated from autocast / preprocessing / reloads where those are in play too
    training = bool(checks_mode.training_modules(model))
    clean_as_is = (ctx.amp_in_use is None and model_float_dtype(model) == torch.float32 and not random_pre
                   and weight_cause is None)
    train_runs, train_error = _train_runs(ctx, as_is, errors, training=training, clean_as_is=clean_as_is)

    # -- 9. preprocessing; decides which pixels the fixed runs use
    fix_pre = checks_preprocess.check_preprocess(ctx, findings, expected=expected, repeats=repeats)
    fixed_px = inputs.pixels_expected if (fix_pre and inputs.pixels_expected is not None) else inputs.pixels_user
    fixed = [ctx.eval_probs(pixels=fixed_px) for _ in range(n)]

    composition = None
    if any(lay.kind == "batch_statistics" and lay.active for lay in layers) and training:
        composition = checks_mode.batch_composition_effect(ctx)
        if ctx.fp32 is not model:
            ctx.fp32 = fp32_view(model)
    checks_mode.check_train_mode(findings, model=model, layers=layers, train_runs=train_runs, baseline=baseline,
                                 error=train_error if training else None, labels=inputs.labels,
                                 eval_spread=spread(fixed), composition=composition)
    bn_training = [lay.path for lay in layers if lay.kind == "batch_statistics" and lay.active]
    checks_mode.check_buffers_mutated(findings, changed=changed, effect=mut_effect, runs=n,
                                      batchnorm_training=bn_training)
    _differs_from_loader(findings, ctx)
    checks_weights.check_corrupted(findings, fingerprint=ctx.snapshot.fingerprint, weights_file=wfile, lock=lock,
                                   expected_sha256=expected_sha256)
    if lock is not None and not any(c.id == "weights_corrupted" for c in findings.causes):
        checks_machine.check_cross_machine(findings, lock)
    _numerics_checks(ctx, findings, as_is, fixed)

    causes = rank_causes(findings.causes)
    run_records = tuple(
        Run(i, None if as_is[i] is None else _rows(as_is[i]), _rows(fixed[i]), errors[i]) for i in range(n))
    return Diagnosis(verdict_of(causes), causes, run_records, {}, tuple(findings.checks), tuple(inputs.labels),
                     tuple(inputs.names))


def _check_loads(
    ctx: Context, findings: Findings, loader: Callable[[], object] | None, first: checks_weights.Loaded | None,
    wfile: Path | None,
) -> tuple[str | None, checks_weights.Loaded | None]:
    """``random_init`` / ``weights_changed`` from a second load; returns the cause found and that load."""
    if loader is None or first is None:
        findings.skipped("random_init", "no loader given: pass loader=... to test whether loading is repeatable")
        findings.skipped("weights_changed", "no loader given")
        return None, None
    second = checks_weights.call_loader(loader, seed=checks_weights.SEED_B, weights_file=wfile)

    def effect(x: checks_weights.Loaded, y: checks_weights.Loaded) -> float:
        return max_abs_diff(ctx.eval_probs(model=fp32_view(x.model)), ctx.eval_probs(model=fp32_view(y.model)))

    weight_cause = checks_weights.compare_loads(
        findings, a=first, b=second, effect=effect, weights_file=wfile,
        reload=lambda seed: checks_weights.call_loader(loader, seed=seed, weights_file=wfile))
    if first.model is not ctx.model and weight_cause is None and first.fingerprint != ctx.snapshot.fingerprint:
        ctx.notes["differs_from_loader"] = checks_weights.differing(ctx.model, first.model)[0]
    return weight_cause, second


def _as_is_runs(
    ctx: Context, loader: Callable[[], object] | None, second: checks_weights.Loaded | None,
    weight_cause: str | None, random_pre: bool, amp_ambient: bool,
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """The user's runs, as their code does them: probabilities (None where the forward failed) and errors."""
    inputs = ctx.inputs
    as_is: list[np.ndarray | None] = []
    errors: list[str | None] = []
    amp_ctx = (lambda: contextlib.nullcontext()) if (amp_ambient or ctx.amp_in_use is None) else (
        lambda: amp_autocast(ctx.device_type, ctx.amp_in_use))
    for i in range(ctx.runs):
        m_i = ctx.model
        if weight_cause is not None and loader is not None and i > 0:  # their code loads again each run
            m_i = second.model if (i == 1 and second is not None) else checks_weights.unpack_loaded(loader())[0]
        px = inputs.pixels_user
        if random_pre and i > 0 and inputs.user_preprocess is not None and inputs.pils is not None:
            px = stack_pixels(inputs.user_preprocess, inputs.pils)
        try:
            with amp_ctx():
                as_is.append(probs_of(m_i, px, inputs))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - the user's model failing as-is is a finding, not a crash
            as_is.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    return as_is, errors


def _train_runs(
    ctx: Context, as_is: list[np.ndarray | None], errors: list[str | None], *, training: bool, clean_as_is: bool,
) -> tuple[list[np.ndarray], str | None]:
    """Train-mode probabilities with nothing else changed: the as-is runs when they are exactly that."""
    train_error = next((e for e in errors if e is not None), None)
    if not training or clean_as_is:
        return ([p for p in as_is if p is not None] if training else []), train_error
    train_runs: list[np.ndarray] = []
    # one strict block for all runs: it seeds the RNG once on entry, so dropout masks still differ per run
    with ctx.strict():
        for _ in range(ctx.runs):
            try:
                train_runs.append(probs_of(ctx.fp32, ctx.inputs.pixels_user, ctx.inputs))
            except Exception as e:  # noqa: BLE001 - same: recorded as evidence of train_mode
                train_error = f"{type(e).__name__}: {e}"
                break
    ctx.restore_weights()
    if ctx.fp32 is not ctx.model:  # a float32 copy ran in train mode: take a clean one again
        ctx.fp32 = fp32_view(ctx.model)
    return train_runs, train_error


def _numerics_checks(ctx: Context, findings: Findings, as_is: list[np.ndarray | None],
                     fixed: list[np.ndarray]) -> None:
    """Checks 4-8: precision, flags, batch, threads, device, and non-finite weights or outputs."""
    precision_outputs = checks_numerics.check_precision(ctx, findings)
    checks_numerics.check_flags(ctx, findings)
    checks_numerics.check_batch(ctx, findings)
    checks_numerics.check_threads(ctx, findings)
    checks_numerics.check_device(ctx, findings)
    params = {name for name, _ in ctx.model.named_parameters(remove_duplicate=False)}
    checks_weights.check_non_finite(findings, state=ctx.snapshot.tensors, params=params, outputs={
        "as_is": [p for p in as_is if p is not None], "eval": fixed, "autocast": precision_outputs})


def _differs_from_loader(findings: Findings, ctx: Context) -> None:
    names = ctx.notes.get("differs_from_loader")
    if not names:
        return
    stats = [n for n in names if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    findings.add(Cause(
        "weights_changed", None, "info",
        f"the model you passed differs from what loader() builds in {len(names)} tensor(s)"
        + (" - BatchNorm statistics: earlier train-mode forwards overwrote them" if stats and len(stats) == len(names)
           else " (fine-tuned or modified after loading?)"),
        {"differing_tensors": len(names), "names": names[:20]},
        checks_weights.FIX_WEIGHTS_CHANGED,
    ))


def _rows(p: np.ndarray | None) -> tuple[tuple[float, ...], ...]:
    assert p is not None
    return tuple(tuple(float(x) for x in row) for row in p)
