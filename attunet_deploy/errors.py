"""Exception types that the CLI maps to exit codes (2: usage/input, 1: verification failed)."""

from __future__ import annotations


class AttDeployError(Exception):
    """Base class: a problem the user can fix; its message names the fix."""

    exit_code = 2


class InputError(AttDeployError, ValueError):
    """Bad user input: a file, a shape, an option. Exit status 2."""


class BundleError(InputError):
    """A bundle is missing, incomplete, corrupted or from an unsupported schema."""


class CheckpointError(InputError):
    """A checkpoint cannot be read or does not match the Attention U-Net."""


class BackendUnavailable(AttDeployError):
    """A backend (TensorRT, CUDA, ONNX Runtime provider, torch) cannot run on this machine."""


class VerificationFailed(AttDeployError):
    """At least one backend missed its tolerance. Exit status 1."""

    exit_code = 1


class BuildFailed(AttDeployError):
    """A TensorRT engine could not be built (or did not run the precision asked for). Exit status 1."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGTERM turned into an exception so that transactions are rolled back (exit 143)."""
