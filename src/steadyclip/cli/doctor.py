"""``steadyclip doctor``: find out why a CLIP model's results change from run to run.

Thin: parses, calls :mod:`steadyclip.doctor` (which builds the model the way a user's
script does, :mod:`steadyclip.doctor.loaders`) and renders. Exit codes: 0 stable,
3 unstable or wrong, 1 error (with ``--script``: the script itself failed; ``--json`` still prints one
document, ``verdict: "error"``), 2 usage.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from steadyclip.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    echo_json,
    handle_errors,
    json_option,
    labels_file_option,
    labels_option,
    read_labels,
)

_logger = logging.getLogger(__name__)


def _labels(labels: str | None, labels_file: str | None, demo: bool) -> list[str]:
    """``--labels``/``--labels-file`` as every command reads them; ``--demo`` without either: its own labels."""
    from steadyclip.model.registry import demo_labels

    return demo_labels() if demo and not (labels or labels_file) else read_labels(labels, labels_file)


@click.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--demo", is_flag=True,
              help="Diagnose the bundled model loaded the careless way (no model.eval()) on generated shapes.")
@click.option("--model", "-m", default=None,
              help="open_clip architecture or hf-hub:ORG/REPO, built with open_clip.create_model_and_transforms.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag or a checkpoint file (none: random init).")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A steadyclip lockfile the weights must match (weights_corrupted check).")
@labels_option
@labels_file_option
@click.option("--script", "script", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Diagnose your own unchanged script: run it N times, prove the cause (args after --).")
@click.option("--runs", type=click.IntRange(min=1, max=100), default=None,
              help="Repetitions as-is and after the fixes [default: 5; 3 with --script].")
@click.option("--eval", "call_eval", is_flag=True,
              help="Your code calls model.eval(): diagnose the model in eval mode instead of as open_clip returns it.")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Your code runs the model under torch.autocast with this dtype.")
@json_option
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
    from steadyclip.doctor import diagnose
    from steadyclip.doctor.loaders import demo_images, resolve_source

    _check_target(demo, model, images)
    label_list = _labels(labels, labels_file, demo)
    source = resolve_source(model, pretrained, demo=demo, call_eval=call_eval)
    image_list, names = demo_images() if source.bundled and not images else (list(images), None)
    d = diagnose(None, tokenizer=source.tokenizer, images=image_list, labels=label_list, loader=source.loader,
                 runs=runs or 5, amp=amp, weights_file=source.weights_file, lock=lock_path,
                 expected_sha256=source.expected_sha256, image_names=names)
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


def _check_target(demo: bool, model: str | None, images: tuple[Path, ...]) -> None:
    from steadyclip.model.registry import get_spec, register_demo_config

    register_demo_config()
    if demo and model is not None and get_spec(model) is None:
        raise click.UsageError("--demo uses the bundled model; drop --model (or drop --demo)")
    if not demo and model is None:
        raise click.UsageError("say what to diagnose: --demo, or --model ARCH [--pretrained TAG_OR_FILE]")
    if not demo and not images:
        raise click.UsageError("give a few image files to run the model on (or use --demo)")


def _doctor_script(script: Path, args: tuple[str, ...], runs: int, as_json: bool, html_path: Path | None) -> None:
    from steadyclip.doctor.script import ScriptError, diagnose_script, error_document
    from steadyclip.errors import SteadyClipError

    if runs < 2:
        raise click.UsageError("--runs must be at least 2 with --script: runs are compared with each other")
    try:
        sd = diagnose_script(script, args, runs=runs)
    except ScriptError as e:  # the script's own failure: everything it printed, what it means, then why we stopped
        click.echo(e.run.stdout, nl=False, err=as_json)
        click.echo(e.run.stderr, nl=False, err=True)
        if as_json:  # one JSON document for every outcome, a crash included
            echo_json(e.to_dict())
        else:
            from rich.console import Console

            from steadyclip.doctor.script_report import render_failure

            render_failure(e, Console(stderr=True))
        raise
    except SteadyClipError as e:  # nothing to diagnose (no open_clip call, a timeout): still one document
        if as_json:
            echo_json(error_document(e, script, args))
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
