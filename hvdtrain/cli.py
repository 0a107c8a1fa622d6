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


def _parse_balance(ctx, param, value):
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(v) for v in str(value).split(",")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of layer counts, e.g. 3,4") from None


def train_options(f):
    """One option per TrainConfig field, with the field's help; `--flag/--no-flag` for booleans."""
    import dataclasses
    import typing

    from hvdtrain.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_text = field.metadata.get("help", "")
        if base is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", default=field.default, show_default=True, help=help_text)
        elif field.name == "balance":
            option = click.option(flag, callback=_parse_balance, metavar="N,N,...", help=help_text)
        else:
            option = click.option(flag, type=base, default=field.default, show_default=field.default is not None, help=help_text)
        f = option(f)
    return f


def _config_file(ctx, param, value):
    """--config FILE.yaml fills click's default_map: precedence is CLI > file > defaults."""
    if value:
        from hvdtrain.config import load_yaml_defaults

        valid = {p.name for p in ctx.command.params if p.name not in ("config", "dry_run")}
        try:
            ctx.default_map = {**(ctx.default_map or {}), **load_yaml_defaults(value, valid)}
        except HvdtrainError as e:
            raise click.BadParameter(str(e).removeprefix("--config: "), ctx=ctx, param=param) from None
    return value


@cli.command(context_settings=CONTEXT)
@launch_options
@train_options
@click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_config_file,
    help="YAML file of option: value defaults (keys as the long options, - or _); CLI flags override it.",
)  # fmt: skip
@handle_errors
def train(dry_run, **options):
    """Train a model on N ranks with Horovod: the CNN on scikit-learn's digits by default.

    \b
      hvdtrain train -np 2                                  # data parallel, prints test accuracy
      hvdtrain train -np 1 --strategy model --devices-per-rank 2 --micro-batches 4
      hvdtrain train -np 2 --strategy hybrid --devices-per-rank 2
      hvdtrain train -np 2 --run-dir runs/a --checkpoint-every 50 ... then --resume

    The run directory gets config.json, metrics.jsonl, TensorBoard events, checkpoints/, result.json and
    logs/ (one log per rank).
    """
    from hvdtrain import jobs

    sys.exit(jobs.train(options, dry_run=dry_run, echo=click.echo))


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


@cli.group(context_settings=CONTEXT)
def bench():
    """Benchmarks: allreduce bandwidth, and training throughput with scaling and side-by-side ratios.

    Each prints a table and writes JSON and a PNG into --out; --tiny is a seconds-long smoke run.
    """


@bench.command("allreduce", context_settings=CONTEXT)
@launch_options
@click.option("--out", default="runs/bench-allreduce", show_default=True, help="Directory for allreduce.json/.png, parts/, logs/.")
@click.option("--sizes", help="Comma-separated message sizes, e.g. 4,1KiB,64MiB (excludes --min/--max-bytes).")
@click.option("--min-bytes", help="Smallest message [default: 4]; K/M/G are binary, e.g. 1KiB.")
@click.option("--max-bytes", help="Largest message [default: 256MiB].")
@click.option("--step-factor", type=int, default=2, show_default=True, help="Multiply the size by this each step.")
@click.option("--warmup", type=int, help="Untimed calls per size [default: 5; tiny: 1].")
@click.option("--iters", type=int, help="Timed calls per size up to 16 MiB, fewer above [default: 20; tiny: 3].")
@click.option("--tiny", is_flag=True, help="A few small sizes and iterations: the smoke run of the test suite.")
@handle_errors
def bench_allreduce(dry_run, out, sizes, min_bytes, max_bytes, step_factor, warmup, iters, tiny, **launch):
    """Allreduce time, algbw and busbw = algbw x 2(n-1)/n against message size, for Horovod (MPI and Gloo
    controllers) beside mpi4py Allreduce, torch.distributed gloo all_reduce and local memcpy.

    \b
      hvdtrain bench allreduce -np 2                       # 4 B .. 256 MiB, both controllers
      hvdtrain bench allreduce -np 2 --mpi --sizes 64MiB    # one controller, one size
    """
    from hvdtrain.bench import allreduce as A

    plan = A.make_plan(
        out, sizes=sizes, min_bytes=min_bytes, max_bytes=max_bytes, step_factor=step_factor, warmup=warmup,
        iters=iters, tiny=tiny, launch=launch,
    )  # fmt: skip
    A.run(plan, dry_run=dry_run, echo=click.echo)


@bench.command("train", context_settings=CONTEXT)
@launch_options
@click.option("--out", default="runs/bench-train", show_default=True, help="Directory for train.json/.png, parts/, logs/.")
@click.option("--max-np", type=int, help="Sweep np = 1..N [default: -np, else the cores, else SLURM_NTASKS].")
@click.option("--models", help="Comma-separated model shapes [default: deep_mlp,wide_mlp].")
@click.option("--arms", help="Comma-separated arms: horovod, trainer, ddp [default: all three]; trainer_lean (diagnostic).")
@click.option("--batch-size", type=int, help="Samples per rank per batch [default: 32; tiny: 16].")
@click.option("--warmup", type=int, help="Untimed warm-up batches [default: 10; tiny: 2].")
@click.option("--iters", type=int, help="Timed iterations per round [default: 10; tiny: 3].")
@click.option("--batches-per-iter", type=int, help="Batches per timed iteration [default: 10; tiny: 2].")
@click.option("--rounds", type=int, help="Repeat every measurement, alternating arm order [default: 2; tiny: 1].")
@click.option("--ablations/--no-ablations", default=True, show_default=True, help="Also fusion off and fp16 compression.")
@click.option("--tiny", is_flag=True, help="Small models and few batches: the smoke run of the test suite.")
@handle_errors
def bench_train(dry_run, out, max_np, models, arms, batch_size, warmup, iters, batches_per_iter, rounds, ablations, tiny, **launch):
    """Synthetic-data training throughput for np = 1..N (one thread per rank): weak-scaling efficiency, tensor
    fusion and fp16 ablations, and the hvdtrain Trainer vs a minimal Horovod loop vs torch DDP (gloo).

    \b
      hvdtrain bench train --max-np 2                      # MPI controller unless --gloo
      hvdtrain bench train --max-np 2 --models wide_mlp --no-ablations
    """
    from hvdtrain.bench import throughput as T

    plan = T.make_plan(
        out, max_np=max_np, models=models, arms=arms, batch_size=batch_size, warmup=warmup, iters=iters,
        batches_per_iter=batches_per_iter, rounds=rounds, ablations=ablations, tiny=tiny, launch=launch,
    )  # fmt: skip
    T.run(plan, dry_run=dry_run, echo=click.echo)


# --- Slurm: submit, status, logs -------------------------------------------------------------------------
@cli.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes (sbatch --nodes).")
@click.option("--ntasks-per-node", type=int, help="Ranks per node [default: --gpus-per-node / --gpus-per-rank, else 1].")
@click.option("--gpus-per-node", type=int, help="GPUs per node (sbatch --gpus-per-node); one per rank unless --gpus-per-rank.")
@click.option("--gpus-per-rank", type=int, help="Hybrid jobs: GPUs pinned to each rank by local rank.")
@click.option("--cpus-per-task", type=int, help="Cores per rank (sbatch --cpus-per-task).")
@click.option("--mem", help="Memory per node, e.g. 8G (sbatch --mem).")
@click.option("--time", help="Time limit: minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time).")
@click.option("--partition", help="Partition (sbatch --partition) [default: the cluster's].")
@click.option("--account", help="Account to charge (sbatch --account).")
@click.option("--array", help="Job array, e.g. 0-2; {task} in COMMAND becomes the task id (sbatch --array).")
@click.option("--requeue/--no-requeue", default=True, show_default=True, help="Let the job requeue itself after preemption.")
@click.option("--signal", default="USR2@120", show_default=True, help="Warning signal to every rank before the time limit; '' for none.")
@click.option("--job-name", default="hvdtrain", show_default=True, help="Job name (sbatch --job-name).")
@click.option("--run-dir", help="Directory for job.sbatch, slurm-<id>.out and logs/ [default: runs/slurm-<time>].")
@click.option("--launcher", default="srun", show_default=True, help="srun | mpirun: how ranks of a non-hvdtrain COMMAND start.")
@click.option("--dry-run", is_flag=True, help="Print the job script and the sbatch command; submit nothing.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def submit(command, dry_run, **options):
    """Submit COMMAND as a Slurm batch job: hvdtrain submit --nodes 2 --ntasks-per-node 4 -- hvdtrain train ...

    \b
      hvdtrain submit --ntasks-per-node 2 --run-dir runs/a -- hvdtrain train --run-dir runs/a
      hvdtrain submit --array 0-2 -- hvdtrain train -np 1 --seed {task} --run-dir 'runs/s/{task}'
      hvdtrain submit --ntasks-per-node 2 -- python my_train.py      # started on every rank by srun

    Renders the job script deterministically into the run directory, submits it with sbatch, and prints the
    job id and where the logs go. `hvdtrain ...` commands start their own ranks inside the allocation; other
    commands are started on every rank with srun --mpi=pmix (or mpirun).
    """
    from hvdtrain import slurm as S

    spec = S.make_spec(**options)
    S.submit(spec, list(command), dry_run=dry_run, echo=click.echo)


@cli.command(context_settings=CONTEXT)
@click.argument("job_id", metavar="JOBID")
@handle_errors
def status(job_id):
    """State of a Slurm job (each task of an array): state, reason, run time, restarts, node, output file."""
    from hvdtrain import slurm as S

    sys.exit(S.status(job_id, echo=click.echo))


@cli.command(context_settings=CONTEXT)
@click.argument("job_id", metavar="JOBID")
@click.option("--rank", type=int, help="Show this rank's log instead of the job's output.")
@click.option("--lines", "-n", type=int, default=0, help="Only the last N lines [default: all].")
@handle_errors
def logs(job_id, rank, lines):
    """Print a Slurm job's output file, or one rank's log (--rank R); array tasks as JOBID_TASK."""
    from hvdtrain import slurm as S

    sys.exit(S.logs(job_id, rank=rank, lines=lines, echo=click.echo))


def main():
    cli(prog_name="hvdtrain")


if __name__ == "__main__":
    main()
