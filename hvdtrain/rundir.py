"""The one owner of every name in a run directory (in the spirit of submitit's JobPaths).

    runs/train-20261123-160000/          RunDir(path)
      config.json                         .config       the TrainConfig (written once, by the launching side)
      metrics.jsonl                       .metrics      one JSON object per record (rank 0)
      tensorboard/                        .tensorboard  TensorBoard events (rank 0)
      checkpoints/step-XXXXXXXX.pt        .checkpoints  .checkpoint(step)  (rank 0, atomic)
      result.json                         .result       the run's results (rank 0)
      logs/rank.R.{log,exit,host}         .logs         RankLogs: every rank's output, exit status and host
      logs/rank.R.stacks                                every rank's stacks when the hang watchdog ended the job
      logs/worker.H.S.{log,exit,host}                   elastic jobs: the same per worker (host H, slot S)
      logs/hvdtrain.traceback.log         TRACEBACK_LOG what the command line did not foresee: its traceback
      job.sbatch, slurm-<id>.out          .job_script   .slurm_output(job, task)  (hvdtrain submit)
      hvdtrain.lock                       .lock         who runs a job here (hvdtrain train, while it runs)
      interrupted                         .interrupted  Ctrl-C asked the ranks to stop (while they stop)
      timeline.json                       .timeline     Horovod's timeline (--timeline)
      timeline.steps.csv                  .timeline_steps  rank 0's recorded steps, beside the timeline
      timeline.png                        .timeline_plot   `hvdtrain timeline`'s picture of a step
      autotune.csv                        .autotune     Horovod's autotuner log (--autotune)
      report.png                          .report_plot  `hvdtrain report`'s curves
      ps/server.P.updates.csv             .ps_log(P)    async jobs: the updates server P applied

Only names live here: no module imports anything heavy, so the CLI, the launcher, the rank wrapper, the
Slurm jobs module and the Trainer all take their paths from it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, Path]
# A checkpoint: one file (step-XXXXXXXX.pt), or the directory of a sharded one (step-XXXXXXXX/: META_FILE, each
# rank's SHARD_FILE, MANIFEST_FILE).
CHECKPOINT_RE = re.compile(r"^step-(\d{8})(?:\.pt)?$")
META_FILE = "meta.pt"
SHARD_FILE = "optimizer.{rank}.pt"
MANIFEST_FILE = "manifest.json"
# sbatch's output file names (%j job id; %A array job id, %a task id), and what they become for one job.
SLURM_OUTPUT = "slurm-%j.out"
SLURM_ARRAY_OUTPUT = "slurm-%A_%a.out"
# Names that also stand beside a timeline file given by itself (`hvdtrain timeline FILE`), and the plots.
TIMELINE_STEPS = "timeline.steps.csv"  # rank 0's recorded steps (train.hooks.TimelineRecorder, hvdtrain.timeline)
TIMELINE_STEPS_HEADER = "step,start_us,end_us"  # its columns: a step, its start and end in us since the epoch
TIMELINE_PLOT = "timeline.png"
TRACEBACK_LOG = "hvdtrain.traceback.log"  # in a run's logs/ (or a benchmark's --out): the CLI's unforeseen failures
REPORT_PLOT = "report.png"


@dataclasses.dataclass(frozen=True)
class RankLogs:
    """A folder of per-rank records written by the rank wrapper: rank.R.host (the host the rank started on,
    written first), rank.R.log (its output) and rank.R.exit (its exit status, written last); the launcher
    reads them to name a failing rank, or a lost host (a host record with no exit record).

    In an elastic job a rank number changes at every reset, so the records are named by worker instead:
    worker.H.S.{host,log,exit} for the worker on host H (as the discovery names it) in slot S; a worker started
    again on the same host and slot appends to its log."""

    path: Path

    def __init__(self, path: PathLike):
        object.__setattr__(self, "path", Path(path))

    def log(self, rank: int) -> Path:
        return self.path / f"rank.{rank}.log"

    def exit(self, rank: int) -> Path:
        return self.path / f"rank.{rank}.exit"

    def host(self, rank: int) -> Path:
        return self.path / f"rank.{rank}.host"

    def stacks(self, rank: Union[int, str]) -> Path:
        """The rank's stacks, every Python process and thread of it, as the hang watchdog had them dumped (`rank`
        "R": the pattern, as a report names every rank's)."""
        return self.path / f"rank.{rank}.stacks"

    def log_pattern(self, pattern: str) -> Path:
        """rank.R.log with a launcher's pattern in place of R, e.g. srun's ``%t`` (the task's rank):
        where ``srun --output`` writes each rank's output so that log(rank) finds it."""
        return self.path / f"rank.{pattern}.log"

    def openmpi_output(self, rank: int) -> Path:
        """Where ``mpirun --output-filename <this folder>`` (OpenMPI 4) writes rank R's stdout."""
        return self.path / "1" / f"rank.{rank}" / "stdout"

    def log_files(self) -> Iterator[tuple[int, Path]]:
        """(rank, path) of every rank.R.log present, in no particular order."""
        return self._records("log")

    def exit_records(self) -> Iterator[tuple[int, Path]]:
        """(rank, path) of every exit record present, in no particular order."""
        return self._records("exit")

    def host_records(self) -> Iterator[tuple[int, Path]]:
        """(rank, path) of every host record present, in no particular order."""
        return self._records("host")

    def hosts(self) -> dict[int, str]:
        """rank -> the host it started on, from every host record present that can be read ("?" when empty)."""
        hosts = {}
        for rank, p in self.host_records():
            try:
                hosts[rank] = p.read_text().strip() or "?"
            except (OSError, UnicodeDecodeError):
                continue
        return hosts

    def _records(self, kind: str) -> Iterator[tuple[int, Path]]:
        for p in self.path.glob(f"rank.*.{kind}"):
            try:
                yield int(p.name.split(".")[1]), p
            except (ValueError, IndexError):
                continue

    def worker_log(self, host: str, slot: int) -> Path:
        return self._worker(host, slot, "log")

    def worker_exit(self, host: str, slot: int) -> Path:
        return self._worker(host, slot, "exit")

    def worker_host(self, host: str, slot: int) -> Path:
        """The name of the machine the worker runs on (`host` is the name the discovery gave it)."""
        return self._worker(host, slot, "host")

    def worker_records(self, kind: str) -> Iterator[tuple[tuple[str, int], Path]]:
        """((host, slot), path) of every worker.H.S.<kind> present (kind: log, exit or host), in no particular
        order; `host` as it stands in the file name (`worker_name`)."""
        suffix = f".{kind}"
        for p in self.path.glob(f"worker.*.*{suffix}"):
            host, _, slot = p.name[len("worker.") : -len(suffix)].rpartition(".")
            if host and slot.isdigit():
                yield (host, int(slot)), p

    def _worker(self, host: str, slot: int, kind: str) -> Path:
        return self.path / f"worker.{worker_name(host)}.{slot}.{kind}"

    def task(self, task: Optional[str]) -> RankLogs:
        """The logs of one array task (task-T under this folder), or these when not an array task."""
        return RankLogs(self.path / f"task-{task}") if task is not None else self


class RunDir:
    """The paths of one run directory; nothing is created until a writer asks for its parent."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"
        self.result = self.path / "result.json"
        self.logs = RankLogs(self.path / "logs")
        self.job_script = self.path / "job.sbatch"
        self.lock = self.path / "hvdtrain.lock"
        self.interrupted = self.path / "interrupted"
        self.timeline = self.path / "timeline.json"
        self.timeline_steps = self.path / TIMELINE_STEPS
        self.timeline_plot = self.path / TIMELINE_PLOT
        self.autotune = self.path / "autotune.csv"
        self.report_plot = self.path / REPORT_PLOT

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def ps_log(self, server: int) -> Path:
        """An async job's parameter server `server`: one line per update it applied (written by that server)."""
        return self.path / "ps" / f"server.{server}.updates.csv"

    def slurm_output(self, job: str, task: Optional[str] = None) -> Path:
        """The output file of Slurm job `job` (array task `task`) submitted from this run directory."""
        name = SLURM_ARRAY_OUTPUT if task is not None else SLURM_OUTPUT
        return self.path / name.replace("%A", job).replace("%a", str(task)).replace("%j", job)


def worker_name(host: str) -> str:
    """A host name as it stands in a worker record's file name: any character but letters, digits, '.', '-'
    and '_' becomes '_' (a discovery script's output reaches the file system)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", host) or "_"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def sharded_checkpoint_name(step: int) -> str:
    """The directory of a sharded checkpoint; `.{name}.shards.tmp` while its ranks write it."""
    return f"step-{step:08d}"


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The step of a finished checkpoint file name, None for anything else (e.g. a temporary file)."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None
