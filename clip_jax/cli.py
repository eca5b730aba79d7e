"""The `main` of every command line: a user's mistake is one line on stderr and exit status 2.

    sys.exit(cli.run(body))                      # argparse commands
    cli.run_absl(body, argv, check_argv=...)     # absl commands (train, evaluate)

`body` is the command after its arguments are parsed. A `UserError` (config, data, evaluation,
conversion...) or an operating-system error on a user's path (missing, not a folder, not
writable) prints `error: MESSAGE`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from clip_jax.errors import UserError

# OSError covers a path that is missing, a file where a folder belongs, no permission, or a
# read-only file system.
USER_ERRORS = (UserError, OSError)


def describe(error: BaseException) -> str:
    """The one-line message of a user error."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"cannot use {error.filename}: {error.strerror}"
    return str(error)


def report(error: BaseException | str, prefix: str = "error") -> int:
    """Prints the error on stderr; returns the exit status for user errors, 2."""
    message = error if isinstance(error, str) else describe(error)
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return 2


def run(body: Callable[[], int | None], prefix: str = "error") -> int:
    """Runs a command's body; returns its exit status (2 after a user error)."""
    try:
        return body() or 0
    except USER_ERRORS as e:
        return report(e, prefix)


def _flag_error_message(error: flags.Error) -> str:
    """absl wraps errors raised while a flag parses (a config file's `get_config`, say) in a
    message holding their traceback; the user needs its last line, the error itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        _, _, last = lines[-1].partition(": ")
        return last or lines[-1]
    return " ".join(lines)


def run_absl(
    body: Callable[[], int | None],
    argv: list[str] | None = None,
    *,
    check_argv: Callable[[list[str]], None] | None = None,
) -> None:
    """`absl.app.run` with the same error handling as `run`, flag parsing included.

    `check_argv(argv)` runs before absl parses the flags, for errors that absl would report
    as a traceback (an unknown `--config.KEY`). The console shows warnings and errors only,
    unless `--verbosity` asks for more (orbax and tfds log every file at INFO).
    """

    def parse(args: list[str]) -> list[str]:
        try:
            if check_argv is not None:
                check_argv(args)
            return flags.FLAGS(args)
        except USER_ERRORS as e:
            sys.exit(report(e))
        except flags.Error as e:
            sys.exit(report(_flag_error_message(e)))

    def main(_):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        status = run(body)
        if status:
            sys.exit(status)

    app.run(main, argv=argv, flags_parser=parse)
