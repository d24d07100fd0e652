"""User mistakes, reported in one clear message without a traceback; everything else keeps its traceback.

A mistake in the command, the config or the files (a bad name, a missing path, a checkpoint that does not fit)
raises a UserError subclass whose message names the problem and the fix. The entry points (train.py, sample.py,
extract_latents.py, `python -m evaluation`) print it and exit with status 2; HYDRA_FULL_ERROR=1 (or the
evaluation CLI's --debug) shows the traceback too. The subclasses are also the built-in types callers expect
(ConfigError is a ValueError, MissingFile a FileNotFoundError).
"""

import functools
import os
import sys


class UserError(Exception):
    """A mistake of the user, not a bug: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting that is unknown, out of range or inconsistent with the others or with the files."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the run needs is not there (data, checkpoint, reference, weights)."""


class BadInput(UserError, RuntimeError):
    """An input file that cannot be read (a damaged image, a truncated array)."""


class Diverged(UserError, RuntimeError):
    """Training produced a non-finite loss or gradient (or would write a non-finite checkpoint)."""


EXIT_USER_ERROR = 2


def report_user_errors(main, debug=None):
    """Wrap an entry point: a UserError prints `error: <message>` to stderr and exits with status 2, unless
    HYDRA_FULL_ERROR=1 or debug() is true, when it propagates with its traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or (debug is not None and debug()):
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
    return wrapped
