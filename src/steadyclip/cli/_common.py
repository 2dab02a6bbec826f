"""Shared CLI plumbing: library errors as exit codes, and every option more than one command takes.

Each shared option is declared once here and applied as a decorator, so its name,
default and help are the same on every command that takes it.
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from steadyclip.errors import IntegrityError, PortableSetupError, SteadyClipError

if TYPE_CHECKING:
    from steadyclip.engine import Engine
    from steadyclip.engine.settings import EngineSettings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 0, 1, 2, 3
PROFILE_HELP = ("strict: fp32, bitwise reproducible on this machine. portable: fp32, the same bits on every "
                "x86-64 CPU with AVX (CPU only; its cost is measured in the README). fast: bf16 weights "
                "(fp16/bf16 on CUDA), drift vs strict measured and recorded; on CPU only with native bf16 "
                "(AMX/AVX512-BF16), else refused - STEADYCLIP_ASSUME_NATIVE_BF16=1 forces emulated bf16 (slow).")
DEMO = "steadyclip-demo"

# ---- options shared by several commands ------------------------------------------------
model_argument = click.argument("model", required=False, default=DEMO)
model_option = click.option(
    "--model", "-m", default=DEMO, show_default=True,
    help="Model: bundled id, open_clip arch, hf-hub:org/repo[@rev] or local-dir:PATH.")
pretrained_option = click.option(
    "--pretrained", metavar="TAG|PATH", default=None,
    help="open_clip pretrained tag or a checkpoint file (for an architecture name).")
lock_option = click.option(
    "--lock", "lock_path", type=click.Path(dir_okay=False), default=None,
    help="Refuse to run unless the model matches this lockfile.")
torchscript_option = click.option(
    "--allow-torchscript", is_flag=True, help="Allow TorchScript archives (loading one runs its code).")


def _profile_chosen(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "portable":
        from steadyclip.cli._portable import arrange_portable_process

        arrange_portable_process()  # execs this command again with the variables portable needs
    return value


profile_option = click.option(
    "--profile", type=click.Choice(["strict", "portable", "fast"]), default="strict", show_default=True,
    help=PROFILE_HELP, callback=_profile_chosen)
micro_batch_option = click.option(
    "--micro-batch", type=click.IntRange(min=1), default=8, show_default=True,
    help="Rows per image forward (concurrent work shares micro-batches; results do not depend on it).")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="Intra-op threads per replica (default 1; more only where proven not to change a bit).")
replicas_option = click.option(
    "--replicas", type=click.IntRange(min=1), default=None,
    help="Engine processes for inputs beyond one micro-batch (default: one per usable CPU).")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
labels_option = click.option(
    "--labels", "-l", default=None, help='Comma-separated labels, e.g. "red circle,blue square".')
labels_file_option = click.option(
    "--labels-file", type=click.Path(exists=True, dir_okay=False), default=None, help="One label per line.")
templates_option = click.option(
    "--templates", default=None,
    help="Prompt templates: 'photo', 'openai-imagenet' or a file (default: the model's, see `steadyclip info`).")


def top_k_option(default: int) -> Callable[[F], F]:
    """``--top-k/-k``: the one declaration; commands differ only in the default."""
    return click.option("--top-k", "-k", type=click.IntRange(min=1), default=default, show_default=True,
                        help="Labels shown per image, most probable first.")


def apply(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several option decorators as one, in the order given (the first is the first in --help)."""

    def stack(func: F) -> F:
        for deco in reversed(decorators):
            func = deco(func)
        return func

    return stack


_SETTINGS_KEYS = ("profile", "micro_batch", "threads", "replicas")


def settings_options(*, replicas: bool = True) -> Callable[[F], F]:
    """--profile, --micro-batch, --threads (and --replicas), handed to the command as one
    ``settings: EngineSettings`` argument: the CLI builds engine settings in this one place."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            from steadyclip.engine.settings import EngineSettings

            given = {k: kwargs.pop(k) for k in _SETTINGS_KEYS if k in kwargs}
            kwargs["settings"] = EngineSettings(**{k: v for k, v in given.items() if v is not None})
            return func(*args, **kwargs)

        options = [profile_option, micro_batch_option, threads_option] + ([replicas_option] if replicas else [])
        return apply(*options)(cast(F, inner))

    return wrap


# The options that choose and run a model, for commands that take it as --model.
model_options = apply(model_option, pretrained_option, lock_option, settings_options(), json_option)
labels_options = apply(labels_option, labels_file_option, templates_option)


def build_engine(model: str, pretrained: str | None, lock_path: str | None, settings: EngineSettings) -> Engine:
    """Load (verified) and wrap in an engine: what every model-running command does first."""
    from steadyclip.engine import Engine
    from steadyclip.model.loading import load

    loaded = load(model, pretrained=pretrained, lock=lock_path)
    return Engine(loaded, settings)


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """The labels from ``--labels`` or ``--labels-file`` (exactly one of them)."""
    from steadyclip.engine.prompts import read_labels_file

    if labels and labels_file:
        raise click.UsageError("give --labels or --labels-file, not both")
    if labels_file:
        return read_labels_file(labels_file)
    if labels:
        return labels.split(",")
    raise click.UsageError('give the labels: --labels "a cat,a dog" or --labels-file FILE')


def handle_errors(func: F) -> F:
    """Render a SteadyClipError as one line on stderr; exit 3 for failed checks, else 1.

    A :class:`~steadyclip.errors.PortableSetupError` (raised when an engine is built, before any
    work) first lets the command start itself again with the portable variables (a result or lock
    that names the portable profile: ``verify``, ``lock``); the error is shown only where that cannot be.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PortableSetupError as e:
            from steadyclip.cli._portable import arrange_portable_process

            arrange_portable_process()  # execs when this process is the CLI's own and lacks the variables
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except IntegrityError as e:
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        except SteadyClipError as e:
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def echo_json(doc: Any) -> None:
    """One JSON document on stdout, keys sorted so output is byte-stable."""
    click.echo(json.dumps(doc, sort_keys=True, indent=2, allow_nan=False))
