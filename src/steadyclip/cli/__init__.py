"""The ``steadyclip`` command: a thin layer of click commands over the library.

Each command lives in its own module and is imported only when run, so
``steadyclip --help`` and quick commands do not pay for torch start-up twice.
Exit codes: 0 ok, 1 error, 2 usage, 3 a check ran and failed.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import sys
from typing import Any

import click

# command name -> "module:attribute" under steadyclip.cli
_COMMANDS: dict[str, str] = {
    "classify": "classify:classify",
    "embed": "classify:embed",
    "lock": "models:lock",
    "verify": "verify:verify",
    "convert": "models:convert",
    "info": "models:info",
    "doctor": "doctor:doctor",
    "batch": "batch:batch",
    "serve": "serve:serve",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, t in _COMMANDS.items() if _module_exists(t))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None or not _module_exists(target):
            return None
        mod_name, attr = target.split(":")
        module = importlib.import_module(f"steadyclip.cli.{mod_name}")
        command: click.Command = getattr(module, attr)
        return command


def _module_exists(target: str) -> bool:
    return importlib.util.find_spec(f"steadyclip.cli.{target.split(':')[0]}") is not None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="steadyclip")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Reproducible, verified OpenCLIP inference."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point: the process ends when it returns."""
    try:
        return cli.main(args=argv, prog_name="steadyclip")
    finally:
        # Skip the interpreter's final garbage collections over torch's and open_clip's millions of
        # objects (about a second on every command, measured); atexit hooks and finalizers still run.
        gc.freeze()
