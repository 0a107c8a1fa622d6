"""The catalogue of job-script templates committed in slurm/ (for plain `sbatch TEMPLATE COMMAND...`).

They are rendered by the same code as `hvdtrain submit`'s scripts, so every job script has the same run
section; a unit test checks that the committed files are the rendered ones, and
`python -m hvdtrain.slurm write-templates slurm` rewrites them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from hvdtrain.slurm.script import compose, export_default
from hvdtrain.slurm.spec import DEFAULT_SIGNAL
from hvdtrain.srunmpi import PLUGIN_ENV

_TEMPLATE_SETTINGS = [
    "# Where rank logs go (and, by convention, the run directory to give `hvdtrain train --run-dir`).",
    export_default("HVDTRAIN_RUN_DIR", "$PWD/runs/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"),
    "# srun (default) or mpirun (OpenMPI reads the allocation) for commands other than hvdtrain.",
    export_default("HVDTRAIN_LAUNCHER", "srun"),
    "# srun's MPI plugin (--mpi) for every srun of the job [default: chosen on the node from srun --mpi=list:",
    "# pmix for Open MPI, pmi2 for MPICH].",
    export_default(PLUGIN_ENV),
]
_TEMPLATE_OPTIONS = {"nodes": "1", "signal": DEFAULT_SIGNAL, "requeue": None, "open-mode": "append"}


def _template_settings(gpus_comment: str, gpus_default: str = "", sweep: Optional[str] = None) -> list[str]:
    sweep_lines = ["# The sweep: one value per array task (task i gets the i-th)."] if sweep else []
    return [
        *_TEMPLATE_SETTINGS,
        f"# GPUs per rank{gpus_comment}",
        export_default("HVDTRAIN_GPUS_PER_RANK", gpus_default),
        *sweep_lines,
        export_default("HVDTRAIN_SWEEP_VALUES", sweep or ""),
    ]


_PER_NODE = ": default (GPUs on the node) / (tasks per node)."
TEMPLATES: dict[str, dict[str, Any]] = {
    "data-parallel.sbatch": {
        "head": [
            "# Data-parallel training on one or more nodes: one rank per task, on CPUs or with one GPU per rank.",
            "#",
            "#   sbatch slurm/data-parallel.sbatch hvdtrain train --run-dir runs/dp",
            "#   sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 slurm/data-parallel.sbatch python train.py",
            "#",
            "# Change: --nodes and --ntasks-per-node (ranks = nodes x tasks per node); for GPUs add",
            "# --gpus-per-node equal to --ntasks-per-node (each rank sees only its GPU, as cuda:0); --time and",
            "# --signal (USR2 reaches every rank that many seconds before the limit); --partition/--account",
            "# for your site. Flags given to sbatch override these lines.",
        ],
        "options": {
            **_TEMPLATE_OPTIONS,
            "job-name": "hvdtrain-dp",
            "ntasks-per-node": "2",
            "cpus-per-task": "1",
            "time": "01:00:00",
            "output": "%x-%j.out",
        },  # fmt: skip
        "settings": _template_settings(_PER_NODE),
    },
    "hybrid.sbatch": {
        "head": [
            "# Hybrid GPU job: k GPUs per rank (the model split over them), data parallel across ranks.",
            "#",
            "#   sbatch slurm/hybrid.sbatch hvdtrain train --strategy hybrid --devices-per-rank 2 --run-dir runs/hy",
            "#   HVDTRAIN_GPUS_PER_RANK=4 sbatch --gpus-per-node=8 --ntasks-per-node=2 slurm/hybrid.sbatch python my.py",
            "#",
            "# Change: keep --ntasks-per-node = --gpus-per-node / HVDTRAIN_GPUS_PER_RANK (4 GPUs, 2 per rank: 2",
            "# tasks); --cpus-per-task to the cores per rank; --nodes, --time, --partition/--account for your",
            "# site. Rank r of a node sees its GPUs r*k .. r*k+k-1 as cuda:0 .. cuda:k-1 (hvdtrain train pins",
            "# by local rank itself). Flags given to sbatch override these lines.",
        ],
        "options": {
            **_TEMPLATE_OPTIONS,
            "job-name": "hvdtrain-hybrid",
            "ntasks-per-node": "2",
            "gpus-per-node": "4",
            "cpus-per-task": "4",
            "time": "04:00:00",
            "output": "%x-%j.out",
        },  # fmt: skip
        "settings": _template_settings(" (k): --gpus-per-node / --ntasks-per-node.", "2"),
    },
    "array-sweep.sbatch": {
        "head": [
            "# Hyperparameter sweep as a job array: one training job per array task, {value} in the arguments",
            "# becomes the task's entry of HVDTRAIN_SWEEP_VALUES, {task} the task id, {job} the array job id.",
            "#",
            "#   sbatch slurm/array-sweep.sbatch hvdtrain train -np 1 --lr {value} --run-dir 'runs/sweep-{job}/lr-{value}'",
            "#   HVDTRAIN_SWEEP_VALUES='1 2 3 4' sbatch --array=0-3 slurm/array-sweep.sbatch hvdtrain train --seed {value}",
            "#",
            "# Change: HVDTRAIN_SWEEP_VALUES and --array to match (0-N for N+1 values; %M runs at most M at",
            "# once); the resources of ONE task (--ntasks-per-node, --gpus-per-node, --time) below.",
            "# Flags given to sbatch override these lines.",
        ],
        "options": {
            **_TEMPLATE_OPTIONS,
            "job-name": "hvdtrain-sweep",
            "array": "0-2",
            "ntasks-per-node": "1",
            "cpus-per-task": "1",
            "time": "01:00:00",
            "output": "%x-%A_%a.out",
        },  # fmt: skip
        "settings": _template_settings(_PER_NODE, sweep="0.01 0.03 0.1"),
    },
}


def render_template(name: str) -> str:
    """The text of the template NAME (e.g. data-parallel.sbatch): its command is the script's arguments."""
    t = TEMPLATES[name]
    command = ["# The command is this script's arguments: sbatch TEMPLATE COMMAND [ARGS...]"]
    return compose(t["head"], t["options"], t["settings"], command)


def write_templates(directory: str) -> list[str]:
    """Write every template into DIRECTORY, executable; returns the paths written."""
    written = []
    for name in sorted(TEMPLATES):
        path = Path(directory) / name
        path.write_text(render_template(name))
        os.chmod(path, 0o755)
        written.append(str(path))
    return written
