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

DEBUG_FLAG = "--debug"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """`main(argv)` (default: the command line's arguments); an exception it raises becomes
    one message on stderr and exit status 1, its traceback logged (`--debug`: printed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _close_run_log()  # the log `main` opens is the one its traceback goes to
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
    """One message for people: for a full disk or a missing permission (an OSError, or one
    that caused `e`), the path and what to do; for a step run as a process of its own (a
    CalledProcessError), which one stopped; otherwise `e`'s own message (with its type
    when it comes from outside jaxlab and is not a plain ValueError or RuntimeError)."""
    cause = os_error(e)
    if cause is not None and cause.errno in NO_SPACE + NO_PERMISSION:
        where = cause.filename or "a file"
        if cause.errno in NO_SPACE:
            return (f"no space left to write {where} ({cause.strerror}): free some space, or "
                    f"choose an out_dir on another disk, and rerun; it resumes from what was "
                    f"written")
        return (f"no permission to write {where} ({cause.strerror}): choose an out_dir you "
                f"may write to, or change its permissions")
    if isinstance(e, subprocess.CalledProcessError):
        step = " ".join(str(part) for part in e.cmd[1:2]) if isinstance(e.cmd, list) else e.cmd
        return f"{step} stopped with exit status {e.returncode} (its message is above)"
    text = str(e) or type(e).__name__
    if type(e).__module__.startswith("jaxlab") or type(e) in (ValueError, RuntimeError):
        return text
    return f"{type(e).__name__}: {text}"


def os_error(e: BaseException | None) -> OSError | None:
    """`e` if it is an OSError with an errno, else the first such among its causes; an error
    of TensorStore (Orbax's writer), which names the failed call's errno as
    `[os_error_code='28']` and its folder as `local file "PATH"`, as that OSError."""
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
        e = e.__cause__ or e.__context__
    return None


def _one_line_per_message() -> None:
    """Gives the root logger one stderr handler for other libraries' warnings, in place of the
    plain one that a first `logging.info(...)` call (as Orbax makes) would add: jaxlab's lines
    show once, through its own handler (`results.open_run`)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, _Others)]:
        root.removeHandler(handler)
    root.addHandler(_Others(sys.stderr))


class _Others(logging.StreamHandler):
    """Warnings and errors of loggers other than jaxlab's once it has handlers of its own."""

    def __init__(self, stream):
        super().__init__(stream)
        self.setLevel(logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] == "jaxlab" and logging.getLogger("jaxlab").handlers
        return not ours and super().filter(record)


def _close_run_log() -> None:
    """Detaches the log file of a run opened earlier in this process (if any)."""
    logger = logging.getLogger("jaxlab")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


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
