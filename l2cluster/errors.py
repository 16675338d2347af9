"""One hierarchy for the errors l2cluster raises on purpose, and the one place that says which exit code each means.

    L2ClusterError                 anything l2cluster raises on purpose
    ├── InputError                 bad input, or something around it the user can fix (exit code 2, one line)
    │   ├── NotFoundError          no experiment, job or plugin by that name, or an ambiguous id prefix
    │   ├── SpecError, PluginError, DataError, StoreError, DaemonError, ExportError, …
    └── HookError, CheckpointWriteError, InvalidTransition, …   failures and bugs: not the input's fault

Each module defines its own errors on these bases (they keep their builtin bases too: a SpecError is still a
ValueError, a NotFoundError a KeyError). Plain Python, no imports: the CLI maps errors without loading torch or Ray.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed, diverged or was cancelled
EXIT_USAGE = 2  # bad input, or no daemon to talk to: the message says what to do
EXIT_INTERRUPTED = 130  # Ctrl-C


class L2ClusterError(Exception):
    """Base of every error l2cluster raises on purpose."""


class InputError(L2ClusterError):
    """Bad input, or something around it the user can fix (a missing file, no daemon): reported as one line that
    names the fix, exit code 2."""

    def render(self) -> str:
        """What the CLI prints."""
        return f"error: {self}"


class NotFoundError(InputError, KeyError):
    """No experiment, job or plugin by that name, or an id prefix that matches several: the message says which
    exist. A KeyError too, for code that looks things up in mappings."""

    def __str__(self) -> str:  # KeyError would print its message quoted, as a key
        return str(self.args[0]) if self.args else ""


def exit_code(error: BaseException) -> int | None:
    """The CLI's exit code for an error it reports itself; None: not the input's fault (a bug), let it raise."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, InputError):
        return EXIT_USAGE
    return None
