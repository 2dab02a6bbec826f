"""The terminal report: the symptom (runs), then the causes ranked by how much they move probabilities."""
from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from steadyclip.doctor.result import Cause, Diagnosis

__all__ = ["format_severity", "render", "runs_table"]

_KEY_EVIDENCE = 6  # evidence entries shown per cause; --json has them all


def format_severity(sev: float | None) -> str:
    if sev is None:
        return "n/a"
    if sev == 0:
        return "0"
    return f"{sev:.2g}" if sev < 1e-3 else f"{sev:.3f}"


def _top_labels(d: Diagnosis, image: int, k: int) -> list[int]:
    """The labels worth showing for one image: highest probability in any run, as-is or fixed."""
    best: dict[int, float] = {}
    for r in d.runs:
        rows = [r.fixed[image]] + ([r.as_is[image]] if r.as_is is not None else [])
        for row in rows:
            for j, p in enumerate(row):
                if math.isfinite(p):
                    best[j] = max(best.get(j, 0.0), p)
    return [j for j, _ in sorted(best.items(), key=lambda kv: -kv[1])[:k]]


def runs_table(d: Diagnosis, *, image: int = 0, k: int = 3) -> Table:
    """One image's probabilities per run: as-is next to fixed, top labels only."""
    cols = _top_labels(d, image, k)
    name = d.images[image] if image < len(d.images) else f"image {image}"
    table = Table(title=f"{name}: probability per run", show_header=True, header_style="bold", title_justify="left")
    table.add_column("run", justify="right")
    for j in cols:
        table.add_column(f"{d.labels[j]}\nas-is", justify="right")
    for j in cols:
        table.add_column(f"{d.labels[j]}\nfixed", justify="right", style="green")
    for r in d.runs:
        as_is = [("[red]error[/red]" if r.as_is is None else f"{r.as_is[image][j]:.4f}") for j in cols]
        table.add_row(str(r.index + 1), *as_is, *(f"{r.fixed[image][j]:.4f}" for j in cols))
    return table


def _evidence_lines(ev: dict[str, Any]) -> Text:
    out = Text()
    for i, (k, v) in enumerate(ev.items()):
        if i >= _KEY_EVIDENCE:
            out.append(f"  ... {len(ev) - _KEY_EVIDENCE} more in --json\n", style="dim")
            break
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) and "path" in x for x in v):
            v = [x["path"] for x in v]  # layers: their paths say it all
        if isinstance(v, float):
            shown = format_severity(v)
        elif isinstance(v, (list, tuple)) and len(v) > 4:
            shown = ", ".join(str(x) for x in v[:4]) + f", ... ({len(v)})"
        elif isinstance(v, dict) and len(v) > 4:
            shown = ", ".join(f"{a}={b}" for a, b in list(v.items())[:4]) + ", ..."
        else:
            shown = str(v)
        out.append(f"  {k}: ", style="bold")
        out.append(shown[:200] + "\n")
    return out


def _cause_panel(rank: int, c: Cause) -> Panel:
    colour = "red" if c.level == "problem" else "blue"
    title = f"#{rank} {c.id}  [{colour}]{c.level}[/{colour}]  severity {format_severity(c.severity)}"
    body = Group(Text(c.summary + "\n"), _evidence_lines(c.evidence),
                 Text("fix:", style="bold"), Syntax(c.fix, "python", theme="ansi_dark", word_wrap=True))
    return Panel(body, title=title, title_align="left", border_style=colour)


def render(d: Diagnosis, console: Console | None = None, *, show_runs: bool = True) -> None:
    """Print the diagnosis: runs as-is vs fixed, verdict, causes (problems first), skipped checks."""
    console = console or Console(soft_wrap=True)
    if show_runs and d.runs:
        for i in range(min(len(d.images), 2)):
            if _top_labels(d, i, 3):  # NaN everywhere: a table without a column says nothing
                console.print(runs_table(d, image=i))
        errs = {r.error for r in d.runs if r.error}
        for e in errs:
            console.print(f"[red]as-is forward failed:[/red] {e}", highlight=False)
    colour = "red" if d.verdict == "unstable" else "green"
    problems = [c for c in d.causes if c.level == "problem"]
    info = [c for c in d.causes if c.level != "problem"]
    console.print(f"\nverdict: [bold {colour}]{d.verdict.upper()}[/bold {colour}]"
                  f"  ({len(problems)} problem(s), {len(info)} note(s); severity = max change of any probability)")
    for rank, c in enumerate(d.causes, start=1):
        if c.level == "problem":
            console.print(_cause_panel(rank, c))
    if info:
        table = Table(title="notes (do not make results unstable by themselves)", title_justify="left")
        table.add_column("id")
        table.add_column("severity", justify="right")
        table.add_column("finding")
        for c in info:
            table.add_row(c.id, format_severity(c.severity), c.summary)
        console.print(table)
    skipped = [c for c in d.checks if c.status == "skipped"]
    passed = [c.id for c in d.checks if c.status == "ok"]
    if passed:
        console.print(f"[green]passed:[/green] {', '.join(passed)}", highlight=False)
    for s in skipped:
        console.print(f"[dim]skipped {s.id}: {s.detail}[/dim]", highlight=False)
    env = d.environment
    versions = env["versions"]
    console.print(f"[dim]torch {versions['torch']}, open_clip {versions['open_clip_torch']}, device {env.get('device')}, "
                  f"threads {env.get('threads')}, MKL_CBWR={env.get('MKL_CBWR')}[/dim]", highlight=False)
