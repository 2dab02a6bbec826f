"""``steadyclip classify`` and ``steadyclip embed``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from steadyclip.cli._common import PROFILE_HELP, echo_json, handle_errors

_MODEL_OPTIONS = [
    click.option("--model", "-m", default="steadyclip-demo", show_default=True,
                 help="Model: bundled id, open_clip arch, hf-hub:org/repo[@rev] or local-dir:PATH."),
    click.option("--pretrained", default=None, help="open_clip pretrained tag or a checkpoint file."),
    click.option("--lock", "lock_path", type=click.Path(dir_okay=False), default=None,
                 help="Refuse to run unless the model matches this lockfile."),
    click.option("--profile", type=click.Choice(["strict", "fast"]), default="strict", show_default=True,
                 help=PROFILE_HELP),
    click.option("--micro-batch", type=click.IntRange(min=1), default=8, show_default=True),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="Intra-op threads per replica (default 1; more only where proven not to change a bit)."),
    click.option("--replicas", type=click.IntRange(min=1), default=None,
                 help="Engine processes for inputs beyond one micro-batch (default: one per usable CPU)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
]


def model_options(func: Any) -> Any:
    for opt in reversed(_MODEL_OPTIONS):
        func = opt(func)
    return func


def build_engine(model: str, pretrained: str | None, lock_path: str | None, profile: str,
                 micro_batch: int, threads: int | None, replicas: int | None = None) -> Any:
    from steadyclip.engine import Engine
    from steadyclip.loading import load

    loaded = load(model, pretrained=pretrained, lock=lock_path)
    return Engine(loaded, profile=profile, micro_batch=micro_batch, threads=threads, replicas=replicas)


def _labels(labels: str | None, labels_file: str | None) -> list[str]:
    from steadyclip.prompts import read_labels_file

    if labels and labels_file:
        raise click.UsageError("give --labels or --labels-file, not both")
    if labels_file:
        return read_labels_file(labels_file)
    if labels:
        return [s for s in labels.split(",")]
    raise click.UsageError('give the labels: --labels "a cat,a dog" or --labels-file FILE')


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--labels", "-l", default=None, help='Comma-separated labels, e.g. "red circle,blue square".')
@click.option("--labels-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One label per line.")
@click.option("--templates", default=None,
              help="Prompt templates: 'photo', 'openai-imagenet' or a file (default: the model's).")
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=3, show_default=True)
@model_options
@handle_errors
def classify(images: tuple[Path, ...], labels: str | None, labels_file: str | None, templates: str | None,
             top_k: int, model: str, pretrained: str | None, lock_path: str | None, profile: str,
             micro_batch: int, threads: int | None, replicas: int | None, as_json: bool) -> None:
    """Zero-shot classify IMAGES against labels; a bad image is an error row, not a crash."""
    from steadyclip.prompts import validate_labels

    label_list = validate_labels(_labels(labels, labels_file))
    engine = build_engine(model, pretrained, lock_path, profile, micro_batch, threads, replicas)
    report = engine.classify([str(p) for p in images], label_list, templates=templates, top_k=top_k,
                             on_error="row")
    doc = report.to_dict()
    n_err = report.errors
    if as_json:
        echo_json(doc | {"execution": engine.execution.to_dict()})
    else:
        _render(doc["results"], doc["provenance"])
    if n_err:
        sys.exit(1)


def _render(rows: list[dict[str, Any]], prov: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("image")
    table.add_column("top labels (probability)")
    for r in rows:
        if "error" in r:
            table.add_row(r["source"], f"[red]{r['error']['type']}: {r['error']['message']}[/red]")
        else:
            table.add_row(r["source"], "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"]))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(
        f"provenance: model={prov['model_id']} weights={prov['weights_sha256'][:12]} "
        f"fingerprint={prov['fingerprint'][:12]} profile={prov['profile']} threads={prov['threads']} "
        f"batch={prov['micro_batch']}/{prov['batch_path']}", highlight=False,
    )


@click.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="A text to embed (repeatable).")
@model_options
@handle_errors
def embed(images: tuple[Path, ...], texts: tuple[str, ...], model: str, pretrained: str | None,
          lock_path: str | None, profile: str, micro_batch: int, threads: int | None, replicas: int | None, as_json: bool) -> None:
    """Print L2-normalised float32 embeddings of IMAGES and --text strings."""
    if not images and not texts:
        raise click.UsageError("give image paths and/or --text")
    engine = build_engine(model, pretrained, lock_path, profile, micro_batch, threads, replicas)
    doc: dict[str, Any] = {"images": [], "texts": []}
    if images:
        emb = engine.embed_images(list(images))
        doc["images"] = [{"source": str(p), "embedding": e.tolist()} for p, e in zip(images, emb)]
    if texts:
        emb = engine.embed_texts(list(texts))
        doc["texts"] = [{"text": t, "embedding": e.tolist()} for t, e in zip(texts, emb)]
    doc["provenance"] = engine.provenance.to_dict()
    doc["execution"] = engine.execution.to_dict()
    if as_json:
        echo_json(doc)
    else:
        for item in doc["images"] + doc["texts"]:
            name = item.get("source") or item.get("text")
            click.echo(f"{name}\t" + " ".join(f"{v:.6f}" for v in item["embedding"][:8]) + " ...")


__all__ = ["classify", "embed"]
