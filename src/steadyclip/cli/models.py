"""Model commands: ``info``, ``lock``, ``verify``, ``convert``.

Exit codes: 0 ok, 1 error, 3 a check ran and failed (hash, lock mismatch).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from steadyclip.cli._common import (
    EXIT_CHECK_FAILED,
    PROFILE_HELP,
    echo_json,
    handle_errors,
)

_model_argument = click.argument("model", required=False, default="steadyclip-demo")
_pretrained_option = click.option(
    "--pretrained", metavar="TAG|PATH", default=None, help="Pretrained tag or checkpoint file (for an architecture name)."
)
_torchscript_option = click.option(
    "--allow-torchscript", is_flag=True, help="Allow TorchScript archives (loading one runs its code)."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


def _render(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(doc)
        return
    for key, value in doc.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@click.command()
@_model_argument
@_pretrained_option
@_torchscript_option
@_json_option
@handle_errors
def info(model: str, pretrained: str | None, allow_torchscript: bool, as_json: bool) -> None:
    """Load MODEL (verified) and show what identifies it: hashes, config, preprocessing."""
    from steadyclip.loading import load

    loaded = load(model, pretrained=pretrained, allow_torchscript=allow_torchscript)
    _render(loaded.info.to_dict(), as_json)


@click.command()
@_model_argument
@_pretrained_option
@_torchscript_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("steadyclip.lock"),
              show_default=True, help="Lockfile to write.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Also pin the outputs of a fixed behaviour probe (recomputed by verify).")
@click.option("--profile", type=click.Choice(["strict", "fast"]), default="strict", show_default=True,
                 help=PROFILE_HELP)
@click.option("--micro-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@_json_option
@handle_errors
def lock(model: str, pretrained: str | None, allow_torchscript: bool, output: Path, probe: bool, profile: str,
         micro_batch: int, threads: int | None, as_json: bool) -> None:
    """Write a lockfile pinning MODEL: source, revision, hashes, fingerprint, config, versions, behaviour."""
    from steadyclip.loading import load
    from steadyclip.lockfile import write_lock

    loaded = load(model, pretrained=pretrained, allow_torchscript=allow_torchscript)
    extra: dict[str, Any] = {}
    if probe:
        from steadyclip.engine import Engine
        from steadyclip.probe import run_probe

        engine = Engine(loaded, profile=profile, micro_batch=micro_batch, threads=threads, text_cache=None)
        extra["probe"] = run_probe(engine)
    doc = write_lock(output, loaded.info, **extra)
    if as_json:
        echo_json({"lockfile": str(output), **doc})
    else:
        click.echo(f"wrote {output}: {loaded.info.model_id} sha256 {loaded.info.weights_sha256} "
                   f"fingerprint {loaded.info.fingerprint}" + (" + behaviour probe" if probe else ""))


@click.command()
@click.argument("model", required=False, default=None)
@_pretrained_option
@click.option("--lock", "lock_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Lockfile to verify against.")
@_torchscript_option
@_json_option
@handle_errors
def verify(model: str | None, pretrained: str | None, lock_path: Path, allow_torchscript: bool,
           as_json: bool) -> None:
    """Load the model a lockfile names (or MODEL) and check it matches the lock exactly.

    Exit 3 when anything differs, naming the field and both values.
    """
    from steadyclip.errors import IntegrityError, LockMismatchError
    from steadyclip.loading import load, source_from_lock
    from steadyclip.lockfile import read_lock

    lock_doc = read_lock(lock_path)
    src, pre = source_from_lock(lock_doc)
    if model is not None:
        src, pre = model, pretrained
    elif pretrained is not None:
        pre = pretrained
    try:
        loaded = load(src, pretrained=pre, lock=lock_path, allow_torchscript=allow_torchscript)
    except LockMismatchError as e:
        if not as_json:
            raise
        echo_json({"ok": False, "lockfile": str(lock_path), "field": e.field,
                   "expected": e.expected, "actual": e.actual, "error": str(e)})
        sys.exit(EXIT_CHECK_FAILED)
    except IntegrityError as e:
        if not as_json:
            raise
        echo_json({"ok": False, "lockfile": str(lock_path), "field": None, "error": str(e)})
        sys.exit(EXIT_CHECK_FAILED)
    doc: dict[str, Any] = {"ok": True, "lockfile": str(lock_path), "model_id": loaded.info.model_id,
                           "weights_sha256": loaded.info.weights_sha256, "fingerprint": loaded.info.fingerprint}
    report = _check_probe(loaded, lock_doc.get("probe"))
    if report is not None:
        doc["probe"] = report.to_dict()
        doc["ok"] = report.ok
    if as_json:
        echo_json(doc)
    else:
        click.echo(f"{'ok' if doc['ok'] else 'FAILED'}: {loaded.info.model_id} vs {lock_path} "
                   f"(fingerprint {loaded.info.fingerprint})")
        if report is not None:
            click.echo(report.describe())
    if not doc["ok"]:
        sys.exit(EXIT_CHECK_FAILED)


def _check_probe(loaded: Any, stored: dict[str, Any] | None) -> Any:
    """Recompute the lock's behaviour probe with the engine settings it was written with."""
    if not stored:
        return None
    from steadyclip.engine import Engine
    from steadyclip.probe import compare_probe

    stack = stored.get("stack", {})
    engine = Engine(loaded, profile=stack.get("profile", "strict"), micro_batch=int(stack.get("micro_batch", 8)),
                    threads=int(stack["threads"]) if stack.get("threads") else None, text_cache=None)
    return compare_probe(stored, engine)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .safetensors file to write.")
@_torchscript_option
@_json_option
@handle_errors
def convert(checkpoint: Path, output: Path, allow_torchscript: bool, as_json: bool) -> None:
    """Convert CHECKPOINT (.pt/.pth/.bin) to safetensors without running code from it."""
    from safetensors.torch import load_file

    from steadyclip.checkpoints import convert_to_safetensors, read_state_dict
    from steadyclip.errors import IntegrityError
    from steadyclip.integrity import sha256_file, state_fingerprint

    if output.suffix != ".safetensors":
        raise click.BadParameter("the output must end in .safetensors", param_hint="--output")
    if output.resolve() == checkpoint.resolve():
        raise click.BadParameter("the output must differ from the input", param_hint="--output")
    summary = convert_to_safetensors(checkpoint, output, allow_torchscript=allow_torchscript)
    before = state_fingerprint(read_state_dict(checkpoint, allow_torchscript=allow_torchscript))
    after = state_fingerprint(load_file(str(output)))
    if before != after:
        output.unlink(missing_ok=True)
        raise IntegrityError(f"conversion changed the tensors (fingerprint {before} -> {after}); output removed")
    summary.update(fingerprint=after, sha256=sha256_file(output))
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {output}: {summary['tensors']} tensors, sha256 {summary['sha256']}, "
                   f"fingerprint {after}")
