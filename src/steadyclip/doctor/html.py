"""A self-contained HTML page of a diagnosis: the symptom as a chart, then the causes.

One inline SVG per image and configuration: probability (y) per run (x) for the
labels that matter, as-is on the left, after the fixes on the right. Jumping
lines on the left and flat ones on the right are the whole story. No scripts,
no external CSS, fonts or images: the file can be mailed or attached to an issue.
"""
from __future__ import annotations

import json
import math
from html import escape

from steadyclip.doctor.report import _top_labels, format_severity
from steadyclip.doctor.result import Diagnosis

__all__ = ["to_html"]

_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_W, _H, _PAD = 320, 180, 34
_MAX_IMAGES = 6

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}.verdict{font-size:1.3rem;font-weight:700;padding:.2rem .6rem;border-radius:4px;color:#fff}
.unstable{background:#c62828}.stable{background:#2e7d32}
.pair{display:flex;gap:1.2rem;flex-wrap:wrap;margin:.4rem 0 1.4rem}.pair figure{margin:0}
figcaption{font-size:.85rem;color:#555;text-align:center}
.cause{border-left:5px solid #c62828;padding:.4rem .9rem;margin:.8rem 0;background:#fafafa}
.cause.info{border-color:#1565c0}pre{background:#f1f1f1;padding:.6rem;overflow-x:auto;font-size:.82rem}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}.sw{width:.8rem;height:.8rem;display:inline-block;
margin-right:.3rem;vertical-align:middle}details{margin:.3rem 0}
"""


def _chart(series: list[tuple[str, list[float | None]]], title: str) -> str:
    """An SVG line chart: one polyline per label over the runs; y from 0 to 1."""
    n = max((len(v) for _, v in series), default=0)
    iw, ih = _W - 2 * _PAD, _H - 2 * _PAD

    def x(i: int) -> float:
        return _PAD + (iw * i / (n - 1) if n > 1 else iw / 2)

    def y(p: float) -> float:
        return _PAD + ih * (1.0 - min(max(p, 0.0), 1.0))

    parts = [f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">',
             f'<rect x="{_PAD}" y="{_PAD}" width="{iw}" height="{ih}" fill="#fff" stroke="#bbb"/>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{_PAD}" x2="{_PAD + iw}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{_PAD - 4}" y="{y(tick) + 4:.1f}" font-size="10" text-anchor="end">{tick:g}</text>')
    for i in range(n):
        parts.append(f'<text x="{x(i):.1f}" y="{_PAD + ih + 14}" font-size="10" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{_PAD + iw / 2}" y="{_H - 4}" font-size="10" text-anchor="middle">run</text>')
    parts.append(f'<text x="{_PAD + iw / 2}" y="{_PAD - 10}" font-size="12" text-anchor="middle" '
                 f'font-weight="600">{escape(title)}</text>')
    for k, (label, values) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        shown = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if len(shown) > 1:
            path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in shown)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in shown:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                         f'<title>{escape(label)}: {v:.4f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _image_section(d: Diagnosis, image: int) -> str:
    cols = _top_labels(d, image, len(_COLOURS))
    as_is = [(d.labels[j], [None if r.as_is is None else r.as_is[image][j] for r in d.runs]) for j in cols]
    fixed: list[tuple[str, list[float | None]]] = [(d.labels[j], [r.fixed[image][j] for r in d.runs]) for j in cols]
    legend = "".join(f'<span><i class="sw" style="background:{_COLOURS[k]}"></i>{escape(d.labels[j])}</span>'
                     for k, j in enumerate(cols))
    name = d.images[image] if image < len(d.images) else f"image {image}"
    return (f"<h3>{escape(name)}</h3><div class=legend>{legend}</div><div class=pair>"
            f"<figure>{_chart(as_is, 'as your code runs it')}<figcaption>as-is</figcaption></figure>"
            f"<figure>{_chart(fixed, 'after the fixes')}<figcaption>fixed</figcaption></figure></div>")


def to_html(d: Diagnosis, *, extra: str = "") -> str:
    """The diagnosis as one HTML document (inline CSS and SVG only); ``extra`` is trusted HTML put before the runs."""
    out = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
           f"<title>steadyclip doctor: {escape(d.verdict)}</title><style>{_CSS}</style></head><body>",
           (f'<h1>steadyclip doctor</h1><p><span class="verdict {escape(d.verdict)}">{escape(d.verdict.upper())}</span> '
            f"{len(d.problems)} problem(s); {len(d.runs)} run(s) of {len(d.images)} image(s) over "
            f"{len(d.labels)} label(s). Severity = the largest change of any probability a cause produced.</p>"),
           extra, "<h2>The symptom: probability per run</h2>"]
    out += [_image_section(d, i) for i in range(min(len(d.images), _MAX_IMAGES))]
    errors = sorted({r.error for r in d.runs if r.error})
    if errors:
        out.append("<p><b>as-is forward failed:</b> " + "; ".join(escape(e) for e in errors) + "</p>")
    out.append("<h2>Causes, ranked</h2>")
    if not d.causes:
        out.append("<p>No cause found: every check passed.</p>")
    for rank, c in enumerate(d.causes, start=1):
        cls = "cause" if c.level == "problem" else "cause info"
        evidence = escape(json.dumps(c.to_dict()["evidence"], indent=1, sort_keys=True))
        out.append(f'<div class="{cls}"><h3>#{rank} {escape(c.id)} &middot; {escape(c.level)} &middot; severity '
                   f"{escape(format_severity(c.severity))}</h3><p>{escape(c.summary)}</p>"
                   f"<details><summary>evidence</summary><pre>{evidence}</pre></details>"
                   f"<b>fix</b><pre>{escape(c.fix)}</pre></div>")
    out.append("<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>detail</th></tr>")
    for ch in d.checks:
        out.append(f"<tr><td>{escape(ch.id)}</td><td>{escape(ch.status)}</td><td>{escape(ch.detail)}</td></tr>")
    out.append("</table><h2>Environment</h2><pre>"
               + escape(json.dumps(d.to_dict()["environment"], indent=1, sort_keys=True)) + "</pre></body></html>")
    return "".join(out)
