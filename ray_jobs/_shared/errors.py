"""How every `lplgrad` command ends on an error: one line for a person's mistake, a traceback for a bug.

A user error (bad config, missing or unreadable input, refused output, a storage that says no) is
printed as one line, ``lplgrad <command>: error: <what is wrong> (<how to fix it>)``, with exit
code 2 and no traceback; ``--debug`` (anywhere on the command line) or ``LPLGRAD_DEBUG=1`` shows
the traceback too. Any other exception is a bug in lplgrad: its traceback is kept and a last line
says so (exit code 1).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["USER_ERROR_EXIT", "is_user_error", "one_line_errors", "run_command", "strip_debug", "user_error_line"]

USER_ERROR_EXIT = 2
BUG_EXIT = 1

# Exception types raised for inputs, never for bugs: ValueError covers ConfigError, CheckpointError,
# EmptyPoolError and the config checks; OSError's subclasses cover missing paths, refused access,
# unreachable endpoints and run-id conflicts. PoolError, ManifestError and FeatureStoreError are
# matched by name so that this module imports nothing heavy.
_USER_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ConnectionError,
    IsADirectoryError,
    NotADirectoryError,
)
_USER_TYPE_NAMES = {
    "PoolError",
    "ManifestError",
    "FeatureStoreError",
    "ShardReadError",
    "CheckpointError",
    "ClusterPathError",
    "ClusterLostError",
    "StorageError",
}
# A fix for errors whose message does not already end with one, by type name (first match in the MRO).
_FIXES = {
    "ConfigError": "`lplgrad {command} --help` lists every key with its type and default",
    "CheckpointError": "pass checkpoint= a checkpoint directory written by `lplgrad train`",
    "PoolNotFoundError": "check the pool URI; a pool is a folder or prefix of .tar shards",
    "EmptyPoolError": "point pool= at a folder or prefix that holds .tar shards",
    "PoolError": "check the pool URI and its shards (`lplgrad pool` builds pools)",
    "UncommittedRunError": "name a committed run, or run the query again with the same run id",
    "RunConflictError": "choose a new run id",
    "ManifestError": "`lplgrad manifest verify RUN` lists what is wrong with a run",
    "StorageError": "check the URI, storage_options and credentials for this storage",
    "FeatureStoreError": "run `lplgrad features` to (re)build the feature store",
    "FileNotFoundError": "check the path or URI",
    "PermissionError": "check the credentials and permissions for this path or URI",
    "ConnectionError": "check the endpoint and the network",
    "ValueError": "`lplgrad {command} --help` lists the accepted values",
}


def strip_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there (or LPLGRAD_DEBUG is set)."""
    debug = "--debug" in argv or os.environ.get("LPLGRAD_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def _cause(error: BaseException) -> BaseException:
    # A RayTaskError wraps the exception a task raised; the person needs that one's message.
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a problem with the inputs (not a bug)."""
    error = _cause(error)
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, _USER_TYPES) or bool(names & _USER_TYPE_NAMES)


def user_error_line(command: str, error: BaseException) -> str:
    """``lplgrad <command>: error: <what is wrong> (<how to fix it>)`` on one line."""
    error = _cause(error)
    what = " ".join(str(error).split()) or type(error).__name__
    # torch's weights-only refusal advises retrying with the unsafe loader: never pass that on.
    what = re.sub(
        r"Weights only load failed\..*?trusted source\.",
        "refused: the file holds Python objects beyond tensors, and files are only read as data",
        what,
    )
    if isinstance(error, KeyError):
        what = f"missing {what}"
    if not what.endswith(")"):
        fix = next((_FIXES[c.__name__] for c in type(error).__mro__ if c.__name__ in _FIXES), None)
        if fix:
            what = f"{what} ({fix.format(command=command.split()[0])})"
    return f"lplgrad {command}: error: {what}"


def run_command(command: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body and turn what it raises into the exit code and message described above."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"lplgrad {command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001  (every exception ends here, classified)
        if is_user_error(error):
            if debug:
                traceback.print_exc()
            print(user_error_line(command, error), file=sys.stderr)
            return USER_ERROR_EXIT
        traceback.print_exc()
        print(
            f"lplgrad {command}: internal error: {type(error).__name__} is a bug in lplgrad, not in your inputs; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return BUG_EXIT


def one_line_errors(group: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    """Decorate the handler ``(args) -> int`` of ``lplgrad GROUP CMD``: a user error prints
    ``lplgrad GROUP CMD: error: ... (fix)`` and returns 2; a bug propagates with its traceback.
    ``CMD`` is read from ``args.<group>_command``."""

    def decorate(handler: Callable[[Any], int]) -> Callable[[Any], int]:
        @functools.wraps(handler)
        def guarded(args: Any) -> int:
            try:
                return handler(args)
            except Exception as error:  # noqa: BLE001  (classified; a bug is re-raised as it is)
                if not is_user_error(error):
                    raise
                print(user_error_line(f"{group} {getattr(args, f'{group}_command')}", error), file=sys.stderr)
                return USER_ERROR_EXIT

        return guarded

    return decorate
