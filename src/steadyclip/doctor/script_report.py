"""Showing a script diagnosis: the script's own output per run (the symptom), then ``diagnose``'s report."""
from __future__ import annotations

from html import escape

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from steadyclip.doctor.report import render as render_diagnosis
from steadyclip.doctor.script import ScriptDiagnosis, ScriptRun

__all__ = ["render", "script_html", "to_html"]

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
    t = sd.timing
    console.print(f"[dim]{t['processes']} run(s) of {sd.script} ({t['runs']} as-is, {t['interventions']} to prove "
                  f"the causes) in {t['wall_seconds']:.1f} s; {t['ratio']:.2f}x the script's own "
                  f"{t['script_seconds']:.1f} s per run[/dim]", highlight=False)


def script_html(sd: ScriptDiagnosis) -> str:
    """The script's output per run as an HTML fragment (escaped)."""
    runs = int(sd.timing["runs"])
    out = [f"<h2>Your script: {escape(sd.script)}</h2>"]
    for p in sd.processes:
        out.append(f"<details{' open' if p.index == 0 else ''}><summary>{escape(_label(p, runs))}, exit "
                   f"{p.returncode}, {p.seconds:.1f} s</summary><pre>{escape(p.stdout)}</pre>"
                   + (f"<pre>{escape(p.stderr)}</pre>" if p.stderr else "") + "</details>")
    return "".join(out)


def to_html(sd: ScriptDiagnosis) -> str:
    from steadyclip.doctor.html import to_html as diagnosis_html

    return diagnosis_html(sd.diagnosis, extra=script_html(sd))
