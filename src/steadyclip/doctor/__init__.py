"""``steadyclip doctor``: why do my CLIP results change from run to run?

Give it your own open_clip model in whatever state your code leaves it, a few
images and labels; it runs the model as-is several times, then switches each
suspected cause off in turn and measures how far the probabilities move:

    >>> import steadyclip
    >>> d = steadyclip.diagnose(model, preprocess, images=["cat.jpg", "dog.jpg"], labels=["a cat", "a dog"])
    >>> d.verdict
    'unstable'
    >>> d.top.id, d.top.severity          # the biggest cause and how much it moves probabilities
    ('stochastic_layers', 0.41)
    >>> print(d.top.fix)                  # a code snippet that removes it

Modules: ``core`` (orchestration), ``checks_*`` (one family of causes each),
``harness`` (the measuring forward), ``state`` (snapshot/restore of the user's
model and process), ``result`` (the dataclasses and thresholds), ``report``
(terminal) and ``html`` (a self-contained page with the runs as a chart).
"""
from __future__ import annotations

from steadyclip.doctor.core import diagnose
from steadyclip.doctor.result import (
    NUMERIC_TOL,
    PROB_TOL,
    Cause,
    CheckStatus,
    Diagnosis,
    Run,
)

__all__ = [
    "NUMERIC_TOL",
    "PROB_TOL",
    "Cause",
    "CheckStatus",
    "Diagnosis",
    "Run",
    "diagnose",
    "render_report",
    "to_html",
]


def render_report(diagnosis: Diagnosis, console: object | None = None) -> None:
    """Print the ranked causes with evidence and fixes (rich)."""
    from steadyclip.doctor.report import render

    render(diagnosis, console)  # type: ignore[arg-type]


def to_html(diagnosis: Diagnosis) -> str:
    """A self-contained HTML page: each run's probabilities as-is vs after the fixes, and the causes."""
    from steadyclip.doctor.html import to_html as _to_html

    return _to_html(diagnosis)
