"""Slurm batch jobs: `hvdtrain submit`'s spec, its job script, and submit/status/logs.

    spec.py        SlurmSpec (each field: its option's default and help) and make_spec (validation)
    script.py      rendering (pure): sbatch lines, the job script's sections, templates/*.sh filled in
    catalogue.py   the templates committed in slurm/ (python -m hvdtrain.slurm write-templates slurm)
    jobs.py        submit, status, logs: the only part that starts processes (sbatch, scontrol)

Requeueing a job from inside lives beside the preemption flag (hvdtrain.preempt). Nothing heavy is
imported: the CLI imports this package to build `hvdtrain submit`'s options.
"""

from hvdtrain.slurm.catalogue import TEMPLATES, render_template, write_templates
from hvdtrain.slurm.jobs import check_job_id, log_path, logs, parse_scontrol, sbatch_argv, show_job, status, submit
from hvdtrain.slurm.script import PIN, RUN_BODY, render_script, sbatch_lines
from hvdtrain.slurm.spec import DEFAULT_SIGNAL, LAUNCHERS, SlurmSpec, make_spec

__all__ = [
    "DEFAULT_SIGNAL",
    "LAUNCHERS",
    "PIN",
    "RUN_BODY",
    "TEMPLATES",
    "SlurmSpec",
    "check_job_id",
    "log_path",
    "logs",
    "make_spec",
    "parse_scontrol",
    "render_script",
    "render_template",
    "sbatch_argv",
    "sbatch_lines",
    "show_job",
    "status",
    "submit",
    "write_templates",
]
