"""Job scripts (pure): fixed sections, sorted #SBATCH lines, every value shell-quoted.

    #!/bin/bash and a head comment      what rendered it and how to use it
    #SBATCH lines                       sorted by name, each value shlex-quoted (sbatch unquotes them)
    settings                            the HVDTRAIN_* variables the run section reads
    command                             `set -- COMMAND` (submit), or a comment (templates: the arguments)
    run                                 templates/run.sh: the same in every hvdtrain job script

The run section and the GPU-pin snippet are real shell files shipped with the package
(hvdtrain/slurm/templates/*.sh, `bash -n` clean on their own). Where Python must insert a value they hold
a placeholder ``@@NAME@@``, which `fill` replaces; nothing else in them is touched.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import Mapping, Optional, Sequence

from hvdtrain.errors import UsageError
from hvdtrain.rundir import RunDir
from hvdtrain.slurm.spec import SlurmSpec
from hvdtrain.srunmpi import PLUGIN_ENV

_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def read_template(name: str) -> str:
    """The text of hvdtrain/slurm/templates/NAME (package data: also there in an installed wheel)."""
    return (resources.files("hvdtrain.slurm") / "templates" / name).read_text(encoding="utf-8")


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``@@NAME@@`` by values[NAME], in one pass (a value is not scanned again). A placeholder
    without a value, a value without a placeholder, or any other ``@@`` is a bug: ValueError."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    unused = sorted(set(values) - set(_PLACEHOLDER.findall(template)))
    if missing or unused or "@@" in _PLACEHOLDER.sub("", template):
        raise ValueError(f"template placeholders: no value for {missing}, no placeholder for {unused}, or a stray @@")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _code_line(text: str) -> str:
    """The one line of code of a snippet file (its comments and blank lines left out)."""
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(code) != 1:
        raise ValueError(f"a snippet must be one line of code, not {len(code)}")
    return code[0]


def _run_names() -> dict[str, str]:
    """The run-directory names the run section uses, from RunDir: logs/, logs/task-T/, rank.R.log."""
    run = RunDir("RUN_DIR")
    logs = run.logs
    return {
        "LOGS": logs.path.relative_to(run.path).as_posix(),
        "TASK_LOGS": logs.task("$task").path.relative_to(logs.path).as_posix(),
        "RANK_LOG": logs.log_pattern("%t").relative_to(logs.path).as_posix(),  # srun's %t: the task's rank
    }


# `bash -c "$pin" hvdtrain-pin K COMMAND...`: pin K GPUs by local rank, then exec COMMAND (templates/pin.sh).
PIN = _code_line(read_template("pin.sh"))
RUN_BODY = fill(read_template("run.sh"), {"PIN": shlex.quote(PIN), **_run_names()})


def sbatch_lines(options: Mapping[str, Optional[str]]) -> list[str]:
    """Sorted ``#SBATCH --name=value`` lines, each value shell-quoted (sbatch unquotes them)."""
    return [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(v)}" for k, v in sorted(options.items())]


def export_default(name: str, default: str = "") -> str:
    """``export NAME=${NAME:-DEFAULT}``: a value in the environment of sbatch wins over the script's."""
    return "export " + name + "=${" + name + ":-" + default + "}"


def compose(
    head: Sequence[str], options: Mapping[str, Optional[str]], settings: Sequence[str], command: Sequence[str]
) -> str:
    """A whole job script from its sections (see the module's docstring)."""
    rule = "# " + "-" * 100
    parts = ["#!/bin/bash", *head, rule, *sbatch_lines(options), rule]
    parts += ["# --- settings " + "-" * 88, *settings]
    parts += ["# --- command " + "-" * 89, *command]
    return "\n".join(parts) + "\n" + RUN_BODY


def render_script(spec: SlurmSpec, command: Sequence[str]) -> str:
    """The job script of `hvdtrain submit`: deterministic for a given spec and command."""
    if not command:
        raise UsageError("no command given: put it after --, e.g. hvdtrain submit -- hvdtrain train --run-dir runs/a")
    head = [
        "# Rendered by `hvdtrain submit`. Submit it again as it is with: sbatch THIS_FILE",
        "# (sbatch flags on the command line override the #SBATCH lines below).",
    ]
    settings = [
        f"export HVDTRAIN_RUN_DIR={shlex.quote(str(spec.run_dir))}",
        f"export HVDTRAIN_LAUNCHER={shlex.quote(spec.launcher)}",
        f"export HVDTRAIN_GPUS_PER_RANK={'' if spec.gpus_per_rank is None else spec.gpus_per_rank}",
        export_default("HVDTRAIN_SWEEP_VALUES"),
    ]
    if spec.mpi_plugin:
        settings.append(f"export {PLUGIN_ENV}={spec.mpi_plugin}")
    return compose(head, spec.sbatch_options(), settings, ["set -- " + shlex.join(command)])
