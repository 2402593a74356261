"""How an experiment runs from the command line: an error is one message for people.

    if __name__ == "__main__":
        cli.run(main)   # main(argv): `--config FILE key=value ...` (config.from_command_line)

An experiment that stops on bad input, a full disk, a missing permission or another run in its
folder prints one message (the cause, the path, what to do) and exits with status 1. Its
traceback goes to the run's log (`out_dir/log.txt`, once the run has opened its folder), or to
the terminal with `--debug`. A bad key or value exits with status 2 before any work (argparse's
usage error); Ctrl-C exits with 130 and SIGTERM with 143, each once the open `with` blocks have
closed (a checkpoint being written is finished, no thread is left to print at exit). What was
written before the error stays (results files are replaced atomically, checkpoints finalized
only when complete), so a rerun resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from jaxlab import results

DEBUG_FLAG = "--debug"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """`main(argv)` (default: the command line's arguments); an exception it raises becomes
    one message on stderr and exit status 1, its traceback logged (`--debug`: printed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    results.close_run_log()  # the log `main` opens is the one its traceback goes to
    _one_line_per_message()
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except (KeyboardInterrupt, Terminated) as e:
        name, status = (("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130))
        print(f"stopped ({name}); a rerun resumes from what was written", file=sys.stderr)
        raise SystemExit(status) from None
    except Exception as e:
        logged = log_traceback(e)
        print(f"error: {describe(e)}", file=sys.stderr)
        if DEBUG_FLAG in argv:
            traceback.print_exception(e)
        else:
            print(f"(the traceback is in {logged}; {DEBUG_FLAG} prints it here)" if logged
                  else f"({DEBUG_FLAG} prints the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, before)


def describe(e: BaseException) -> str:
    """One message for people:

    - jaxlab's own errors: their message (it names the cause, the file and what to do), with
      what to do about a full disk added when one caused them;
    - a full disk or a missing permission (an OSError, or TensorStore's error for one, raised or
      causing `e`): the path and what to do;
    - a step run as a process of its own (CalledProcessError): which one stopped;
    - a plain ValueError or RuntimeError: its message; anything else: its type and message.
    """
    cause = os_error(e)
    full = cause is not None and cause.errno in NO_SPACE
    if type(e).__module__.startswith("jaxlab"):
        return (str(e) or type(e).__name__) + (f" ({cause.strerror}); {FREE_SPACE}" if full
                                               else "")
    if full:
        where = f" to write {cause.filename}" if cause.filename else ""
        return f"no space left{where} ({cause.strerror}): {FREE_SPACE}"
    if cause is not None and cause.errno in NO_PERMISSION:
        where = f" for {cause.filename}" if cause.filename else ""
        return (f"permission denied{where} ({cause.strerror}): change its permissions, or "
                f"choose an out_dir you may write to (and inputs you may read)")
    if isinstance(e, subprocess.CalledProcessError):
        return f"{_command(e.cmd)} stopped with exit status {e.returncode} (its message is above)"
    text = str(e) or type(e).__name__
    return text if type(e) in (ValueError, RuntimeError) else f"{type(e).__name__}: {text}"


FREE_SPACE = ("free some space, or choose an out_dir on another disk, and rerun; it resumes "
              "from what was written")


def _command(cmd) -> str:
    """The script (or module) a command line runs: `python x.py ...` -> x.py, `python -m m`
    -> m."""
    parts = [str(part) for part in cmd] if isinstance(cmd, (list, tuple)) else str(cmd).split()
    for i, part in enumerate(parts):
        if part.endswith(".py") or (i and parts[i - 1] == "-m"):
            return part
    return " ".join(parts[:3])


def os_error(e: BaseException | None) -> OSError | None:
    """`e` if it is an OSError with an errno, else the first such among its causes (the
    context of an exception raised `from None` excluded); an error of TensorStore (Orbax's
    writer), which names the failed call's errno as `[os_error_code='28']` and its folder as
    `local file "PATH"`, as that OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code is not None:
            path = re.search(r'local file "([^"]+)"', str(e))
            number = int(code.group(1))
            return OSError(number, os.strerror(number), path.group(1) if path else None)
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def _one_line_per_message() -> None:
    """Gives the root logger one stderr handler for other libraries' warnings, in place of the
    plain one that a first `logging.info(...)` call (as Orbax makes) would add: jaxlab's lines
    show once, through its own handler (`results.open_run`)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, _Others)]:
        root.removeHandler(handler)
    root.addHandler(_Others())


class _Others(logging.StreamHandler):
    """Warnings and errors of loggers other than jaxlab's once it has handlers of its own, on
    the `sys.stderr` of the moment (as logging's last-resort handler)."""

    def __init__(self):
        super().__init__()
        self.setLevel(logging.WARNING)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] == "jaxlab" and logging.getLogger("jaxlab").handlers
        return not ours and super().filter(record)


def log_traceback(e: BaseException) -> str | None:
    """Appends `e`'s traceback to the log file of the open run (`results.open_run`'s
    log.txt); its path, or None when there is no run log or it cannot be written."""
    for handler in logging.getLogger("jaxlab").handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                with open(handler.baseFilename, "a") as f:
                    f.write("".join(traceback.format_exception(e)))
            except OSError:
                return None
            return handler.baseFilename
    return None
