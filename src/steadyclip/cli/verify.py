"""``steadyclip verify``: prove an old result (a batch file, a saved JSON answer), or check a lockfile.

    steadyclip verify RESULT [--sample N | --all] [--seed S] [--images-root DIR] [--json]
    steadyclip verify ANSWER.json --inputs REQUEST.json      # an OpenAI-style /v1/embeddings answer
    steadyclip verify [MODEL] --lock steadyclip.lock

Exit codes: 0 every checked row ``bitwise`` or ``drift`` (or the lock matches), 1 error (not a
result, model not found), 2 usage (no such file), 3 a check ran and failed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from steadyclip.cli._common import (
    EXIT_CHECK_FAILED,
    echo_json,
    handle_errors,
    json_option,
    pretrained_option,
    torchscript_option,
)

if TYPE_CHECKING:
    from steadyclip.verify import VerifyReport

_COLOURS = {"bitwise": "green", "drift": "yellow"}


@click.command()
@click.argument("target", metavar="RESULT", required=False, default=None)
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check a model against this lockfile instead (RESULT is then the MODEL, optional).")
@click.option("--model", "-m", default=None, help="Load the model from here when its recorded path moved.")
@pretrained_option
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Rows to recompute, seeded and spread over the file [default: 32].")
@click.option("--all", "check_all", is_flag=True, help="Recompute every row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--images-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the inputs are now, when they moved since the result was made.")
@click.option("--inputs", "inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="For an OpenAI-style /v1/embeddings answer (it holds only digests): the JSON request body "
                   "sent, or a JSON list of its inputs.")
@torchscript_option
@json_option
@handle_errors
def verify(target: str | None, lock_path: Path | None, model: str | None, pretrained: str | None,
           sample: int | None, check_all: bool, seed: int, images_root: Path | None, inputs: Path | None,
           allow_torchscript: bool, as_json: bool) -> None:
    """Recompute rows of RESULT (batch Parquet, classify/embed --json, a saved server answer) and check
    they match, bit for bit.

    Each checked row is bitwise, drift (another stack, within tolerance), mismatch, input_changed
    or input_missing. Exit 3 unless every one is bitwise or drift.
    """
    if lock_path is not None:
        from steadyclip.cli.models import verify_lock

        verify_lock(target or model, pretrained, lock_path, allow_torchscript, as_json)
        return
    if target is None:
        raise click.UsageError("give a result file to verify (RESULT), or --lock LOCKFILE")
    if sample is not None and check_all:
        raise click.UsageError("give --sample N or --all, not both")
    if not Path(target).is_file():
        raise click.BadParameter(f"{target} is not a file", param_hint="RESULT")
    from steadyclip.verify import DEFAULT_SAMPLE, verify_results

    report = verify_results(target, sample=None if check_all else sample or DEFAULT_SAMPLE, seed=seed,
                            images_root=images_root, model=model, pretrained=pretrained, inputs=inputs)
    if as_json:
        echo_json(report.to_dict())
    else:
        _render(report)
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)


def _render(report: VerifyReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    table = Table(show_header=True, header_style="bold")
    for col in ("row", "input", "verdict", "detail"):
        table.add_column(col)
    for r in report.rows:
        figures = f" (max |d| {r.max_abs:.3g}, min cos {r.min_cosine})" if r.max_abs is not None else ""
        colour = _COLOURS.get(r.verdict, "red")
        table.add_row(str(r.index), escape(r.source), f"[{colour}]{r.verdict}[/{colour}]",
                      escape((r.reason or "") + figures))
    console.print(table)
    totals = ", ".join(f"{v} {n}" for v, n in report.totals.items() if n)
    console.print(f"{report.path} ({report.kind}): {len(report.rows)} of {report.total_rows} rows checked: {totals}",
                  highlight=False, markup=False)
    for d in report.differences:
        console.print(f"  {d.kind} fact {d.fact}: {d.then!r} then, {d.now!r} now", highlight=False, markup=False)
    verdict = f"verdict: {report.verdict}" + ("" if report.ok else " (FAILED)")
    console.print(verdict, highlight=False, markup=False)


__all__ = ["verify"]
