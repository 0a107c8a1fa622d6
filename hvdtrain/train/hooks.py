"""Hooks: the public way to watch or extend the Trainer's loop without subclassing it.

    class StepTimes(Hook):
        def on_step_end(self, trainer):
            self.stamps.append(time.perf_counter())

    Trainer(cfg, hooks=[StepTimes()]).fit()

Every method is called on every rank, at the same point of the loop, with the Trainer (its `state` holds the
model, optimizer, epoch, step_in_epoch, step and samples_in_epoch; during a step, `batch_indices` holds the
sample indices of its backward passes; `rank` and `size` are this rank's). A hook that runs a collective must do
so on every rank. In an elastic job a worker that joins later starts with on_fit_start while the others are
training, so on_fit_start must not run a collective there; and steps rolled back to the last commit after a
worker failed are taken (and their hooks called) again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from hvdtrain.files import writing
from hvdtrain.rundir import TIMELINE_STEPS_HEADER, RunDir

if TYPE_CHECKING:
    from hvdtrain.train.trainer import Trainer


class Hook:
    """Override any of these; the defaults do nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After set-up and restore (state.step is where training starts), before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each optimizer step's forward/backward passes."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step; state.step and state.step_in_epoch count it already."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After the last step of an epoch, before evaluation; state.epoch is still the finished epoch."""

    def on_checkpoint(self, trainer: Trainer, path: Optional[Path]) -> None:
        """After a checkpoint was taken (path on rank 0, None on the other ranks). With --async-checkpoint rank 0's
        file is still being written in the background: `trainer.writes.wait()` waits for it to be whole."""

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """After training (finished or preempted), with fit()'s result."""


class Hooks:
    """Calls each hook in order; the Trainer holds one of these."""

    def __init__(self, hooks: Sequence[Hook] = ()):
        self.hooks = list(hooks)

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def call(*args, **kwargs) -> None:
            for hook in self.hooks:
                getattr(hook, name)(*args, **kwargs)

        return call


def load_hooks(refs: Sequence[str]) -> list[Hook]:
    """The hooks of `hvdtrain train --hooks module:Name,...`, built: each Name a Hook subclass (instantiated without
    arguments), a function returning a Hook, or a Hook. The one loader of user hooks: the ranks build theirs with
    it, and `hvdtrain train` runs it before launch (check_in_child). Raises ConfigError naming the reference that
    does not load and why (no such module, no such name, the wrong kind, a constructor that needs arguments), or
    UserCodeError when the user's code raised (an import, a constructor), with the user's traceback."""
    return [_load_hook(ref) for ref in refs]


def _load_hook(ref: str) -> Hook:
    import importlib
    import inspect
    import os

    from hvdtrain.errors import ConfigError

    module_name, _, name = ref.partition(":")
    flag = f"--hooks {ref}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not e.name or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise _user_error(flag, f"importing {module_name}", e) from None  # a module the user's code imports
        raise ConfigError(
            f"{flag}: no module '{e.name}' in {os.getcwd()} or on PYTHONPATH; put {e.name.replace('.', '/')}.py "
            "there or fix the name"
        ) from None
    except (Exception, SystemExit) as e:
        raise _user_error(flag, f"importing {module_name}", e) from None
    obj: Any = module
    for attr in name.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"{flag}: {getattr(module, '__file__', module_name)} has no '{name}'; "
                              f"{_hooks_in(module)}") from None  # fmt: skip
        except (Exception, SystemExit) as e:
            raise _user_error(flag, f"looking up {name}", e) from None
    if isinstance(obj, Hook):
        return obj
    if isinstance(obj, type) and not issubclass(obj, Hook):
        raise ConfigError(f"{flag}: {name} is a class but not a subclass of hvdtrain.train.hooks.Hook; derive it "
                          "from Hook")  # fmt: skip
    if not callable(obj):
        raise ConfigError(f"{flag}: {name} is {_a(obj)}, not a Hook subclass or a function returning a "
                          "Hook; name one of those")  # fmt: skip
    try:
        inspect.signature(obj).bind()
    except TypeError as e:
        raise ConfigError(f"{flag}: {name}() needs arguments ({e}); give its parameters defaults, or name a "
                          "function that builds it with them") from None  # fmt: skip
    except ValueError:
        pass  # no signature to read (a builtin): calling it tells
    try:
        hook = obj()
    except (Exception, SystemExit) as e:
        raise _user_error(flag, f"{name}()", e) from None
    if not isinstance(hook, Hook):
        raise ConfigError(f"{flag}: {name}() returned {_a(hook)}, not a hvdtrain.train.hooks.Hook; "
                          "return an instance of a Hook subclass")  # fmt: skip
    return hook


def _a(obj: Any) -> str:
    """What `obj` is, with its article: "an int", "a str"."""
    kind = type(obj).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _hooks_in(module: Any) -> str:
    """The fix for a name the module lacks: the Hook subclasses it defines."""
    found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Hook) and v is not Hook]
    return f"its hooks: {', '.join(found)}" if found else "it defines no Hook subclass: fix the name"


def _user_error(flag: str, what: str, error: BaseException):
    """`error`, raised by the user's code while `what` ran: one line saying so, and the traceback of the user's own
    frames (hvdtrain's and Python's import machinery's left out): it is theirs to read."""
    import importlib
    import os
    import traceback

    from hvdtrain.errors import UserCodeError

    ours = (f"{Path(__file__).resolve().parents[1]}{os.sep}", f"{Path(importlib.__file__).parent}{os.sep}", "<frozen ")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(ours)]
    text = "".join(["Traceback (most recent call last):\n", *traceback.format_list(frames),
                    *traceback.format_exception_only(type(error), error)])  # fmt: skip
    # Where: a SyntaxError's message says it already.
    at = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames and not isinstance(error, SyntaxError) else ""
    said = " ".join(f"{type(error).__name__}: {error}".split())
    said = said if len(said) <= 200 else said[:197] + "..."
    return UserCodeError(f"{flag}: {what} raised {said}{at}; fix your code there (its traceback is above)", text)


CHECK_TIMEOUT_S = 120.0  # how long loading the hooks before a launch may take
# check_in_child's child: like a rank (`python -m hvdtrain.worker`), the working directory first on its path.
_CHILD = "import sys; from hvdtrain.train.hooks import _check_main; sys.exit(_check_main(sys.argv[1:]))"


def check_in_child(refs: Sequence[str], timeout: float = CHECK_TIMEOUT_S) -> None:
    """Load the --hooks `refs` as a rank will (load_hooks, from this directory, with this environment and its
    PYTHONPATH), in a short-lived child of this Python: the launching side imports none of the user's code (nor
    the torch it may import) and runs none of its side effects, and what the ranks would fail on is said before
    launch. Raises what load_hooks raises (UserCodeError with the user's traceback), or ConfigError when loading
    took longer than `timeout` seconds or ended the child without a verdict. Leaves nothing behind (no bytecode,
    no process)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from hvdtrain.errors import ConfigError, UserCodeError

    if not refs:
        return
    flag = f"--hooks {','.join(refs)}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *refs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, process_group=0,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ConfigError(
            f"{flag}: loading them took longer than {timeout:g} s; make importing the module and building the hooks "
            "quick (slow work belongs in on_fit_start)"
        ) from None
    try:
        verdict = json.loads(out)
    except ValueError:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"{flag}: loading them ended the process with exit status {proc.returncode} ({last}); load the module "
            "in Python to see why"
        ) from None
    if "error" in verdict:
        raise (
            UserCodeError(verdict["error"], verdict["traceback"])
            if verdict.get("traceback")
            else ConfigError(verdict["error"])
        )


def _check_main(refs: Sequence[str]) -> int:
    """check_in_child's child: the verdict, JSON, alone on stdout (the user's prints go to stderr)."""
    import json
    import os

    from hvdtrain.errors import ConfigError, UserCodeError

    verdict_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        load_hooks(refs)
        verdict: dict[str, Any] = {"ok": True}
    except UserCodeError as e:
        verdict = {"error": str(e), "traceback": e.user_traceback}
    except ConfigError as e:
        verdict = {"error": str(e)}
    with os.fdopen(verdict_fd, "w") as f:
        json.dump(verdict, f)
    return 0


class TimelineRecorder(Hook):
    """--timeline and --timeline-steps A:B: Horovod's (dynamic) timeline of the whole run or of steps A to B
    into `path`, and rank 0's step boundaries beside it (RunDir.timeline_steps: step, start and end in
    microseconds since the epoch, the unit of the timeline's own clock), so that each span falls in its step."""

    def __init__(self, path: Path, window: Optional[tuple[int, int]]):
        self.path = Path(path)
        self.steps_path = RunDir(self.path.parent).timeline_steps
        self.window = window
        self.recording = False
        self.steps_file = None
        self.started_us = 0

    def _start(self, trainer: Trainer) -> None:
        from hvdtrain.parallel import horovod

        horovod.start_timeline(self.path)
        self.recording = True
        if trainer.is_main:
            with writing(self.steps_path):
                self.steps_file = open(self.steps_path, "w")
                self.steps_file.write(TIMELINE_STEPS_HEADER + "\n")

    def _stop(self) -> None:
        from hvdtrain.parallel import horovod

        if self.recording:
            horovod.stop_timeline()
            self.recording = False
        if self.steps_file is not None:
            self.steps_file.close()
            self.steps_file = None

    def on_fit_start(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.window is None:
            self._start(trainer)
        elif step >= self.window[1] and trainer.is_main:
            print(f"hvdtrain: --timeline-steps {self.window[0]}:{self.window[1]}: the run starts after step {step}, "
                  "so nothing is recorded", flush=True)  # fmt: skip

    def on_step_start(self, trainer: Trainer) -> None:
        step = trainer.state.step + 1
        if self.window is not None and not self.recording and self.window[0] <= step <= self.window[1]:
            self._start(trainer)
        self.started_us = time.time_ns() // 1000

    def on_step_end(self, trainer: Trainer) -> None:
        if self.steps_file is not None:
            with writing(self.steps_path):
                self.steps_file.write(f"{trainer.state.step},{self.started_us},{time.time_ns() // 1000}\n")
                self.steps_file.flush()
        if self.window is not None and trainer.state.step >= self.window[1]:
            self._stop()

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._stop()
