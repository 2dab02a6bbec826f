"""Model commands: ``info``, ``lock``, ``convert``, and ``verify --lock`` (called by :mod:`.verify`).

Exit codes: 0 ok, 1 error, 3 a check ran and failed (hash, lock mismatch).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from steadyclip.cli._common import (
    EXIT_CHECK_FAILED,
    echo_json,
    handle_errors,
    json_option,
    model_argument,
    pretrained_option,
    settings_options,
    torchscript_option,
)

if TYPE_CHECKING:
    from steadyclip.engine.settings import EngineSettings


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
@model_argument
@pretrained_option
@torchscript_option
@json_option
@handle_errors
def info(model: str, pretrained: str | None, allow_torchscript: bool, as_json: bool) -> None:
    """Load MODEL (verified) and show what identifies it: hashes, config, preprocessing."""
    from steadyclip.model.loading import load

    loaded = load(model, pretrained=pretrained, allow_torchscript=allow_torchscript)
    _render(loaded.info.to_dict() | {"default_templates": loaded.default_templates}, as_json)


@click.command()
@model_argument
@pretrained_option
@torchscript_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("steadyclip.lock"),
              show_default=True, help="Lockfile to write.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Also pin the outputs of a fixed behaviour probe (recomputed by verify).")
@settings_options(replicas=False)
@json_option
@handle_errors
def lock(model: str, pretrained: str | None, allow_torchscript: bool, output: Path, probe: bool,
         settings: EngineSettings, as_json: bool) -> None:
    """Write a lockfile pinning MODEL: source, revision, hashes, fingerprint, config, versions, behaviour."""
    from steadyclip.model.loading import load
    from steadyclip.model.lockfile import write_lock

    loaded = load(model, pretrained=pretrained, allow_torchscript=allow_torchscript)
    extra: dict[str, Any] = {}
    if probe:
        from steadyclip.engine import Engine
        from steadyclip.engine.probe import run_probe

        engine = Engine(loaded, settings, text_cache=None)
        extra["probe"] = run_probe(engine)
    doc = write_lock(output, loaded.info, **extra)
    if as_json:
        echo_json({"lockfile": str(output), **doc})
    else:
        click.echo(f"wrote {output}: {loaded.info.model_id} sha256 {loaded.info.weights_sha256} "
                   f"fingerprint {loaded.info.fingerprint}" + (" + behaviour probe" if probe else ""))


def verify_lock(model: str | None, pretrained: str | None, lock_path: Path, allow_torchscript: bool,
                as_json: bool) -> None:
    """Load the model a lockfile names (or MODEL) and check it matches the lock exactly.

    Exit 3 when anything differs, naming the field and both values.
    """
    from steadyclip.errors import IntegrityError, LockMismatchError
    from steadyclip.model.loading import load, source_from_lock
    from steadyclip.model.lockfile import read_lock

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
    from steadyclip.engine.probe import compare_probe, probe_settings

    return compare_probe(stored, Engine(loaded, probe_settings(stored), text_cache=None))


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .safetensors file to write.")
@torchscript_option
@json_option
@handle_errors
def convert(checkpoint: Path, output: Path, allow_torchscript: bool, as_json: bool) -> None:
    """Convert CHECKPOINT (.pt/.pth/.bin) to safetensors without running code from it, verified by a read-back."""
    from steadyclip.errors import InputError
    from steadyclip.model.convert import check_output_path, convert_checkpoint

    try:
        check_output_path(checkpoint, output)
    except InputError as e:  # a bad path is a usage error (exit 2), before anything is read
        raise click.BadParameter(str(e), param_hint="--output") from e
    done = convert_checkpoint(checkpoint, output, allow_torchscript=allow_torchscript)
    if as_json:
        echo_json(done.to_dict())
    else:
        click.echo(f"wrote {done.output}: {done.tensors} tensors, sha256 {done.sha256}, fingerprint {done.fingerprint}")
