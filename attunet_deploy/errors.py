"""Exception types and the exit status the CLI maps each one to."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """``attdeploy``'s exit statuses (docs/design.md section 5)."""

    OK = 0
    VERIFICATION_FAILED = 1
    USAGE = 2  # bad usage or input: one line on stderr
    INTERNAL = 3  # an unexpected error: always a bug
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM


class AttDeployError(Exception):
    """Base class: a problem the user can fix; its message names the fix."""

    exit_code: ExitStatus = ExitStatus.USAGE


class InputError(AttDeployError, ValueError):
    """Bad user input: a file, a shape, an option. Exit status 2.

    ``field`` names the setting at fault (e.g. ``check_rel_l2``) where the message is worded in
    domain terms; the CLI names the matching flag (``cli/options.flag_of``)."""

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BundleError(InputError):
    """A bundle is missing, incomplete, corrupted or from an unsupported schema."""


class CheckpointError(InputError):
    """A checkpoint cannot be read or does not match the Attention U-Net."""


class BackendUnavailable(AttDeployError):
    """A backend (TensorRT, CUDA, ONNX Runtime provider, torch) cannot run on this machine."""


class VerificationFailed(AttDeployError):
    """At least one backend missed its tolerance. Exit status 1."""

    exit_code = ExitStatus.VERIFICATION_FAILED


class BuildFailed(AttDeployError):
    """A TensorRT engine could not be built (or did not run the precision asked for). Exit status 1."""

    exit_code = ExitStatus.VERIFICATION_FAILED


class Interrupted(BaseException):
    """SIGTERM turned into an exception so that transactions are rolled back (exit 143)."""
