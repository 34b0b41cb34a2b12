"""The `bcpkd` command: the Typer app, assembled from the thin commands of bcpkd_cli/commands/ (each parses flags
into a recipe and calls one stage), and main(), which turns errors into exit codes.

stdout carries what scripts consume (artifact paths, or JSON with --json); everything else goes to
stderr. Exit codes: 0 success, 2 bad input, 1 failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as
batch systems send when they end or preempt a job); both say what was saved and the command that continues.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import warnings
from importlib.metadata import version
from pathlib import Path

import typer

from bcpkd_cli import resumption
from bcpkd_cli.commands import deploy, evaluation, training
from bcpkd_cli.console import line
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from bcpkd_cli.models.foreign import reset_trust

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Knowledge distillation from Bayesian teachers through cached Bayes class probabilities. "
                       "Stages chain through files: train-teacher -> calibrate (optional) -> distill -> evaluate; "
                       "`run RECIPE` runs them all. Every stage prints its artifact's path on stdout.")


def _version(show: bool) -> None:
    if show:
        print(f"bcpkd {version('bcpkd')}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the version and exit")) -> None:
    """Knowledge distillation from Bayesian teachers."""


# The commands, in the order of a pipeline (and of `bcpkd --help`).
app.command("train-teacher")(training.train_teacher)
app.command()(training.calibrate)
app.command()(training.distill)
app.command()(evaluation.evaluate)
app.command()(evaluation.run)
app.command()(deploy.export)
app.command()(deploy.predict)
app.command()(evaluation.plot)


def _set_with_a_space(argv: list[str]) -> None:
    """`--set key value` (a space instead of =): the same message as other --set mistakes, before Typer reads
    `value` as a stray argument."""
    for flag, item, following in zip(argv, argv[1:], argv[2:] + [""]):
        if flag in ("--set", "-s") and "=" not in item:
            example = f"{item}={following}" if following and not following.startswith("-") else f"{item}=VALUE"
            raise BcpkdError(f"--set {item!r}: expected section.key=value, e.g. --set {example}")


_terminated = False  # SIGTERM ended the command (exit 143), not Ctrl-C (130)


def _terminate(signum, frame) -> None:
    """SIGTERM (a batch system ending or preempting the job) ends the command as Ctrl-C does: what is finished
    stays, and the message names what was saved and how to continue."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _names_out(args: list[str]) -> bool:
    """Whether a command line names its output folder (--out DIR, --out=DIR, -o DIR, -oDIR)."""
    return any(a in ("--out", "-o") or a.startswith("--out=") or (a.startswith("-o") and not a.startswith("--"))
               for a in args)


def resume_command(argv: list[str], out: Path, resume: bool = True) -> str:
    """The command as the user typed it (`argv`: sys.argv[1:]), with `--out out` if it named no --out (the folder
    was generated), and with --resume instead of --force (`resume`)."""
    args = [a for a in argv if not resume or a not in ("--force", "--resume")]
    if not _names_out(args):
        args += ["--out", str(out)]
    if resume:
        args.append("--resume")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = ["bcpkd"] if world == 1 else ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', world)}",
                                           "-m", "bcpkd_cli"]  # the same processes: a resumed run needs them
    return shlex.join([*launch, *args])


def interrupted_message(terminated: bool) -> str:
    """What a Ctrl-C or SIGTERM leaves: the folder, the last epoch it saved and the command that continues."""
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    run = resumption.progress
    if run is None:
        return (f"{what}: finished artifacts are kept, unfinished ones were not written (train-teacher and distill "
                f"continue from their last epoch end with --resume)")
    of = f" of {run.epochs}" if run.epochs else ""  # (states saved before they held their run's epochs: not)
    phase = f" ({run.phase})" if run.phase not in ("", "teacher") else ""  # train-state-PHASE.pt: member2, mcmi
    saved = f"{run.folder} holds the state of epoch {run.epoch}{of}{phase}" if run.epoch else ""
    if run.whole_run:
        saved = f"{run.out} keeps the teachers and students that finished" + (f"; {saved}" if saved else "")
    if run.resumable:
        saved = saved or f"{run.out} holds the state of its last epoch end"
        return f"{what}: {saved}; continue with: {resume_command(sys.argv[1:], run.out)}"
    return (f"{what} before the first epoch end: {run.out} holds no state to continue; start again with: "
            f"{resume_command(sys.argv[1:], run.out, resume=False)}")


def main() -> None:
    global _terminated
    warnings.filterwarnings("ignore", category=FutureWarning)
    resumption.begin_command()
    _terminated, signals = False, threading.current_thread() is threading.main_thread()  # (tests call main too)
    previous = signal.signal(signal.SIGTERM, _terminate) if signals else None
    try:
        reset_trust()
        _set_with_a_space(sys.argv[1:])
        code = app(standalone_mode=False)  # typer returns 130 after a Ctrl-C inside a command
        if code == 130:
            raise KeyboardInterrupt
    except BcpkdError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # usage errors: unknown option, bad choice, missing argument
        ctx = getattr(err, "ctx", None)
        where = f"; see {ctx.command_path} --help" if ctx is not None else ""
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        print(f"error: {' '.join(message.split()).rstrip('.')}{where}", file=sys.stderr)  # one line, as every refusal
        sys.exit(getattr(err, "exit_code", 2))
    except BcpkdFailure as err:
        print(f"failed: {err}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        if signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while saying so ends the process
        line(interrupted_message(_terminated))  # rank 0 only under torchrun
        sys.exit(143 if _terminated else 130)
    finally:
        if signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
