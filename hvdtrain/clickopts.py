"""The CLI's option machinery: click options generated from the dataclasses that declare them (TrainConfig,
SlurmSpec, LaunchOptions, ElasticOptions, the bench settings), a YAML --config as click's default_map, and errors
as one line with exit status 2. Light like the CLI itself: click and the ground floor at import time.
"""

from __future__ import annotations

import functools
import sys
import traceback
import types

import click

from hvdtrain.errors import HvdtrainError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

PASSTHROUGH = {**CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False}


def dataclass_options(cls, **overrides):
    """One option per field of the dataclass `cls` (TrainConfig, SlurmSpec, LaunchOptions, ElasticOptions), its
    default and help written once on the field (metadata "help", and "choices" for a OneOf); `--flag/--no-flag` for
    booleans, except fields that name their "flags" (the launch options: plain switches, a metavar). `overrides`
    maps a field name to click.option keywords that replace the generated ones."""
    import dataclasses
    import typing

    def decorate(f):
        hints = typing.get_type_hints(cls)
        for field in reversed(dataclasses.fields(cls)):
            meta = field.metadata
            flag = "--" + field.name.replace("_", "-")
            kind = hints[field.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] -> X
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            choices, message = meta.get("choices"), meta.get("choices_error")
            show = meta.get("show_default", field.default is not None)
            decls, kwargs = [flag], {"default": field.default, "show_default": show}
            if "flags" in meta:  # the launch options' style: their own flags, plain switches, a metavar
                decls = [*(meta["flags"] or [flag]), field.name]
                kwargs["metavar"] = meta.get("metavar")
            if kind is bool and "flags" in meta:
                kwargs["is_flag"] = True
            elif kind is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            elif typing.get_origin(kind) is tuple:  # tuple[str, ...]: repeatable; tuple[int, int]: MIN MAX
                args = typing.get_args(kind)
                if args[-1] is Ellipsis:
                    kwargs.update(multiple=True, type=args[0])
                else:
                    kwargs["type"] = args
            else:
                kwargs["type"] = (OneOf(choices, message) if message else OneOf(choices)) if choices else kind
            kwargs.update(help=meta.get("help", ""), **overrides.get(field.name, {}))
            f = click.option(*decls, **kwargs)(f)
        return f

    return decorate


def launch_options(f):
    """The options of every command that starts ranks (run, train, bench): one per LaunchOptions field, and
    --dry-run."""
    from hvdtrain.launching.options import LaunchOptions

    f = click.option("--dry-run", is_flag=True, help="Print the exact command and environment additions; run nothing.")(
        f
    )
    return dataclass_options(LaunchOptions)(f)


def elastic_options(f):
    """The options of an elastic job (run, train): one per ElasticOptions field, horovodrun's names."""
    from hvdtrain.launching.options import ElasticOptions

    return dataclass_options(ElasticOptions)(f)


DEBUG_ENV = "HVDTRAIN_DEBUG"  # =1: a failure's Python traceback on the terminal too (as `hvdtrain --debug`)


class OneLineErrors(click.Group):
    """The command line's one error boundary: every command ends in success (0), a usage error (one line
    `hvdtrain: error: <cause>; <fix>`, exit 2: click's own and hvdtrain's UsageError), or a runtime failure (one
    line, exit 1 or the job's status). A failure hvdtrain did not foresee (a bug) or an operating system's error
    is one line as well, its traceback kept in a file named in that line (the run's logs/ once the command has
    one: errors.keep_tracebacks_in); `hvdtrain --debug` or HVDTRAIN_DEBUG=1 prints it on the terminal too."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        from hvdtrain import errors

        argv = list(sys.argv[1:] if args is None else args)
        debug = _debug_wanted(argv)
        try:
            rv = super().main(argv, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):  # Ctrl-C (click turns it into Abort while parsing), a prompt
            click.echo("hvdtrain: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) else "hvdtrain"
            _say_error(f"{e.format_message()} (see '{where} --help')")
            sys.exit(e.exit_code)
        except errors.HvdtrainError as e:
            if debug:
                traceback.print_exc()
            if getattr(e, "user_traceback", ""):  # the user's own code raised: their traceback (theirs), then the line
                click.echo(e.user_traceback, err=True, nl=False)
            _say_error(str(e), lines=not isinstance(e, errors.UsageError))  # a failed job: its rank's last lines
            sys.exit(e.exit_code)
        except Exception as e:  # noqa: BLE001 - the boundary: whatever escaped a command ends as one line
            if debug:
                traceback.print_exc()
            _say_error(_unforeseen(e, argv))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _unforeseen(error: BaseException, argv) -> str:
    """One line for an exception that escaped a command (the CLI's boundary, clickopts.OneLineErrors): an operating
    system's error names its file and cause (a full disk the space left), anything else is a bug in hvdtrain. The
    traceback, with the command line and version, is appended to a log whose path the line gives."""
    import datetime
    import os
    from pathlib import Path

    from hvdtrain import __version__
    from hvdtrain.errors import traceback_dir
    from hvdtrain.files import FULL_ERRNOS, cache_dir, full_disk
    from hvdtrain.rundir import TRACEBACK_LOG

    now = datetime.datetime.now()
    if traceback_dir() is not None:
        log = Path(traceback_dir()) / TRACEBACK_LOG
    else:
        log = cache_dir() / "tracebacks" / f"{now:%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(
                f"{now.isoformat(timespec='seconds')} hvdtrain {__version__}: hvdtrain {' '.join(map(str, argv))}\n"
            )
            f.write(text + "\n")
        kept = f"the traceback is in {log}"
    except OSError:
        kept = "its traceback could not be kept (HVDTRAIN_DEBUG=1 shows it)"
    if isinstance(error, OSError) and error.strerror:
        full = full_disk(error.filename, error) if error.filename is not None else None
        if full is not None:
            return f"{full} ({kept})"
        if error.errno in FULL_ERRNOS:
            return f"a write failed: the file system is full; free some space, or write elsewhere ({kept})"
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}; check the path and its permissions ({kept})"
    return (
        f"internal error (a bug in hvdtrain): {type(error).__name__}: {error}; {kept}: please report it with that "
        "file (hvdtrain --debug shows it here)"
    )


def _say_error(message: str, lines: bool = False) -> None:
    """`hvdtrain: error: <message>` on stderr as one line: what the message quotes of the user's input (a file's
    contents, an argument) keeps its control characters and line breaks escaped; with `lines`, line breaks stay
    (a failed job's report: the cause, then the failing rank's last lines)."""
    shown = "".join(c if c.isprintable() or (lines and c == "\n") else repr(c)[1:-1] for c in message)
    click.echo(f"hvdtrain: error: {shown}", err=True)


def _debug_wanted(argv: list) -> bool:
    """`hvdtrain --debug COMMAND ...` (the flag is the group's, so before the command; taken out of argv here) or
    HVDTRAIN_DEBUG set to anything but empty or 0."""
    import os

    if argv[:1] == ["--debug"]:
        del argv[0]
        return True
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# What matplotlib's savefig writes, by the file's suffix (matplotlib 3.x; a --plot is checked before any work).
PLOT_FORMATS = tuple("png pdf svg svgz eps ps jpg jpeg tif tiff webp gif pgf".split())


class PlotPath(click.ParamType):
    """A --plot file: its suffix names a picture format matplotlib writes (.png, .pdf, .svg, ...)."""

    name = "png"

    def convert(self, value, param, ctx):
        import os

        suffix = str(value).rpartition(".")[2].lower() if "." in str(value).rpartition("/")[2] else ""
        if suffix not in PLOT_FORMATS and not os.path.isdir(value):  # a folder: files.check_output_path says so
            self.fail(
                f"'{value}' does not end in a picture format's suffix; use .png (or {', '.join(PLOT_FORMATS[1:6])}, "
                "...)", param, ctx,
            )  # fmt: skip
        return value


class OneOf(click.Choice):
    """click.Choice (the values listed in --help, built from a tuple of valid values) whose error is one line
    in the words of the validation behind it, e.g. `--strategy: 'x' is not one of data, model, hybrid`."""

    def __init__(self, choices, message: str = "'{value}' is not one of {choices}"):
        super().__init__(choices)
        self.message = message

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        from hvdtrain.errors import UsageError

        raise UsageError(f"{param.opts[0]}: " + self.message.format(value=value, choices=", ".join(self.choices)))


def _parse_balance(ctx, param, value):
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(v) for v in str(value).split(",")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of layer counts, e.g. 3,4") from None


def dataclass_options_subset(*names: str):
    """The options of these TrainConfig fields only (as `hvdtrain train` has them)."""
    import dataclasses

    from hvdtrain.config import TrainConfig

    fields = [f for f in dataclasses.fields(TrainConfig) if f.name in names]
    subset = dataclasses.make_dataclass("Subset", [(f.name, f.type, f) for f in fields])
    return dataclass_options(subset)


def train_options(f):
    """The options of `hvdtrain train`: one per TrainConfig field."""
    from hvdtrain.config import TrainConfig

    balance = {"type": str, "callback": _parse_balance, "metavar": "N,N,...", "show_default": False}
    return dataclass_options(TrainConfig, balance=balance)(f)


def config_file(ctx, param, value):
    """--config FILE.yaml fills click's default_map: precedence is CLI > file > defaults."""
    if value:
        from hvdtrain.config import load_yaml_defaults

        params = {p.name: p for p in ctx.command.params if p.name not in ("config", "dry_run")}
        try:
            loaded = load_yaml_defaults(value, set(params))
        except HvdtrainError as e:
            raise click.BadParameter(str(e).removeprefix("--config: "), ctx=ctx, param=param) from None
        for name, item in loaded.items():
            _check_config_value(value, params[name], item, ctx)
        if isinstance(loaded.get("balance"), list):  # click passes a default through its type (str) first
            loaded["balance"] = ",".join(map(str, loaded["balance"]))
        ctx.default_map = {**(ctx.default_map or {}), **loaded}
    return value


def _check_config_value(path: str, param: click.Parameter, item, ctx) -> None:
    """A --config value has the option's type (a list only for --balance), so that click's conversion of it
    later cannot fail with a traceback."""
    flag = param.opts[0]
    fail = None
    if isinstance(item, dict) or (isinstance(item, list) and param.name != "balance"):
        fail = f"{flag} takes a single value, not {item!r}"
    elif isinstance(item, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            fail = f"{flag} takes layer counts, e.g. [3, 4], not {item!r}"
    elif item is not None and not isinstance(item, bool) and isinstance(param.type, click.types.BoolParamType):
        fail = f"{flag} takes true or false, not {item!r}"
    elif isinstance(item, float) and isinstance(param.type, click.types.IntParamType) and not item.is_integer():
        fail = f"{flag} takes a whole number, not {item!r}"
    elif item is not None:
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as e:
            fail = f"{flag}: {e.message}"
        except (HvdtrainError, TypeError, ValueError) as e:
            fail = str(e)
    if fail:
        from hvdtrain.errors import ConfigError

        raise ConfigError(f"--config {path}: {fail}")


class _CommaList(click.ParamType):
    """A comma-separated list of a bench field's choices, parsed by hvdtrain.bench.plans.parse_csv."""

    name = "list"

    def __init__(self, flag: str, choices: tuple):
        self.flag, self.choices = flag, choices

    def convert(self, value, param, ctx):
        from hvdtrain.bench import plans

        if isinstance(value, tuple):
            return value
        try:
            return plans.parse_csv(value, self.choices, self.flag)
        except HvdtrainError as e:
            self.fail(str(e).removeprefix(f"{self.flag}: "), param, ctx)


def bench_options(settings_name: str):
    """One option per field of hvdtrain.bench.plans.<settings_name>, its help, default and --tiny default
    written once there (options not given arrive as None); the command gets them as one dict, `options`."""
    import dataclasses
    import typing

    from hvdtrain.bench import plans

    settings = getattr(plans, settings_name)
    hints = typing.get_type_hints(settings)
    fields = dataclasses.fields(settings)

    def decorate(f):
        @functools.wraps(f)
        def command(*args, **kwargs):
            return f(*args, options={field.name: kwargs.pop(field.name) for field in fields}, **kwargs)

        for field in reversed(fields):
            flag, help_text = plans.flag(field.name), plans.help_text(field)
            kind = next((a for a in typing.get_args(hints[field.name]) if a is not type(None)), hints[field.name])
            if field.metadata["choices"]:
                choices = _CommaList(flag, field.metadata["choices"])
                option = click.option(flag, type=choices, metavar="NAME,...", help=help_text)
            elif kind is bool and field.default:
                option = click.option(f"{flag}/--no-{flag[2:]}", default=True, help=help_text)
            elif kind is bool:
                option = click.option(flag, is_flag=True, help=help_text)
            else:
                option = click.option(flag, type=kind, help=help_text)
            command = option(command)
        return command

    return decorate


def slurm_options(f):
    """The options of `hvdtrain submit`: one per SlurmSpec field."""
    from hvdtrain.slurm.spec import SlurmSpec

    return dataclass_options(SlurmSpec)(f)
