"""The hvdtrain command line. Commands parse, build a spec, and call one function; no logic lives here.

Nothing heavy is imported at module import time (`hvdtrain --help` must stay instant): torch and Horovod
are imported only inside the ranks.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from hvdtrain import __version__
from hvdtrain.clickopts import (
    CONTEXT,
    PASSTHROUGH,
    OneLineErrors,
    PlotPath,
    bench_options,
    config_file,
    dataclass_options_subset,
    elastic_options,
    launch_options,
    slurm_options,
    train_options,
)

MPI_PACKAGES = ("horovod", "mpi4py")  # what `run` warns about when built against another MPI than the launcher's


@click.group(cls=OneLineErrors, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="hvdtrain")
@click.option(
    "--debug", is_flag=True, expose_value=False,
    help="Show a failure's Python traceback here too (also HVDTRAIN_DEBUG=1); it is always kept in a log.",
)  # fmt: skip
def cli():
    """hvdtrain: launch and train PyTorch models on many ranks with Horovod (MPI or Gloo), locally or on Slurm."""


@cli.command(context_settings=PASSTHROUGH)
@launch_options
@elastic_options
@click.option(
    "--timeline", is_flag=True,
    help="Record Horovod's timeline (HOROVOD_TIMELINE) into OUTPUT_DIR/timeline.json [--output-dir default: "
    "runs/run-<time>]; `hvdtrain timeline` summarizes it.",
)  # fmt: skip
@click.option(
    "--autotune", is_flag=True,
    help="Horovod's autotuner (HOROVOD_AUTOTUNE), its log in OUTPUT_DIR/autotune.csv [--output-dir default: "
    "runs/run-<time>].",
)  # fmt: skip
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command, dry_run, timeline, autotune, **options):
    """Launch COMMAND on N ranks: hvdtrain run -np 2 -- python train.py --lr 0.1

    Everything after -- is passed through untouched. Per-rank logs go to --output-dir; when a rank fails,
    the exit status is the job's and the failing rank's last lines are shown.

    \b
    Elastic (the script uses hvd.elastic.run):
      hvdtrain run --elastic --min-np 2 --max-np 8 --hosts-file hosts --network-interface eth0 -- python my.py
    """
    from hvdtrain import jobs
    from hvdtrain.launching import preflight, supervise
    from hvdtrain.launching.options import ElasticOptions, LaunchOptions, split
    from hvdtrain.launching.spec import make_spec
    from hvdtrain.rundir import RunDir

    launch, elastic, _ = split(options, LaunchOptions, ElasticOptions)
    launch = jobs.run_recordings(launch, elastic, timeline, autotune)
    spec = make_spec(command, launch, elastic)
    # The command may use neither Horovod nor mpi4py: a build for another MPI is said, not refused (train refuses).
    mismatched = [f"{what}: a command using it fails; {fix}" for what, fix in jobs.mpi_mismatches(spec, MPI_PACKAGES)]
    for warning in [*spec.warnings, *mismatched]:
        _warn(warning)
    if not dry_run:
        preflight.preflight(spec)
    if not timeline or dry_run:
        sys.exit(supervise.run_job(spec, dry_run=dry_run))
    try:
        sys.exit(supervise.run_job(spec))
    finally:
        from hvdtrain import timeline as tl

        tl.after_job(RunDir(spec.output_dir).timeline, click.echo)


@cli.command(context_settings=CONTEXT)
@launch_options
@elastic_options
@train_options
@click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=config_file,
    help="YAML file of option: value defaults (keys as the long options, - or _); CLI flags override it.",
)  # fmt: skip
def train(dry_run, **options):
    """Train a model on N ranks with Horovod: the CNN on scikit-learn's digits by default.

    \b
      hvdtrain train -np 2                                  # data parallel, prints test accuracy
      hvdtrain train -np 1 --strategy model --devices-per-rank 2 --micro-batches 4
      hvdtrain train -np 2 --strategy hybrid --devices-per-rank 2
      hvdtrain train -np 4 --strategy pipeline --stages 2 --micro-batches 4
      hvdtrain train -np 2 --run-dir runs/a --checkpoint-every 50 ... then --resume

    The run directory gets config.json, metrics.jsonl, TensorBoard events, checkpoints/, result.json and
    logs/ (one log per rank).
    """
    from hvdtrain import jobs

    sys.exit(jobs.train(options, dry_run=dry_run, echo=click.echo))


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def doctor(as_json):
    """Check this machine: versions, Horovod's build (hvdtrain's patch or stock), which MPI Horovod, mpi4py and the
    mpirun/mpiexec on PATH are (Open MPI or MPICH, the same for all), launchers on PATH, cores, memory, GPUs.

    Exits non-zero naming what is missing and how to fix it.
    """
    from hvdtrain import doctor

    report = doctor.collect()
    click.echo(doctor.to_json(report) if as_json else doctor.to_table(report))
    sys.exit(0 if not report["problems"] else 1)


@cli.command("timeline", context_settings=CONTEXT)
@click.argument("target", metavar="RUN_DIR_OR_FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (every tensor).")
@click.option(
    "--plot",
    type=PlotPath(),
    metavar="PNG",
    help="Where the step's picture goes [default: timeline.png beside the file].",
)
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Tensors listed in the table.")
def timeline_command(target, as_json, plot, top):
    """Where the step time goes, from Horovod's timeline (train --timeline / --timeline-steps A:B, run --timeline).

    Per phase (negotiation, waiting for data, copies in and out of the fusion buffer, the allreduce itself) the
    time any tensor spent in it per step and its share of the step; per tensor its time in each phase; a PNG
    of one step's phases. A file cut short by a killed job is read up to its last whole event.
    """
    import json

    from hvdtrain import timeline
    from hvdtrain.files import check_output_path
    from hvdtrain.rundir import TIMELINE_PLOT, RunDir

    path, _ = timeline.locate(Path(target))  # where the picture goes is checked before the (large) file is read
    png = Path(plot) if plot else RunDir(path.parent).timeline_plot
    check_output_path(png, "--plot", directory=False, name=TIMELINE_PLOT)
    skipped: list[str] = []  # said once the input is known to hold something: an error is its only line
    data, steps, every = timeline.load(Path(target), warn=skipped.append)
    for line in skipped:
        _warn(line)
    summary = timeline.summarize(data, steps, every)
    summary["plot"] = str(png)
    summary["plot_step"] = timeline.plot_step(every, steps, png)
    click.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json else timeline.format_summary(summary, top))


@cli.command("plan", context_settings=CONTEXT)
@click.option(
    "-np", "--num-proc", "np", type=click.IntRange(min=1), help="Ranks to plan for [default: this machine's cores]."
)
@click.option("--nodes", type=click.IntRange(min=1), help="Plan for K nodes of --ntasks-per-node ranks (a Slurm job).")
@click.option("--ntasks-per-node", type=click.IntRange(min=1), help="Ranks per node, with --nodes.")
@click.option("--memory-per-rank", type=click.FloatRange(min=0, min_open=True), metavar="GiB",
              help="Memory a rank may use [default: this machine's available memory / its ranks].")  # fmt: skip
@click.option("--bench-json", metavar="FILE", help="A `hvdtrain bench allreduce` allreduce.json: its busbw models "
              "communication across nodes [default: the probe's, on this machine].")  # fmt: skip
@click.option("--validate", type=click.IntRange(min=1), metavar="STEPS", help="Then run the fastest fitting layout "
              "of each kind for real, STEPS steps each, and print predicted against measured step time and memory.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option(
    "--dry-run", is_flag=True, help="Check the options, print what would be measured and the probe's command."
)
@dataclass_options_subset("model", "hidden", "depth", "data", "synthetic_samples", "batch_size", "optimizer",
                          "momentum", "seed")  # fmt: skip
def plan_command(np, nodes, ntasks_per_node, memory_per_rank, bench_json, validate, as_json, dry_run, **fields):
    """Which layout to train with on this machine, from measured costs: data parallel, with the sharded optimizer,
    local SGD, or a pipeline of P stages x N/P replicas with M micro-batches (docs/plan.md).

    Measures the model (bytes, each stage's forward+backward time and activations), probes a real job of the
    ranks (a rank's memory before training, one step's allreduces), models every layout's memory per rank,
    communication, bubble, step time and samples/s, and recommends the fastest synchronous one that fits, with
    its command.

    \b
      hvdtrain plan -np 2 --model deep_mlp
      hvdtrain plan --nodes 4 --ntasks-per-node 2 --bench-json runs/bench-allreduce/allreduce.json --json
    """
    import json
    import os

    from hvdtrain import jobs, plan
    from hvdtrain.config import TrainConfig
    from hvdtrain.errors import UsageError

    if (nodes is None) != (ntasks_per_node is None):
        raise UsageError("--nodes and --ntasks-per-node go together: give both (or -np for this machine)")
    if nodes and np:
        raise UsageError("-np excludes --nodes/--ntasks-per-node: give the ranks one way")
    ranks = nodes * ntasks_per_node if nodes else np or os.cpu_count() or 1
    cfg = TrainConfig(**fields).validate().with_defaults()
    jobs.check_data(cfg, ranks)
    if validate and nodes:
        raise UsageError("--validate runs the layouts on this machine: give -np, not --nodes")
    bench = plan.bench_rows(bench_json) if bench_json else None
    if dry_run:
        plan.dry_run(cfg, ranks, ntasks_per_node, validate, echo=click.echo)
        return
    say = functools.partial(click.echo, err=True)
    result = plan.run(cfg, ranks, nodes, ntasks_per_node, memory_per_rank, bench, echo=say)
    if validate:
        result["validation"] = plan.validate(result, cfg, validate, echo=say)
    text = plan.format_plan(result) + ("\n\n" + plan.format_validation(result["validation"]) if validate else "")
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else text)


@cli.command("report", context_settings=CONTEXT)
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option(
    "--targets", default="0.9,0.95", show_default=True, metavar="ACC,ACC",
    help="Test accuracies to time (seconds and step of the first evaluation at or above each).",
)  # fmt: skip
@click.option("--plot", type=PlotPath(), metavar="PNG", help="Where the curves go [default: RUN_DIR/report.png for one run, else "
              "./report.png].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run instead of the table.")
def report_command(run_dirs, targets, plot, as_json):
    """What training runs did, from their run directories: loss, accuracy, samples/s and lr against step and wall
    time as one PNG (several runs overlaid), and a table: final accuracy, time and step to each --targets
    accuracy, resumes, elastic resizes, preemptions and requeues, and what --autotune chose; then each rank's
    compute and wait per step, and any straggler: a rank computing over 1.3x the others' median step in 3
    consecutive logging windows, named with its host.

    
      hvdtrain report runs/a
      hvdtrain report runs/sync runs/local-sgd --targets 0.9,0.95,0.97 --plot compare.png
    """
    import json

    from hvdtrain import report
    from hvdtrain.bench.plans import accuracy_list
    from hvdtrain.files import check_output_path
    from hvdtrain.rundir import REPORT_PLOT, RunDir

    levels = accuracy_list(targets)
    skipped: list[str] = []  # said once every run is known to hold something: an error is its only line
    runs = [report.load(Path(d), warn=skipped.append) for d in run_dirs]
    png = Path(plot) if plot else RunDir(runs[0].path if len(runs) == 1 else ".").report_plot
    check_output_path(png, "--plot", directory=False, name=REPORT_PLOT)
    for line in skipped:
        _warn(line)
    summaries = [report.summarize(run, levels) for run in runs]
    report.plot(runs, png)
    if as_json:
        click.echo(json.dumps({"plot": str(png), "runs": summaries}, indent=2, sort_keys=True))
    else:
        click.echo(report.format_table(summaries, levels) + f"\ncurves: {png}")


@cli.group(context_settings=CONTEXT)
def bench():
    """Benchmarks: allreduce bandwidth, training throughput with scaling and side-by-side ratios, update rules.

    Each prints a table and writes JSON and a PNG into --out; --tiny is a seconds-long smoke run.
    """


@bench.command("allreduce", context_settings=CONTEXT)
@launch_options
@bench_options("AllreduceSettings")
def bench_allreduce(dry_run, options, **launch_options):
    """Allreduce time, algbw and busbw = algbw x 2(n-1)/n against message size, for Horovod (MPI and Gloo
    controllers) beside mpi4py Allreduce, torch.distributed gloo all_reduce and local memcpy.

    \b
      hvdtrain bench allreduce -np 2                       # 4 B .. 256 MiB, both controllers
      hvdtrain bench allreduce -np 2 --mpi --sizes 64MiB    # one controller, one size
    """
    from hvdtrain.bench import allreduce
    from hvdtrain.launching.options import LaunchOptions

    plan = allreduce.make_plan(options, launch=LaunchOptions(**launch_options))
    allreduce.run(plan, dry_run=dry_run, echo=click.echo)


@bench.command("train", context_settings=CONTEXT)
@launch_options
@bench_options("TrainSettings")
def bench_train(dry_run, options, **launch_options):
    """Synthetic-data training throughput for np = 1..N (one thread per rank): weak-scaling efficiency, tensor
    fusion and fp16 ablations, and the hvdtrain Trainer vs a minimal Horovod loop vs torch DDP (gloo).

    \b
      hvdtrain bench train --max-np 2                      # MPI controller unless --gloo
      hvdtrain bench train --max-np 2 --models wide_mlp --no-ablations
    """
    from hvdtrain.bench import throughput
    from hvdtrain.launching.options import LaunchOptions

    plan = throughput.make_plan(options, launch=LaunchOptions(**launch_options))
    throughput.run(plan, dry_run=dry_run, echo=click.echo)


@bench.command("updates", context_settings=CONTEXT)
@launch_options
@bench_options("UpdatesSettings")
def bench_updates(dry_run, options, **launch_options):
    """The update rules side by side (sync, local-sgd, async) on the digits CNN, with and without a straggler:
    samples/s per worker, training time and steps to each target accuracy, collectives or messages per step,
    and accuracy curves against time and step.

    \b
      hvdtrain bench updates                               # 2 workers (async: + 1 server), stragglers 1,2
      hvdtrain bench updates --modes sync,async --stragglers 1,3 --rounds 3
    """
    from hvdtrain.bench import updates
    from hvdtrain.launching.options import LaunchOptions

    plan = updates.make_plan(options, launch=LaunchOptions(**launch_options))
    updates.run(plan, dry_run=dry_run, echo=click.echo)


@bench.command("launch", context_settings=CONTEXT)
@bench_options("LaunchSettings")
@click.option("--dry-run", is_flag=True, help="Print every command, run nothing.")
def bench_launch(dry_run, options):
    """Time to start a trivial Horovod job (hvd.init + one allreduce) through plain mpirun, hvdtrain run (its
    default launcher, and horovodrun), and plain horovodrun; and the built-in job's time to its first step by
    phase (launch, imports, hvd.init, data, model, broadcast, first step).

    \b
      hvdtrain bench launch                                # 2 ranks, 7 rounds
      hvdtrain bench launch --arms mpirun,hvdtrain --rounds 15 --no-train
    """
    from hvdtrain.bench import launching

    plan = launching.make_plan(options)
    launching.run(plan, dry_run=dry_run, echo=click.echo)


@bench.command("pytest", context_settings=CONTEXT)
@bench_options("PytestSettings")
@click.option("--dry-run", is_flag=True, help="Print every command, run nothing.")
def bench_pytest(dry_run, options):
    """What hvdtrain's pytest plugin costs: one file of trivial tests on N ranks run by `pytest` (the plugin
    launches them) and by `mpirun -np N python -m pytest --with-mpi` (in place), whole commands timed.

    \b
      hvdtrain bench pytest                                # 50 tests, 2 ranks, 5 rounds
      hvdtrain bench pytest --tests 200 --ranks 4 --rounds 9
    """
    from hvdtrain.bench import pytests

    plan = pytests.make_plan(options)
    pytests.run(plan, dry_run=dry_run, echo=click.echo)


@cli.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@slurm_options
@click.option("--dry-run", is_flag=True, help="Print the job script and the sbatch command; submit nothing.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(command, dry_run, **options):
    """Submit COMMAND as a Slurm batch job: hvdtrain submit --nodes 2 --ntasks-per-node 4 -- hvdtrain train ...

    \b
      hvdtrain submit --ntasks-per-node 2 --run-dir runs/a -- hvdtrain train --run-dir runs/a
      hvdtrain submit --array 0-2 -- hvdtrain train -np 1 --seed {task} --run-dir 'runs/s/{task}'
      hvdtrain submit --ntasks-per-node 2 -- python my_train.py      # started on every rank by srun

    Renders the job script deterministically into the run directory, submits it with sbatch, and prints the
    job id and where the logs go. `hvdtrain ...` commands start their own ranks inside the allocation; other
    commands are started on every rank with srun (--mpi chosen in the job: pmix for Open MPI, pmi2 for MPICH) or
    mpirun.
    """
    from hvdtrain import slurm

    spec = slurm.make_spec(**options)
    slurm.submit(spec, list(command), dry_run=dry_run, echo=click.echo)


@cli.command(context_settings=CONTEXT)
@click.argument("job_id", metavar="JOBID")
def status(job_id):
    """State of a Slurm job (each task of an array): state, reason, run time, restarts, node, output file."""
    from hvdtrain import slurm

    sys.exit(slurm.status(job_id, echo=click.echo))


@cli.command(context_settings=CONTEXT)
@click.argument("job_id", metavar="JOBID")
@click.option("--rank", type=int, help="Show this rank's log instead of the job's output.")
@click.option("--lines", "-n", type=int, default=0, help="Only the last N lines [default: all].")
def logs(job_id, rank, lines):
    """Print a Slurm job's output file, or one rank's log (--rank R); array tasks as JOBID_TASK."""
    from hvdtrain import slurm

    sys.exit(slurm.logs(job_id, rank=rank, lines=lines, echo=click.echo))


@cli.group(context_settings=CONTEXT)
def checkpoint():
    """What a run's checkpoints hold, whether they are whole, and a plain torch file of one (docs/checkpoints.md).

    TARGET is a run directory, its checkpoints/ directory, or one checkpoint file; for a directory, inspect, verify
    and consolidate take the newest complete checkpoint (the one --resume takes).
    """


@checkpoint.command("ls", context_settings=CONTEXT)
@click.argument("target", metavar="TARGET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per checkpoint instead of the table.")
def checkpoint_ls(target, as_json):
    """Each checkpoint: step, epoch, samples of it done, the ranks, strategy, update, batch and lr that wrote it,
    parameters, size, and whether it is complete (a write cut short, or one still unfinished, is said)."""
    import json

    from hvdtrain import checkpoints

    rows = checkpoints.ls(target)
    click.echo("\n".join(json.dumps(r, sort_keys=True) for r in rows) if as_json else checkpoints.format_ls(rows))


@checkpoint.command("inspect", context_settings=CONTEXT)
@click.argument("target", metavar="TARGET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def checkpoint_inspect(target, as_json):
    """One checkpoint in full: position, the layout that wrote it, what a resume must match, the model's and the
    optimizer's sizes and settings, whose RNG states it keeps."""
    import json

    from hvdtrain import checkpoints

    info = checkpoints.inspect(target)
    click.echo(json.dumps(info, indent=2, sort_keys=True, default=str) if as_json else checkpoints.format_inspect(info))


@checkpoint.command("verify", context_settings=CONTEXT)
@click.argument("target", metavar="TARGET")
@click.option("--all", "every", is_flag=True, help="Every checkpoint of the directory, not only the newest complete.")
def checkpoint_verify(target, every):
    """Read a checkpoint whole: the archive's checksums, the load, the entries a resume needs, finite weights.
    Exits 1 when one is not sound, naming what is wrong."""
    from hvdtrain import checkpoints

    results = checkpoints.verify(target, every)
    for path, problems in results:
        click.echo(f"{'ok' if not problems else 'BAD'}  {path}" + (f": {'; '.join(problems)}" if problems else ""))
    sys.exit(1 if any(problems for _, problems in results) else 0)


@checkpoint.command("consolidate", context_settings=CONTEXT)
@click.argument("target", metavar="TARGET")
@click.option("--output", "-o", required=True, metavar="FILE", help="The plain torch file to write.")
@click.option(
    "--with-optimizer", is_flag=True, help='Write {"model": ..., "optimizer": ...} instead of the model alone.'
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def checkpoint_consolidate(target, output, with_optimizer, force):
    """Write a checkpoint's model state_dict (whatever strategy wrote it: the unsplit model's names) as a plain torch
    file: `model.load_state_dict(torch.load(FILE, weights_only=True))`, no hvdtrain needed."""
    from hvdtrain import checkpoints
    from hvdtrain.errors import UsageError
    from hvdtrain.files import check_output_path

    out = check_output_path(output, "--output", directory=False, name="model.pt")
    if out.exists() and not force:
        raise UsageError(f"--output {output}: exists; pass --force to replace it, or choose another file")
    source, _ = checkpoints.consolidate(target, out, with_optimizer)
    click.echo(f"wrote {out} ({'model and optimizer' if with_optimizer else 'model'} state_dict of {source})")


def _warn(message: str) -> None:
    """What a command skipped or worked around, one line on stderr."""
    click.echo(f"hvdtrain: warning: {message}", err=True)


def main():
    cli(prog_name="hvdtrain")


if __name__ == "__main__":
    main()
