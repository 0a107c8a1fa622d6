"""The built-in jobs as seen from the launching side: validate, check before starting, launch.

Imports nothing heavy (the CLI calls it): the configuration is checked, the run directory and the device
layout are checked, and only then is anything written or started.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain import mpi, npz, preempt
from hvdtrain.config import DIGITS_SAMPLES, TIMELINE_NOT_ELASTIC, TrainConfig, check_combinations, needs_mpi
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import CheckpointError, ConfigError, LaunchError, UsageError
from hvdtrain.files import check_output_path
from hvdtrain.launching import preflight as hosts_preflight
from hvdtrain.launching import runlock, supervise
from hvdtrain.launching.hosts import ranks_per_host
from hvdtrain.launching.options import ElasticOptions, LaunchOptions, split
from hvdtrain.launching.spec import LaunchSpec, make_spec
from hvdtrain.rundir import RunDir
from hvdtrain.train import checkpoint, hooks


def visible_gpus(environ: Mapping[str, str]) -> int:
    """GPUs this node shows, without importing torch: CUDA_VISIBLE_DEVICES if set, else /dev/nvidiaN."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)])


def run_recordings(launch: LaunchOptions, elastic: ElasticOptions, timeline: bool, autotune: bool) -> LaunchOptions:
    """`hvdtrain run --timeline/--autotune`'s launch options: the ranks get HOROVOD_TIMELINE=OUTPUT_DIR/timeline.json
    and HOROVOD_AUTOTUNE=1 with HOROVOD_AUTOTUNE_LOG=OUTPUT_DIR/autotune.csv; the output directory (runs/run-<time>
    when not given) is kept. The output directory, given or not, is checked (files.check_output_path)."""
    if not (timeline or autotune):
        if launch.output_dir:
            check_output_path(launch.output_dir, "--output-dir")
        return launch
    if timeline and elastic.elastic:
        raise ConfigError(TIMELINE_NOT_ELASTIC)
    import time

    output = launch.output_dir or os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S"))
    check_output_path(output, "--output-dir")
    paths = RunDir(os.path.abspath(output))
    env = [f"HOROVOD_TIMELINE={paths.timeline}"] if timeline else []
    env += ["HOROVOD_AUTOTUNE=1", f"HOROVOD_AUTOTUNE_LOG={paths.autotune}"] if autotune else []
    return dataclasses.replace(launch, output_dir=output, env=(*launch.env, *env))


def mpi_mismatches(spec: LaunchSpec, packages: Sequence[str]) -> list[tuple[str, str]]:
    """(what, fix) for each of this interpreter's `packages` (horovod, mpi4py) built against another MPI than the
    one that starts the ranks (mpirun jobs: Open MPI's or MPICH's, spec.mpi); read from their libraries, not
    imported."""
    return mpi.mismatches(spec.mpi, packages) if spec.mpi else []


def preflight(cfg: TrainConfig, spec: LaunchSpec, environ: Mapping[str, str], slurm: SlurmEnv) -> None:
    """What can be known before launching: Horovod (and mpi4py, when the job sends messages with it) built for the
    MPI that starts the ranks, the layout fits the devices, checkpoints are where they should be (what a resume
    passes over, a killed job's leftovers, said on stderr once nothing is refused), the run and log directories can
    be written, the data fits, and the --hooks load and build."""
    for what, fix in mpi_mismatches(spec, ("horovod", "mpi4py") if needs_mpi(cfg) else ("horovod",)):
        raise UsageError(f"{what}; {fix}")
    # An elastic job's world is any number of ranks; a static one's data ranks (async: without the servers).
    world = None if spec.elastic is not None else cfg.data_ranks(spec.np)
    if cfg.strategy == "pipeline":
        check_stages(cfg)
    if cfg.strategy in ("model", "hybrid"):
        from hvdtrain.parallel.hybrid import devices_for_rank

        if spec.elastic is not None:  # any host may come with its slots full: the most slots a host has now
            per_host = max([h.slots for h in spec.hosts], default=spec.elastic.slots_per_host)
        else:
            per_host = slurm.ntasks_per_node or (max(ranks_per_host(spec.np, spec.hosts)) if spec.hosts else spec.np)
        devices_for_rank(0, per_host, cfg.devices_per_rank, cuda_count=visible_gpus(environ))
    skipped: list[str] = []
    resume_path = checkpoint.resume_path(cfg, slurm, warn=skipped.append)
    if resume_path is None and cfg.resume and slurm.restart_count == 0:
        ckpt_dir = RunDir(cfg.run_dir).checkpoints
        what = "no complete checkpoint" if checkpoint.list_checkpoints(ckpt_dir) else "no checkpoint"
        raise CheckpointError(f"--resume: {what} in {ckpt_dir}; check --run-dir, or drop --resume to start fresh")
    if resume_path is not None:
        # Read it here (torch is imported only now, and only for a resume): a corrupt or mismatched checkpoint
        # is bad input, reported before any rank starts.
        # Any world size, strategy and batch resume it: what must match is the model, data and optimizer.
        checkpoint.load(resume_path, checkpoint.fingerprint(cfg))
    check_output_path(cfg.run_dir, "--run-dir")
    if spec.output_dir:
        check_output_path(spec.output_dir, "--output-dir")
    check_data(cfg, world)
    hooks.check_in_child(cfg.hook_refs())  # last, being the slowest: loaded as the ranks will, in a child process
    for line in skipped:  # what the resume passes over, said once nothing is refused (an error is one line)
        print(f"hvdtrain: warning: {line}", file=sys.stderr)


def check_stages(cfg: TrainConfig) -> None:
    """A pipeline's stages fit the reference model: each stage at least one layer, and one with parameters (a
    stage without any would have nothing to train)."""
    layers, weighted = cfg.layers()
    what = f"--model {cfg.model}" + (f" --depth {cfg.depth}" if cfg.model == "deep_mlp" else "")
    deeper = ", or a larger --depth" if cfg.model == "deep_mlp" else ""
    if cfg.stages > len(weighted):
        raise ConfigError(
            f"--stages {cfg.stages} is more than the {len(weighted)} layers with parameters of {what} ({layers} "
            f"layers in all): use at most {len(weighted)} stages{deeper}"
        )
    if cfg.balance is None:
        return  # balanced by parameter count: every stage gets a layer with parameters
    given = f"--balance {','.join(map(str, cfg.balance))}"
    if sum(cfg.balance) != layers:
        raise ConfigError(
            f"{given} adds up to {sum(cfg.balance)} layers, but {what} has {layers}: give {cfg.stages} stage "
            f"sizes adding up to {layers}"
        )
    start = 0
    for s, size in enumerate(cfg.balance):
        if not any(start <= w < start + size for w in weighted):
            raise ConfigError(
                f"{given}: stage {s} (layers {start}-{start + size - 1}) holds no parameters; the layers of {what} "
                f"with parameters are {', '.join(map(str, weighted))}"
            )
        start += size


def check_data(cfg: TrainConfig, world: Optional[int]) -> None:
    """The data fits the job: a --data file's arrays (from their headers), its inputs suit the model, and a batch
    fits a rank's share of the training set (`world` ranks; None: an elastic job, any number)."""
    if cfg.data == "digits":
        samples, shape = DIGITS_SAMPLES - math.ceil(DIGITS_SAMPLES * 0.2), (1, 8, 8)
    elif cfg.data == "synthetic":
        samples, shape = cfg.synthetic_samples, (1, 8, 8)
    else:
        info = npz.check(cfg.data)
        samples, shape = info.train_samples, info.input_shape
    if cfg.model == "cnn" and len(shape) != 3:
        raise ConfigError(
            f"--model cnn needs image inputs (channels, height, width); --data {cfg.data} has samples of shape "
            f"{shape}: use --model mlp or deep_mlp"
        )
    share = math.ceil(samples / world) if world else samples
    if world is not None and cfg.batch_size > share:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is more than a rank's share of the training set ({share} of {samples} "
            f"samples over {world} rank(s)): use at most {share}, or fewer ranks"
        )


def train(
    options: dict[str, Any],
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    environ: Optional[Mapping[str, str]] = None,
) -> int:
    """Validate the training configuration, check the run directory and layout, write config.json, launch
    ``python -m hvdtrain.worker`` on the ranks; returns the job's exit status. `options` are the command's:
    TrainConfig fields, LaunchOptions and ElasticOptions (launching.spec.make_spec)."""
    environ = os.environ if environ is None else environ
    slurm = SlurmEnv.read(environ)  # once: every check below and the launch see the same job
    launch, elastic, fields = split(options, LaunchOptions, ElasticOptions)
    cfg = TrainConfig.from_dict(fields).validate().with_defaults(slurm)
    run_dir = RunDir(cfg.run_dir)
    config_path = run_dir.config
    command = [sys.executable, "-m", "hvdtrain.worker", str(config_path.resolve())]
    # What the options cannot be launched with (config.COMBINATIONS: elastic, Gloo), then with the ranks.
    check_combinations(cfg, elastic=elastic.elastic, gloo=launch.gloo)
    launch = dataclasses.replace(
        launch, output_dir=launch.output_dir or str(run_dir.logs.path), mpi=launch.mpi or needs_mpi(cfg)
    )
    spec = make_spec(command, launch, elastic, environ=environ, check_cmd=False, slurm=slurm)
    check_combinations(cfg, elastic=elastic.elastic, gloo=launch.gloo, ranks=spec.np)
    if cfg.strategy == "pipeline":
        from hvdtrain.parallel.grid import Grid

        cfg.data_ranks(spec.np)  # -np a multiple of --stages, said in the words of the options
        grid = Grid(spec.np, cfg.stages)
        spec = dataclasses.replace(spec, roles=tuple(grid.role(r) for r in range(spec.np)))
    if not dry_run:  # a live job's run directory is refused before its checkpoints are read (it rewrites them)
        runlock.check(run_dir.lock, "--run-dir", slurm)
    preflight(cfg, spec, environ, slurm)
    for warning in spec.warnings:
        print(f"hvdtrain: warning: {warning}", file=sys.stderr)
    text = cfg.to_json()
    if dry_run:
        echo(f"# {config_path}:\n" + "\n".join(f"#   {line}" for line in text.splitlines()))
        return supervise.run_job(spec, dry_run=True, echo=echo)
    hosts_preflight.preflight(spec)  # the hosts (ssh, interfaces), before anything is written
    with runlock.hold(run_dir.lock, "--run-dir", slurm):
        cfg.save(run_dir)
        run_dir.interrupted.unlink(missing_ok=True)
        try:
            return supervise.run_job(spec, echo=echo, on_interrupt=lambda: interrupt(run_dir))
        except LaunchError as e:
            if e.cause in REQUEUE_CAUSES and requeue_after_fault(cfg, e, echo, slurm):
                return e.exit_code
            raise
        finally:
            run_dir.interrupted.unlink(missing_ok=True)
            if cfg.records_timeline:
                from hvdtrain import timeline

                timeline.after_job(run_dir.timeline, echo)


def interrupt(run_dir: RunDir) -> bool:
    """At the first Ctrl-C: ask the ranks for a checkpoint and a stop by leaving a mark in the run directory
    (which every rank reads, like config.json), read where they agree on preemption requests (every --log-every
    steps); rank 0 then does not requeue. False (end the ranks) when it cannot be written."""
    try:
        run_dir.interrupted.write_text("SIGINT\n")
    except OSError:
        return False
    return True


# What a requeued job can get over: a rank that stalled or hung (a frozen process or host, a hung file system, a
# link that went down) or a lost host; Slurm gives the requeued job a fresh allocation. A rank's own error would
# only happen again.
REQUEUE_CAUSES = ("stall", "hang", "lost_host")


def requeue_after_fault(cfg: TrainConfig, error: LaunchError, echo: Callable[[str], None], slurm: SlurmEnv) -> bool:
    """Inside Slurm with --requeue, after a stall, a hang or a lost host: say what happened, then requeue the job like a
    preempted one (within --max-requeues, else a line says why not); it resumes from its last checkpoint. True
    when it said so (the error is reported), False when this is no job to requeue (the caller raises)."""
    if not slurm.in_job or not cfg.requeue:
        return False
    # Say it first: `scontrol requeue` ends this job at once, and the report must be in its output.
    echo(f"hvdtrain: error: {error}")
    preempt.requeue_after_preemption(cfg.requeue, cfg.max_requeues, echo, slurm)
    return True
