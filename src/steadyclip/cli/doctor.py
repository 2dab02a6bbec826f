"""``steadyclip doctor``: find out why a CLIP model's results change from run to run.

The model is built the way a user's script builds it - raw open_clip, no
steadyclip safety net - so the doctor sees what their code sees: train mode,
random weights for a missing tag, a checkpoint that does not match its lock.
Exit codes: 0 stable, 3 unstable, 1 error, 2 usage.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from steadyclip.cli._common import EXIT_CHECK_FAILED, EXIT_OK, echo_json, handle_errors

_logger = logging.getLogger(__name__)

_DEMO_IMAGES = 4
_DEMO_SEED = 2024


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "initialized randomly" before the script loads its weights; that line is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


def careless_demo_loader(weights: Path) -> Callable[[], tuple[Any, Any]]:
    """The bundled model built like a typical script: create_model + load_state_dict, and no ``.eval()``."""

    def load() -> tuple[Any, Any]:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from safetensors.torch import load_file

        from steadyclip.registry import DEMO_ARCH, register_demo_config

        register_demo_config()
        quiet = _DropRandomInitWarning()
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(DEMO_ARCH)
        finally:
            logging.getLogger().removeFilter(quiet)
        model.load_state_dict(load_file(str(weights)))
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        return model, preprocess  # note: still in train mode, as open_clip returned it

    return load


def open_clip_loader(model: str, pretrained: str | None) -> Callable[[], tuple[Any, ...]]:
    """``open_clip.create_model_and_transforms(model, pretrained=...)``, exactly as a user's script calls it."""
    from steadyclip.errors import ModelSourceError

    def load() -> tuple[Any, ...]:
        import open_clip

        try:
            out: tuple[Any, ...] = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
            raise ModelSourceError(
                f"open_clip could not build {model!r} with pretrained={pretrained!r}: {e}. "
                "Check the name with `python -c 'import open_clip; print(open_clip.list_pretrained())'`"
            ) from e
        return out

    return load


def _with_eval(loader: Callable[[], Any]) -> Callable[[], Any]:
    def load() -> Any:
        out = loader()
        out[0].eval()
        return out

    return load


def _labels(labels: str | None, labels_file: str | None, demo: bool) -> list[str]:
    from steadyclip.prompts import read_labels_file
    from steadyclip.registry import demo_labels

    if labels and labels_file:
        raise click.UsageError("give --labels or --labels-file, not both")
    if labels_file:
        return read_labels_file(labels_file)
    if labels:
        return labels.split(",")
    if demo:
        return demo_labels()
    raise click.UsageError('give the labels: --labels "a cat,a dog" or --labels-file FILE')


def _demo_images(images: tuple[Path, ...]) -> tuple[list[Any], list[str] | None]:
    if images:
        return list(images), None
    from steadyclip.demo.shapes import generate

    samples = generate(_DEMO_IMAGES, seed=_DEMO_SEED)
    return [im for im, _, _ in samples], [f"{c} {s} (generated)" for _, c, s in samples]


@click.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--demo", is_flag=True,
              help="Diagnose the bundled model loaded the careless way (no model.eval()) on generated shapes.")
@click.option("--model", "-m", default=None,
              help="open_clip architecture or hf-hub:ORG/REPO, built with open_clip.create_model_and_transforms.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag or a checkpoint file (none: random init).")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A steadyclip lockfile the weights must match (weights_corrupted check).")
@click.option("--labels", "-l", default=None, help='Comma-separated labels, e.g. "a cat,a dog".')
@click.option("--labels-file", type=click.Path(exists=True, dir_okay=False), default=None, help="One label per line.")
@click.option("--script", "script", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Diagnose your own unchanged script: run it N times, prove the cause (args after --).")
@click.option("--runs", type=click.IntRange(min=1, max=100), default=None,
              help="Repetitions as-is and after the fixes [default: 5; 3 with --script].")
@click.option("--eval", "call_eval", is_flag=True,
              help="Your code calls model.eval(): diagnose the model in eval mode instead of as open_clip returns it.")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Your code runs the model under torch.autocast with this dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the diagnosis).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML page charting each run as-is vs fixed.")
@handle_errors
def doctor(images: tuple[Path, ...], demo: bool, model: str | None, pretrained: str | None, lock_path: str | None,
           labels: str | None, labels_file: str | None, script: Path | None, runs: int | None, call_eval: bool,
           amp: str | None, as_json: bool, html_path: Path | None) -> None:
    """Find out why results change from run to run: measured causes, ranked, with fixes.

    \b
    steadyclip doctor --script my_script.py [--runs 3] [--json] [--html F] [-- SCRIPT ARGS...]
    steadyclip doctor --demo
    steadyclip doctor --model ViT-B-32 --pretrained laion2b_s34b_b79k cat.jpg --labels "a cat,a dog"
    """
    if script is not None:
        if demo or model or labels or labels_file or lock_path or call_eval or amp:
            raise click.UsageError("--script runs your script as it is: drop --demo/--model/--labels/--lock/--eval/--amp")
        _doctor_script(script, tuple(str(a) for a in images), runs or 3, as_json, html_path)
        return
    runs = runs or 5
    from steadyclip.doctor import diagnose
    from steadyclip.errors import ModelSourceError
    from steadyclip.registry import DEMO_SPEC, get_spec, register_demo_config

    register_demo_config()  # so --model steadyclip-shapes (the demo architecture) resolves in open_clip

    if demo and model is not None and get_spec(model) is None:
        raise click.UsageError("--demo uses the bundled model; drop --model (or drop --demo)")
    bundled = demo or (model is not None and get_spec(model) is not None and pretrained is None)
    spec_of_model = get_spec(model) if model is not None else None
    if spec_of_model is not None and pretrained is not None:
        model = spec_of_model.arch  # the bundled id with other weights: its architecture, those weights
    if not bundled and model is None:
        raise click.UsageError("say what to diagnose: --demo, or --model ARCH [--pretrained TAG_OR_FILE]")
    if not demo and not images:
        raise click.UsageError("give a few image files to run the model on (or use --demo)")
    label_list = _labels(labels, labels_file, demo)

    weights_file: Path | None = None
    expected_sha: str | None = None
    names: list[str] | None = None
    if bundled:
        spec = DEMO_SPEC
        assert spec.weights_file is not None
        if not spec.weights_file.is_file():
            raise ModelSourceError(
                f"the bundled model's weights are missing ({spec.weights_file}); reinstall steadyclip or "
                "build them with `python -m steadyclip.demo.train`"
            )
        loader: Callable[[], Any] = careless_demo_loader(spec.weights_file)
        weights_file = spec.weights_file
        expected_sha = spec.sha256 if spec.sha256.strip("0") else None  # an all-zero hash is an unset placeholder
        tokenizer_name = spec.arch
        image_list, names = _demo_images(images)
    else:
        assert model is not None
        loader = open_clip_loader(model, pretrained)
        if pretrained is not None and Path(pretrained).expanduser().is_file():
            weights_file = Path(pretrained).expanduser()
        tokenizer_name = model
        image_list = list(images)
    if call_eval:
        loader = _with_eval(loader)

    import open_clip

    try:
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
    except Exception as e:  # unknown name, hub unreachable: open_clip raises assorted types
        raise ModelSourceError(f"open_clip has no tokenizer for {tokenizer_name!r}: {type(e).__name__}: {e}") from e
    d = diagnose(None, tokenizer=tokenizer, images=image_list, labels=label_list, loader=loader, runs=runs,
                 amp=amp, weights_file=weights_file, lock=lock_path, expected_sha256=expected_sha,
                 image_names=names)
    if html_path is not None:
        from steadyclip.doctor.html import to_html

        html_path.write_text(to_html(d), encoding="utf-8")
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        echo_json(d.to_dict())
    else:
        from rich.console import Console

        from steadyclip.doctor.report import render

        render(d, Console())
    sys.exit(EXIT_OK if d.stable else EXIT_CHECK_FAILED)


def _doctor_script(script: Path, args: tuple[str, ...], runs: int, as_json: bool, html_path: Path | None) -> None:
    from steadyclip.doctor.script import ScriptError, diagnose_script

    if runs < 2:
        raise click.UsageError("--runs must be at least 2 with --script: runs are compared with each other")
    try:
        sd = diagnose_script(script, args, runs=runs)
    except ScriptError as e:  # the script's own failure: everything it printed, then why we stopped
        click.echo(e.run.stdout, nl=False, err=as_json)
        click.echo(e.run.stderr, nl=False, err=True)
        raise
    if html_path is not None:
        from steadyclip.doctor.script_report import to_html

        html_path.write_text(to_html(sd), encoding="utf-8")
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        echo_json(sd.to_dict())
    else:
        from rich.console import Console

        from steadyclip.doctor.script_report import render

        render(sd, Console(soft_wrap=True))
    sys.exit(EXIT_OK if sd.stable else EXIT_CHECK_FAILED)


__all__ = ["doctor"]
