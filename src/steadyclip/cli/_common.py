"""Shared CLI plumbing: turning library errors into exit codes and messages."""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from steadyclip.errors import IntegrityError, SteadyClipError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 0, 1, 2, 3
PROFILE_HELP = ("strict: fp32, bitwise reproducible. fast: bf16 weights (fp16/bf16 on CUDA), drift vs strict "
                "measured and recorded; on CPU only with native bf16 (AMX/AVX512-BF16), else refused - "
                "STEADYCLIP_ASSUME_NATIVE_BF16=1 forces emulated bf16 (slow).")


def handle_errors(func: F) -> F:
    """Render a SteadyClipError as one line on stderr; exit 3 for failed checks, else 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
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
