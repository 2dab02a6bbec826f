"""Run the user's script unchanged, with the observer installed: ``python boot.py my_script.py ARGS...``.

The script sees what ``python my_script.py ARGS`` would give it: ``__name__ ==
"__main__"``, ``sys.argv == ["my_script.py", *ARGS]``, its own folder as
``sys.path[0]``. Its traceback is printed as Python would print it, minus the
frames of this launcher and of the observer's wrappers (they only pass the call
on; left in, they read as if steadyclip had caused the crash), and the exit
status is the script's own.
"""
import sys

# first, before any other import: this folder must not shadow the user's modules
sys.path[0] = ""

import importlib.util
import os
import runpy
import traceback
from typing import Any


def _observer() -> Any:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_steadyclip_doctor_observer", os.path.join(here, "observer.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_HERE = os.path.dirname(os.path.realpath(__file__))


def _hide_ours(te: traceback.TracebackException, seen: set[int]) -> int:
    """Drop the observer's frames from this exception and the ones chained to it; how many were dropped."""
    if id(te) in seen:
        return 0
    seen.add(id(te))
    keep = [f for f in te.stack if os.path.dirname(os.path.realpath(f.filename)) != _HERE]
    hidden = len(te.stack) - len(keep)
    te.stack = traceback.StackSummary.from_list(keep)
    for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if other is not None:
            hidden += _hide_ours(other, seen)
    return hidden


def _print_traceback(e: BaseException, tb: Any) -> None:
    te = traceback.TracebackException(type(e), e, tb)
    hidden = _hide_ours(te, set())
    sys.stderr.write("".join(te.format()))
    if hidden:
        sys.stderr.write(f"[steadyclip doctor: {hidden} frame(s) of its observer hidden from this traceback; it "
                         "only records the call and passes it on unchanged]\n")


def main() -> int:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python boot.py SCRIPT [ARGS...]\n")
        return 2
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    obs = _observer()
    obs.install(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
    except BaseException as e:  # noqa: BLE001 - the script's own failure: shown as Python shows it
        tb = e.__traceback__
        while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != os.path.realpath(script):
            tb = tb.tb_next  # drop this launcher's and runpy's frames
        _print_traceback(e, tb or e.__traceback__)
        code = 1
    finally:
        sys.stdout.flush()
        obs.finish(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
