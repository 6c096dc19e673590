"""The ``attdeploy`` group and its error policy: every error is one stderr line and an
:class:`~attunet_deploy.errors.ExitStatus`; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any

import click

from attunet_deploy.errors import AttDeployError, ExitStatus, Interrupted


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


class _Group(click.Group):
    """Every error is one stderr line with its exit code; tracebacks only with --debug."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        debug = "--debug" in (sys.argv[1:] if args is None else list(args)) or os.environ.get("ATTDEPLOY_DEBUG") == "1"
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(ExitStatus.INTERRUPTED)
        except click.ClickException as exc:
            if debug:
                raise
            ctx = getattr(exc, "ctx", None)  # usage errors carry the command's context
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            click.echo(f"error: {_one_line_text(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else ExitStatus.OK)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("ATTDEPLOY_DEBUG") == "1"
        try:
            if threading_main():
                signal.signal(signal.SIGTERM, _on_sigterm)  # roll transactions back, then exit 143
        except (ValueError, OSError):
            pass
        with warnings.catch_warnings(record=True) as caught:
            # Library warnings (torch, numpy, nibabel, onnx) are not the user's business unless
            # they debug: errors that matter are raised as one-line errors by our own checks.
            warnings.simplefilter("always" if debug else "ignore")
            try:
                return super().invoke(ctx)
            except AttDeployError as exc:
                if debug:
                    raise
                click.echo(f"error: {_one_line_text(worded_for_cli(exc))}", err=True)
                ctx.exit(exc.exit_code)
            except (click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                click.echo("interrupted: nothing was changed by the unfinished step", err=True)
                ctx.exit(ExitStatus.INTERRUPTED)
            except Interrupted:
                click.echo("terminated: nothing was changed by the unfinished step", err=True)
                ctx.exit(ExitStatus.TERMINATED)
            except MemoryError:
                click.echo("error: out of memory: use smaller images or batches", err=True)
                ctx.exit(ExitStatus.USAGE)
            except Exception as exc:
                # A signal that lands inside a C extension's import surfaces as "ImportError:
                # initialization failed" wrapping the interruption: it is still an interruption.
                cause = _interruption_in(exc)
                if cause is not None and not debug:
                    interrupted = isinstance(cause, KeyboardInterrupt)
                    click.echo(f"{'interrupted' if interrupted else 'terminated'}: nothing was changed by the "
                               "unfinished step", err=True)
                    ctx.exit(ExitStatus.INTERRUPTED if interrupted else ExitStatus.TERMINATED)
                if debug:
                    raise
                click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                           "(rerun with --debug for the traceback)", err=True)
                ctx.exit(ExitStatus.INTERNAL)
            finally:
                if debug:
                    for w in caught:
                        click.echo(f"warning: {w.category.__name__}: {_one_line_text(str(w.message))}", err=True)


def _interruption_in(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Interrupted in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


#: Settings fields whose flag is not "--" + the field with dashes.
FIELD_FLAGS = {"precisions": "--precision", "fp16_keep_fp32": "--fp16-keep-fp32", "keep_archive": "--keep-archive",
               "quiet_seconds": "--quiet-seconds", "sw_mode": "--sw-mode", "segments": "--segment",
               "model": "MODEL", "out": "-o"}


def flag_of(field: str) -> str:
    """The CLI flag of a settings field (``check_rel_l2`` -> ``--check-rel-l2``): the one map from the
    domain's words to the command line's."""
    return FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def worded_for_cli(exc: BaseException) -> str:
    """An error's message, led by the flag to change where it names a settings field."""
    field = getattr(exc, "field", None)
    text = str(exc) or type(exc).__name__
    return f"{flag_of(field)}: {text}" if isinstance(field, str) and field else text


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line_text(text: str) -> str:
    text = " ".join(text.split())
    return text[:1500]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:1500] if text else type(exc).__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="attunet-deploy", prog_name="attdeploy")
def main(debug: bool) -> None:
    """Attention U-Net: PyTorch checkpoint -> ONNX / INT8 / FP16 -> TensorRT, verified and benchmarked."""


