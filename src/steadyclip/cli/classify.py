"""``steadyclip classify`` and ``steadyclip embed``."""
from __future__ import annotations

import sys
from pathlib import Path
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
    from steadyclip.results import ClassifyReport


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@labels_options
@top_k_option(3)
@model_options
@handle_errors
def classify(images: tuple[Path, ...], labels: str | None, labels_file: str | None, templates: str | None,
             top_k: int, model: str, pretrained: str | None, lock_path: str | None, settings: EngineSettings, as_json: bool) -> None:
    """Zero-shot classify IMAGES against labels; a bad image is an error row, not a crash."""
    from steadyclip.engine.prompts import validate_labels

    label_list = validate_labels(read_labels(labels, labels_file))
    engine = build_engine(model, pretrained, lock_path, settings)
    report = engine.classify([str(p) for p in images], label_list, top_k=top_k, on_error="row",
                             templates=engine.loaded.default_templates if templates is None else templates)
    if as_json:
        from steadyclip.engine.recipe import file_sha256, recipe

        doc = report.to_dict() | {"execution": engine.execution.to_dict(), "recipe": recipe(
            engine, labels=label_list, templates=report.provenance.template_set, top_k=top_k)}
        for row, path in zip(doc["results"], images):
            row["sha256"] = file_sha256(path)  # what `steadyclip verify` checks the input against
        echo_json(doc)
    else:
        _render(report)
    if report.errors:
        sys.exit(1)


def _render(report: ClassifyReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from steadyclip.results import ImageFailure

    table = Table(show_header=True, header_style="bold")
    table.add_column("image")
    table.add_column("top labels (probability)")
    for r in report.rows:
        if isinstance(r, ImageFailure):
            table.add_row(escape(str(r.source)), f"[red]{escape(r.error_type)}: {escape(r.message)}[/red]")
        else:
            table.add_row(escape(str(r.source)), escape("  ".join(f"{lab} {p:.3f}" for lab, p in r.top)))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"provenance: {report.provenance.summary()}", highlight=False, markup=False)


@click.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="A text to embed (repeatable).")
@model_options
@handle_errors
def embed(images: tuple[Path, ...], texts: tuple[str, ...], model: str, pretrained: str | None,
          lock_path: str | None, settings: EngineSettings, as_json: bool) -> None:
    """Print L2-normalised float32 embeddings of IMAGES and --text strings."""
    if not images and not texts:
        raise click.UsageError("give image paths and/or --text")
    from steadyclip.engine.recipe import file_sha256, recipe

    engine = build_engine(model, pretrained, lock_path, settings)
    doc: dict[str, Any] = {"images": [], "texts": []}
    if images:
        emb = engine.embed_images(list(images))
        doc["images"] = [{"source": str(p), "sha256": file_sha256(p), "embedding": e.tolist()}
                         for p, e in zip(images, emb)]
    if texts:
        emb = engine.embed_texts(list(texts))
        doc["texts"] = [{"text": t, "embedding": e.tolist()} for t, e in zip(texts, emb)]
    doc["provenance"] = engine.provenance.to_dict()
    doc["execution"] = engine.execution.to_dict()
    doc["recipe"] = recipe(engine)  # settings and model source: what `steadyclip verify` recomputes with
    if as_json:
        echo_json(doc)
    else:
        for item in doc["images"] + doc["texts"]:
            name = item.get("source") or item.get("text")
            click.echo(f"{name}\t" + " ".join(f"{v:.6f}" for v in item["embedding"][:8]) + " ...")


__all__ = ["classify", "embed"]
