"""Showing a script diagnosis: the script's own output per run (the symptom), then ``diagnose``'s report."""
from __future__ import annotations

from html import escape

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from steadyclip.doctor.report import format_severity
from steadyclip.doctor.report import render as render_diagnosis
from steadyclip.doctor.script import ScriptDiagnosis, ScriptError, ScriptRun

__all__ = ["render", "render_failure", "script_html", "to_html"]

_TAIL = 12  # lines of each run's output shown; --json has all of it


def _tail(text: str, n: int = _TAIL) -> str:
    lines = text.rstrip("\n").splitlines()
    cut = len(lines) - n
    return "\n".join(([f"... {cut} earlier line(s)"] if cut > 0 else []) + lines[-n:])


def _label(p: ScriptRun, runs: int) -> str:
    return f"run {p.index + 1} of {runs}, as-is" if not p.fixes else f"with {', '.join(p.fixes)}"


def render(sd: ScriptDiagnosis, console: Console | None = None) -> None:
    """Print what the script printed in each run, the ranked causes, and the timing."""
    console = console or Console(soft_wrap=True)
    runs = int(sd.timing["runs"])
    for p in sd.processes:
        if p.fixes and tuple(sorted(sd.kept_fixes)) != p.fixes:
            continue  # the put-back runs prove a cause; the fixed runs show the user what the fix gives
        body = Text(_tail(p.stdout) or "(no output on stdout)")
        if p.stderr.strip() and not p.fixes:
            body.append("\n" + _tail(p.stderr, 4), style="dim")
        colour = "green" if p.fixes else "white"
        console.print(Panel(body, title=f"your script printed ({_label(p, runs)})", title_align="left",
                            border_style=colour))
    render_diagnosis(sd.diagnosis, console)
    if sd.diagnosis.advice:
        table = Table(title="advice (measured: changes none of your outputs here, so not a cause)",
                      title_justify="left")
        table.add_column("id")
        table.add_column("effect", justify="right")
        table.add_column("finding")
        for c in sd.diagnosis.advice:
            table.add_row(c.id, format_severity(c.severity), c.summary)
        console.print(table)
    t = sd.timing
    console.print(f"[dim]{t['processes']} run(s) of {sd.script} ({t['runs']} as-is, {t['interventions']} to prove "
                  f"the causes) in {t['wall_seconds']:.1f} s; {t['ratio']:.2f}x the script's own "
                  f"{t['script_seconds']:.1f} s per run[/dim]", highlight=False)
    for why in t.get("over_budget_because", ()):
        console.print(f"[dim]over the time budget: {why}[/dim]", highlight=False)


def render_failure(e: ScriptError, console: Console) -> None:
    """After the script's own traceback: what the observer's records say went wrong, and the fix."""
    from steadyclip.doctor.report import _cause_panel

    for rank, c in enumerate(e.causes, start=1):
        console.print(_cause_panel(rank, c))


def script_html(sd: ScriptDiagnosis) -> str:
    """The script's output per run as an HTML fragment (escaped)."""
    runs = int(sd.timing["runs"])
    out = [f"<h2>Your script: {escape(sd.script)}</h2>"]
    for p in sd.processes:
        out.append(f"<details{' open' if p.index == 0 else ''}><summary>{escape(_label(p, runs))}, exit "
                   f"{p.returncode}, {p.seconds:.1f} s</summary><pre>{escape(p.stdout)}</pre>"
                   + (f"<pre>{escape(p.stderr)}</pre>" if p.stderr else "") + "</details>")
    if sd.diagnosis.advice:
        out.append("<h2>Advice (measured: changes none of your outputs here, so not a cause)</h2><ul>")
        out.extend(f"<li><b>{escape(c.id)}</b>: {escape(c.summary)}</li>" for c in sd.diagnosis.advice)
        out.append("</ul>")
    return "".join(out)


def to_html(sd: ScriptDiagnosis) -> str:
    from steadyclip.doctor.html import to_html as diagnosis_html

    return diagnosis_html(sd.diagnosis, extra=script_html(sd))
