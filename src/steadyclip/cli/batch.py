"""``steadyclip batch``: images (a folder, glob or manifest) or texts (a file) in, one resumable Parquet file out."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from steadyclip.cli._common import (
    build_engine,
    echo_json,
    handle_errors,
    labels_options,
    model_options,
    read_labels,
    top_k_option,
)

if TYPE_CHECKING:
    from steadyclip.engine.settings import EngineSettings


@click.command()
@click.argument("input_spec", metavar="INPUT")
@labels_options
@top_k_option(5)
@click.option("--all-probs", is_flag=True, help="Also write every label's probability (column 'probs').")
@click.option("--embeddings", is_flag=True, help="Also write the float32 image embedding (column 'embedding').")
@click.option("--texts", is_flag=True,
              help="INPUT holds texts to embed, not image paths: a text file with one text per line, or a "
                   "CSV/Parquet with a 'text' column (see --text-column).")
@click.option("--text-column", metavar="NAME", default=None,
              help="The CSV/Parquet column holding the texts (default 'text'); implies --texts.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The Parquet file to write.")
@click.option("--engine", "backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Run the model here (engine replicas on every usable CPU) or on Ray Data actors.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Local: decoder processes feeding one model process (0 = a thread) instead of the default, "
                   "engine replicas that each decode and embed (images only). Ray: model actors (default: one "
                   "per --threads CPUs of the cluster), for images and texts.")
@click.option("--part-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows per part file: how much work a kill can lose.")
@click.option("--restart", is_flag=True, help="Discard an earlier run's parts or output at --out and start over.")
@click.option("--verbose", is_flag=True, help="Let Ray's own logs through (quiet by default).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@model_options
@handle_errors
def batch(input_spec: str, labels: str | None, labels_file: str | None, templates: str | None, top_k: int,
          all_probs: bool, embeddings: bool, texts: bool, text_column: str | None, out: str, backend: str,
          address: str | None, workers: int | None, part_size: int, restart: bool, verbose: bool,
          progress: bool | None, model: str, pretrained: str | None, lock_path: str | None,
          settings: EngineSettings, as_json: bool) -> None:
    """Classify (and/or embed) every image in INPUT - or embed every text - into one Parquet file, resumably.

    INPUT is a folder (searched recursively for images), a quoted glob
    ('photos/**/*.jpg'), or a manifest: a .csv or .parquet with a 'path' column,
    or a .txt with one path per line. Every input gets exactly one row; a bad
    image is an 'error' row. If the job is killed, run the same command again
    and it resumes where it stopped.

    With --texts (or --text-column NAME), INPUT is a file of texts to embed: one
    text per line (any suffix but .csv/.parquet; '#' is text, not a comment), or
    the column of a .csv/.parquet. Row i is line (or data row) i+1: a blank or
    non-UTF-8 text is an 'error' row (TextInputError), not skipped. A text longer than the model's
    context is truncated, with a warning, and flagged in the 'truncated' column.
    Columns: index, text, text_sha256, status, error_type, error_message,
    truncated, embedding. Text jobs run on this engine's replicas, or with
    --engine ray on Ray Data actors (--address, --workers): the same rows, bit
    for bit.
    """
    from steadyclip.batch import run_batch, run_text_batch

    text_job = texts or text_column is not None
    if text_job:
        _check_text_options(labels or labels_file, templates, all_probs, backend, address, workers)
    wants_labels = not text_job and bool(labels or labels_file or not embeddings)
    label_list = read_labels(labels, labels_file) if wants_labels else None
    engine = build_engine(model, pretrained, lock_path, settings)
    if templates is None and label_list is not None:
        templates = engine.loaded.default_templates
    show = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar("text" if text_job else "img") if show else None
    try:
        if text_job:
            summary = run_text_batch(input_spec, engine, out=out, text_column=text_column, part_size=part_size,
                                     restart=restart, progress=bar, backend=backend, address=address,
                                     workers=workers, verbose=verbose)
        else:
            summary = run_batch(input_spec, engine, out=out, labels=label_list, templates=templates, top_k=top_k,
                                all_probs=all_probs, embeddings=embeddings,
                                backend=backend,  # type: ignore[arg-type]
                                workers=workers, part_size=part_size, restart=restart, ray_address=address,
                                verbose=verbose, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        echo_json(summary.to_dict())
        return
    if summary.already_complete:
        click.echo(f"{summary.out} already holds this job ({summary.total} rows: {summary.ok} ok, "
                   f"{summary.errors} errors); nothing to do. Use --restart to recompute.", err=True)
        return
    resumed = f", {summary.resumed} resumed from an earlier run" if summary.resumed else ""
    unit = "text" if summary.inputs == "texts" else "img"
    click.echo(
        f"{summary.total} rows: {summary.ok} ok, {summary.errors} errors{resumed}. "
        f"{summary.processed} computed in {summary.elapsed_s:.1f}s ({summary.items_per_s:.1f} {unit}/s; "
        f"{summary.backend}, {summary.workers} worker(s), {summary.threads} thread(s), "
        f"micro-batch {summary.micro_batch}) -> {summary.out}", err=True,
    )


def _check_text_options(labels: str | None, templates: str | None, all_probs: bool, backend: str,
                        address: str | None, workers: int | None) -> None:
    """A text job embeds; refuse the image-only options rather than ignore them."""
    given = [name for name, on in (("--labels/--labels-file", labels), ("--templates", templates),
                                   ("--all-probs", all_probs)) if on]
    if given:
        raise click.UsageError(f"{', '.join(given)} do(es) not apply to a text job (--texts/--text-column): it "
                               "writes embeddings")
    local = [name for name, on in (("--address", address), ("--workers", workers is not None)) if on]
    if backend == "local" and local:
        raise click.UsageError(f"{', '.join(local)} apply to --engine ray; a local text job runs on this "
                               "engine's replicas (--replicas)")
    if workers == 0:
        raise click.UsageError("--workers counts model actors for a text job: give 1 or more (or leave it out)")


class _ProgressBar:
    """A tqdm bar on stderr fed by run_batch's progress callback: items/s, ETA, errors so far."""

    def __init__(self, unit: str) -> None:
        self._unit = unit
        self._bar: Any = None
        self._last = 0

    def __call__(self, p: Any) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.total, initial=p.resumed, unit=self._unit, file=sys.stderr, dynamic_ncols=True,
                             smoothing=0.1, desc="batch")
            self._last = p.resumed
        self._bar.update(p.done - self._last)
        self._last = p.done
        self._bar.set_postfix(errors=p.errors, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


__all__ = ["batch"]
