"""The hvdtrain command line. Commands parse, build a spec, and call one function; no logic lives here.

Nothing heavy is imported at module import time (`hvdtrain --help` must stay instant): torch and Horovod
are imported only inside the ranks.
"""

from __future__ import annotations

import functools
import sys

import click

from hvdtrain import __version__
from hvdtrain.errors import HvdtrainError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PASSTHROUGH = {**CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False}


def launch_options(f):
    """The options of every command that starts ranks (run, train, bench), defined once."""
    options = [
        click.option("-np", "--num-proc", "np", type=int, help="Number of ranks [default: all slots, or SLURM_NTASKS]."),
        click.option("-H", "--hosts", help="Hosts and slots, e.g. node1:4,node2:4 [default: localhost:NP]."),
        click.option("--hostfile", help="File of 'host slots=N' lines ('#' comments allowed)."),
        click.option("--gloo", is_flag=True, help="Use Horovod's Gloo controller (horovodrun only)."),
        click.option("--mpi", is_flag=True, help="Use Horovod's MPI controller."),
        click.option(
            "--launcher",
            help="horovodrun | mpirun | srun [default: srun inside a Slurm allocation, else horovodrun].",
        ),
        click.option(
            "--env", "env", multiple=True, metavar="NAME[=VALUE]", help="Forward NAME (or set it) on every rank; repeatable."
        ),
        click.option("--output-dir", help="Directory for per-rank logs rank.R.log [default: temporary, kept on failure]."),
        click.option("--threads-per-rank", type=int, help="OMP_NUM_THREADS per rank [default: cores / ranks per host]."),
        click.option("--dry-run", is_flag=True, help="Print the exact command and environment additions; run nothing."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def handle_errors(f):
    """Turn hvdtrain's errors into one line on stderr and the error's exit status (2 for bad input)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except HvdtrainError as e:
            click.echo(f"hvdtrain: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


class OneLineErrors(click.Group):
    """Click's usage errors as one line (`hvdtrain: error: ...`) with exit status 2, like our own errors."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) else "hvdtrain"
            click.echo(f"hvdtrain: error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="hvdtrain")
def cli():
    """hvdtrain: launch and train PyTorch models on many ranks with Horovod (MPI or Gloo), locally or on Slurm."""


@cli.command(context_settings=PASSTHROUGH)
@launch_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run(command, dry_run, **launch):
    """Launch COMMAND on N ranks: hvdtrain run -np 2 -- python train.py --lr 0.1

    Everything after -- is passed through untouched. Per-rank logs go to --output-dir; when a rank fails,
    the exit status is the job's and the failing rank's last lines are shown.
    """
    from hvdtrain import launch as L

    spec = L.make_spec(command, **launch)
    sys.exit(L.run_job(spec, dry_run=dry_run))


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@handle_errors
def doctor(as_json):
    """Check this machine: versions, Horovod's build, launchers on PATH, cores, memory, GPUs.

    Exits non-zero naming what is missing and how to fix it.
    """
    from hvdtrain import doctor as D

    report = D.collect()
    click.echo(D.to_json(report) if as_json else D.to_table(report))
    sys.exit(0 if not report["problems"] else 1)


def main():
    cli(prog_name="hvdtrain")


if __name__ == "__main__":
    main()
