"""Prompt templates and label validation for zero-shot classification.

Built-in template sets:
    ``photo``            the single "a photo of a {}."
    ``openai-imagenet``  the 80 templates OpenAI used for ImageNet zero-shot
A user template file holds one template per line, each with exactly one ``{}``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadyclip.errors import LabelError, TemplateError
from steadyclip.numerics import identity

_logger = logging.getLogger(__name__)

BUILTIN_TEMPLATE_SETS = ("photo", "openai-imagenet")


@dataclass(frozen=True)
class TemplateSet:
    """A named, hashed tuple of prompt templates (each contains ``{}`` once)."""

    name: str
    templates: tuple[str, ...]

    @property
    def sha256(self) -> str:
        """Hash of the exact template strings, part of every result's provenance."""
        return identity.sha256_json(list(self.templates))

    def fill(self, label: str) -> list[str]:
        """The prompts for one label."""
        return [t.replace("{}", label) for t in self.templates]


def get_template_set(spec: str | os.PathLike[str] | Sequence[str] | TemplateSet | None) -> TemplateSet:
    """Resolve a built-in name, a template file path, or an explicit list of templates.

    Raises:
        TemplateError: unknown name, unreadable file, or a template without exactly one ``{}``.
    """
    if isinstance(spec, TemplateSet):
        return spec
    if spec is None or spec == "photo":
        return TemplateSet("photo", ("a photo of a {}.",))
    if spec == "openai-imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        fns: Sequence[Callable[[str], str]] = OPENAI_IMAGENET_TEMPLATES
        return TemplateSet("openai-imagenet", tuple(f("{}") for f in fns))
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise TemplateError(
                f"templates {str(spec)!r} is neither a built-in set {BUILTIN_TEMPLATE_SETS} nor a file; "
                "pass one of those names or a text file with one template per line containing '{}'"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"cannot read template file {path}: {e}") from e
        templates = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return _validated(f"file:{path.name}", templates)
    return _validated("custom", list(spec))


def _validated(name: str, templates: Sequence[object]) -> TemplateSet:
    if not templates:
        raise TemplateError(f"template set {name!r} is empty; give at least one template containing '{{}}'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TemplateError(
                f"template {t!r} in set {name!r} must be a string with exactly one '{{}}' where the label goes"
            )
    return TemplateSet(name, tuple(str(t) for t in templates))


def validate_labels(labels: object, *, max_labels: int | None = None) -> list[str]:
    """Check a label list and return it with surrounding whitespace stripped.

    Raises:
        LabelError: not a list, empty, non-string, blank or duplicate labels, or too many.
    """
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise LabelError(
            f"labels must be a list of strings, got {type(labels).__name__}; "
            "on the CLI separate labels with commas or use --labels-file"
        )
    if not labels:
        raise LabelError("the label list is empty; give at least two labels to classify against")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise LabelError(f"label #{i} is {type(label).__name__} {label!r}, not a string")
        clean = label.strip()
        if not clean:
            raise LabelError(f"label #{i} is blank; remove it or give it text")
        if clean in seen:
            raise LabelError(
                f"label {clean!r} appears twice (#{seen[clean]} and #{i}); duplicate labels split "
                "probability between identical classes - remove the duplicate"
            )
        seen[clean] = i
        out.append(clean)
    if max_labels is not None and len(out) > max_labels:
        raise LabelError(f"{len(out)} labels exceed the limit of {max_labels}; split the request")
    return out


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """One label per line; blank lines and ``#`` comments are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"cannot read labels file {p}: {e}; give a UTF-8 text file, one label per line") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def truncated(tokenizer: Any, texts: Sequence[str], limit: int) -> list[bool] | None:
    """Which texts are longer than the model's token context (and so truncated); ``None`` when the
    tokenizer cannot tell (it has no ``encode``, e.g. a Hugging Face one)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return None
    return [len(encode(t)) + 2 > limit for t in texts]  # + start and end tokens


def warn_truncation(tokenizer: Any, texts: Sequence[str], limit: int) -> None:
    """Log a warning for each text longer than the model's token context (it will be truncated)."""
    for t, cut in zip(texts, truncated(tokenizer, texts, limit) or ()):
        if cut:
            _logger.warning("text truncated to the model's %d-token context: %.60r", limit, t)
