"""The `calibrate` command line: a thin layer over the library.

    calibrate models                          # the model zoo
    calibrate simulate MODEL [...]            # trajectories as long-format CSV
    calibrate fit MODEL DATA.csv --out DIR    # individual fits -> parameters.csv/json

MODEL is a zoo name (`calibrate models`) or `path/to/file.py:ClassName`.

Input problems (unreadable or invalid data, unknown models or parameters, malformed
options) are reported one per line on stderr, without a traceback, and exit with
status 2. Set `CALIBRATE_DEBUG=1` to get the traceback instead.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import calibrate as cal

from ._io import write_csv_atomic, write_json_atomic


EXIT_INPUT_ERROR = 2
EXIT_RUNTIME_ERROR = 1
_MAX_ERRORS_SHOWN = 25
_MAX_ROWS_SHOWN = 25
_DEFAULTS = cal.Integrator()


# --------------------------------------------------------------------------------------
# Errors


class CLIError(Exception):
    """A problem with the user's input; each message is printed on its own line."""

    def __init__(self, *messages: str, exit_code: int = EXIT_INPUT_ERROR):
        self.messages = [m for m in messages if m]
        self.exit_code = exit_code
        super().__init__("\n".join(self.messages))


def _stderr() -> Console:
    # Created per use so it follows whatever sys.stderr is at the time (tests swap it).
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _stdout() -> Console:
    return Console(soft_wrap=False, highlight=False)


def print_errors(messages: Sequence[str]) -> None:
    """Print one `error: ...` line per message on stderr (capped, with a count)."""
    console = _stderr()
    shown = list(messages[:_MAX_ERRORS_SHOWN])
    for message in shown:
        # Newlines inside a message would split one problem over several lines.
        one_line = " ".join(str(message).split("\n"))
        console.print("[bold red]error:[/] ", end="")
        console.print(one_line, markup=False)
    if len(messages) > len(shown):
        console.print(f"... and {len(messages) - len(shown)} more problems", markup=False)


def _messages_of(error: BaseException) -> list[str]:
    if isinstance(error, CLIError):
        return error.messages
    if isinstance(error, cal.DataError):
        return [str(issue) for issue in error.issues] or [str(error)]
    if isinstance(error, FileNotFoundError) and error.filename:
        return [f"{error.filename}: file not found"]
    if isinstance(error, OSError) and error.filename:
        return [f"{error.filename}: {error.strerror or error}"]
    return [str(error) or type(error).__name__]


def handle_errors(command: Callable) -> Callable:
    """Turn input errors raised by a command into clean messages and exit status 2.

    Handled: `CLIError` (raised here, e.g. for an unknown zoo model or a malformed
    option), `calibrate.DataError` (one line per issue, naming file, row and column),
    `calibrate.ParameterError` and other `ValueError`s, and `OSError` (missing or
    unwritable files). Anything else is a bug and keeps its traceback.
    `CALIBRATE_DEBUG=1` re-raises everything.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (CLIError, ValueError, OSError) as error:
            if os.environ.get("CALIBRATE_DEBUG"):
                raise
            print_errors(_messages_of(error))
            code = error.exit_code if isinstance(error, CLIError) else EXIT_INPUT_ERROR
            raise typer.Exit(code) from None

    return wrapper


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------
# Models


@dataclass
class ResolvedModel:
    model: cal.AbstractODEModel
    module: ModuleType | None  # the zoo module or the user's file, if any
    spec: str  # what the user typed

    @property
    def default_times(self):
        return getattr(self.module, "OBSERVATION_TIMES", None)


def _is_file_spec(spec: str) -> bool:
    return ":" in spec or spec.endswith(".py") or "/" in spec or os.sep in spec


def _import_file(path: Path) -> ModuleType:
    if not path.exists():
        raise CLIError(f"{path}: model file not found")
    if not path.is_file():
        raise CLIError(f"{path}: not a file")
    name = f"calibrate_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its siblings, as `python file.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        sys.modules.pop(name, None)
        where = ""
        if isinstance(error, SyntaxError) and error.lineno:
            where = f", line {error.lineno}"
        else:
            lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
                     if Path(f.filename).resolve() == path.resolve()]
            if lines:
                where = f", line {lines[-1]}"
        raise CLIError(
            f"{path}{where}: importing the model file failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    finally:
        try:
            sys.path.remove(str(path.resolve().parent))
        except ValueError:  # the file removed it itself
            pass
    return module


def _model_classes(module: ModuleType) -> list[str]:
    return sorted(
        name for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, cal.AbstractODEModel)
        and obj is not cal.AbstractODEModel and obj.__module__ == module.__name__
    )


def resolve_model(spec: str) -> ResolvedModel:
    """A zoo name, `path/to/file.py:ClassName`, or `path/to/file.py` (its `MODEL`)."""
    spec = spec.strip()
    if not _is_file_spec(spec):
        try:
            module = cal.zoo_module(spec)
        except KeyError as error:  # its message names the available models
            raise CLIError(
                f"{error.args[0]}{_did_you_mean(spec, cal.zoo_names())}; or give "
                "path/to/file.py:ClassName"
            ) from None
        return ResolvedModel(module.MODEL(), module, spec)
    path_text, _, class_name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if ":" in spec and not path_text:
        raise CLIError(f"model {spec!r}: expected path/to/file.py:ClassName")
    path = Path(path_text)
    module = _import_file(path)
    classes = _model_classes(module)
    if not class_name:
        if isinstance(getattr(module, "MODEL", None), type):
            class_name = module.MODEL.__name__
            cls = module.MODEL
        elif len(classes) == 1:
            class_name = classes[0]
            cls = getattr(module, class_name)
        else:
            found = ", ".join(classes) or "none"
            raise CLIError(
                f"{path}: name the model class as {path}:ClassName (model classes found: "
                f"{found})"
            )
    else:
        if not class_name.isidentifier():
            raise CLIError(f"model {spec!r}: {class_name!r} is not a class name")
        cls = getattr(module, class_name, None)
        if cls is None:
            found = ", ".join(classes) or "none"
            raise CLIError(
                f"{path}: no class {class_name!r}{_did_you_mean(class_name, classes)}; "
                f"model classes found: {found}"
            )
    if not (isinstance(cls, type) and issubclass(cls, cal.AbstractODEModel)):
        raise CLIError(
            f"{path}: {class_name} is not a subclass of calibrate.AbstractODEModel"
        )
    try:
        model = cls()
    except Exception as error:
        raise CLIError(
            f"{path}: creating {class_name}() failed: {type(error).__name__}: {error}"
        ) from None
    return ResolvedModel(model, module, spec)


# --------------------------------------------------------------------------------------
# Option parsing


def parse_assignments(items: Sequence[str] | None, option: str) -> dict[str, float]:
    """`["a=1", "b=2,c=3"]` -> `{"a": 1.0, "b": 2.0, "c": 3.0}`; all problems at once."""
    values: dict[str, float] = {}
    problems = []
    for item in items or ():
        for piece in item.split(","):
            piece = piece.strip()
            if not piece:
                continue
            name, sep, text = (s.strip() for s in piece.partition("="))
            if not sep or not name or not text:
                problems.append(
                    f"{option} {piece!r}: expected NAME=VALUE (e.g. {option} kf=2.0)"
                )
                continue
            if not name.isidentifier():
                problems.append(f"{option} {piece!r}: {name!r} is not a parameter name")
                continue
            try:
                value = float(text)
            except ValueError:
                problems.append(f"{option} {piece!r}: {text!r} is not a number")
                continue
            if not math.isfinite(value):
                problems.append(f"{option} {piece!r}: the value must be finite")
            elif name in values:
                problems.append(f"{option}: {name} is given more than once")
            else:
                values[name] = value
    if problems:
        raise CLIError(*problems)
    return values


def parse_names(items: Sequence[str] | None) -> list[str]:
    """`["k1,k2", "k3"]` -> `["k1", "k2", "k3"]`."""
    return [n.strip() for item in items or () for n in item.split(",") if n.strip()]


def check_parameter_names(model: cal.AbstractODEModel, names: Iterable[str],
                          option: str) -> None:
    known = model.parameter_space.names
    problems = [
        f"{option} {name}: model {model.name} has no parameter {name!r}"
        f"{_did_you_mean(name, known)}; its parameters are {', '.join(known)}"
        for name in names if name not in known
    ]
    if problems:
        raise CLIError(*problems)


def _check_tolerances(rtol: float, atol: float) -> None:
    problems = [f"--{name} {value:g}: must be a positive number"
                for name, value in (("rtol", rtol), ("atol", atol))
                if not (math.isfinite(value) and value > 0)]
    if problems:
        raise CLIError(*problems)


_TIMES_HELP = (
    "expected START:STOP:N (e.g. 0:10:50) or a comma-separated list (e.g. 0,1,2.5)"
)


def parse_times(text: str, t0: float = 0.0) -> np.ndarray:
    """`"0:10:50"` -> 50 evenly spaced times from 0 to 10; `"0,1,2.5"` -> those times."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise CLIError(f"--times {text!r}: N must be at least 1")
            if stop < start:
                raise CLIError(f"--times {text!r}: STOP must not be below START")
            times = np.linspace(start, stop, count)
        else:
            times = np.array([float(p) for p in text.split(",")])
    except ValueError:
        raise CLIError(f"--times {text!r}: {_TIMES_HELP}") from None
    if not np.all(np.isfinite(times)):
        raise CLIError(f"--times {text!r}: times must be finite")
    if np.any(np.diff(times) < 0):
        raise CLIError(f"--times {text!r}: times must be in non-decreasing order")
    if times[0] < t0:
        raise CLIError(f"--times {text!r}: times must not precede the model's t0={t0:g}")
    return times


# --------------------------------------------------------------------------------------
# Commands

app = typer.Typer(
    name="calibrate",
    help="Calibrate ODE models of biological systems to data.\n\n"
    "MODEL arguments take a zoo name (see [bold]calibrate models[/]) or "
    "[bold]path/to/file.py:ClassName[/] for your own model class.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"calibrate {cal.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Show the version and exit.")
    ] = False,
):
    pass


def _parameter_summary(model: cal.AbstractODEModel) -> str:
    return ", ".join(
        p.name if p.estimate else f"{p.name}*" for p in model.parameters
    )


@app.command(
    epilog="Example: [bold]calibrate models[/]",
)
@handle_errors
def models():
    """List the models of the zoo: description, states, parameters and observables.

    Parameters marked * are not estimated by default (name them with
    --estimate to fit them).
    """
    table = Table(title="calibrate model zoo", show_lines=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("description", min_width=11, overflow="fold")
    for header in ("states", "parameters", "observables"):
        table.add_column(header, min_width=len(header))
    for name in cal.zoo_names():
        model = cal.zoo_model(name)
        table.add_row(*map(escape, (
            name,
            model.describe(),
            ", ".join(model.states),
            _parameter_summary(model),
            ", ".join(model.observable_names),
        )))
    table.caption = "* not estimated by default"
    _stdout().print(table)


@app.command(
    epilog="Examples:\n\n"
    "  [bold]calibrate simulate reference --param p=2 --times 0:10:101 --out x.csv[/]\n\n"
    "  [bold]calibrate simulate enzyme_kinetics --param kf=3,kcat=0.2[/]\n\n"
    "  [bold]calibrate simulate my_model.py:Toggle --times 0,1,2,5,10[/]",
)
@handle_errors
def simulate(
    model: Annotated[str, typer.Argument(
        help="Zoo model name or path/to/file.py:ClassName.", show_default=False)],
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", metavar="NAME=VALUE",
        help="Set a parameter (repeatable, or comma-separated); others keep their "
        "defaults.")] = None,
    times: Annotated[str | None, typer.Option(
        "--times", "-t", metavar="START:STOP:N|T1,T2,...",
        help="Output times: N evenly spaced from START to STOP, or a list. "
        "Default: the model file's OBSERVATION_TIMES.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FILE.csv",
        help="Write the CSV here (atomically) instead of to stdout.")] = None,
    states: Annotated[bool, typer.Option(
        "--states/--no-states", help="Also write the state variables.")] = True,
    rtol: Annotated[float, typer.Option(
        help="Relative tolerance of the ODE solver.")] = _DEFAULTS.rtol,
    atol: Annotated[float, typer.Option(
        help="Absolute tolerance of the ODE solver.")] = _DEFAULTS.atol,
):
    """Simulate MODEL and write its trajectory as long-format CSV.

    Columns: time, kind ("observable" or "state"), name, value: one
    row per time and variable, observables first.
    """
    _check_tolerances(rtol, atol)
    resolved = resolve_model(model)
    m = resolved.model
    values = parse_assignments(param, "--param")
    check_parameter_names(m, values, "--param")
    params = m.parameter_space.complete(values)
    if times is not None:
        t = parse_times(times, m.t0)
    elif resolved.default_times is not None:
        t = np.asarray(resolved.default_times, dtype=float)
    else:
        raise CLIError(f"model {resolved.spec} defines no OBSERVATION_TIMES: give --times")
    trajectory = cal.simulate(m, params, t, integrator=cal.Integrator(rtol=rtol, atol=atol))
    if not bool(trajectory.ok):
        code = cal.result_code(trajectory.result)
        raise CLIError(
            f"the simulation of {m.name} failed ({cal.result_name(code)}): "
            f"{cal.result_message(code)}",
            exit_code=EXIT_RUNTIME_ERROR,
        )
    frame = trajectory_frame(m, trajectory, states=states)
    if out is None:
        sys.stdout.write(frame.to_csv(index=False, lineterminator="\n"))
    else:
        write_csv_atomic(out, frame)
        _stderr().print(f"wrote {len(frame)} rows to {out}", markup=False)


def trajectory_frame(model: cal.AbstractODEModel, trajectory: cal.Trajectory, *,
                     states: bool = True) -> pd.DataFrame:
    """Long format: time, kind, name, value (observables first, then states)."""
    times = np.asarray(trajectory.times)
    blocks = [("observable", model.observable_names, np.asarray(trajectory.observables))]
    if states:
        blocks.append(("state", model.states, np.asarray(trajectory.states)))
    frames = []
    for kind, names, values in blocks:
        for k, name in enumerate(names):
            frames.append(pd.DataFrame(
                {"time": times, "kind": kind, "name": name, "value": values[:, k]}
            ))
    return pd.concat(frames, ignore_index=True)


def _format_estimate(value: float, se: float, scale: str, sep: str = " ") -> str:
    """`1.803 ±3.4%` (log scales: relative error) or `1.98 ±0.05` (linear scale)."""
    text = f"{value:.4g}"
    if not math.isfinite(se):
        return f"{text}{sep}±inf"
    if scale == "log":
        return f"{text}{sep}±{100 * se:.2g}%"
    if scale == "log10":
        return f"{text}{sep}±{100 * se * math.log(10):.2g}%"
    return f"{text}{sep}±{se:.2g}"


def _fit_summary_table(result: cal.FitResult, model: cal.AbstractODEModel,
                       width: int = 80) -> Table:
    """One row per individual with a column per parameter ("1.803 ±3.4%") when that
    fits in `width`; else one row per (individual, parameter)."""
    estimates = np.asarray(result.estimates)
    se = np.asarray(result.standard_errors)
    loss = np.asarray(result.loss)
    codes = np.asarray(result.result)
    space = model.parameter_space
    n = len(result.individuals)
    statuses = [cal.result_name(c) for c in codes]
    status_width = max(len(s) for s in statuses) if statuses else 10
    name_width = max([len("individual"), *(len(i) for i in result.individuals)])
    cell = lambda i, j, sep=" ": _format_estimate(
        estimates[i, j], se[i, j], space[result.estimated[j]].scale, sep
    )
    styled = lambda s: f"[green]{s}[/]" if s == "successful" else f"[red]{s}[/]"
    title = escape(f"{model.name}: individual fits")
    # Wide layout: estimates on two lines ("1.803" over "±3.4%"), so a column needs
    # about 8 characters; rich adds 3 per column (padding, rule) and 1.
    columns = [name_width, *(max(len(p), 8) for p in result.estimated), 8, status_width]
    wide = sum(columns) + 3 * len(columns) + 1
    if wide <= width:
        table = Table(title=title)
        table.add_column("individual", no_wrap=True)
        for name in result.estimated:
            table.add_column(name, justify="right", min_width=max(len(name), 8))
        table.add_column("loss", justify="right", min_width=8)
        table.add_column("status", no_wrap=True)
        shown = min(n, _MAX_ROWS_SHOWN)
        for i in range(shown):
            table.add_row(
                escape(result.individuals[i]),
                *[cell(i, j, "\n") for j in range(len(result.estimated))],
                f"{loss[i]:.6g}",
                styled(statuses[i]),
            )
    else:
        table = Table(title=title)
        table.add_column("individual", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("loss", justify="right")
        table.add_column("parameter", no_wrap=True)
        table.add_column("estimate", justify="right", no_wrap=True)
        shown = min(n, max(1, _MAX_ROWS_SHOWN // max(1, len(result.estimated))))
        for i in range(shown):
            for j, name in enumerate(result.estimated):
                first = j == 0
                table.add_row(
                    escape(result.individuals[i]) if first else "",
                    styled(statuses[i]) if first else "",
                    f"{loss[i]:.6g}" if first else "",
                    name,
                    cell(i, j),
                )
            table.add_section()
    if n > shown:
        table.caption = f"... and {n - shown} more individuals: see parameters.csv"
    return table


def fit_report(result: cal.FitResult, model: cal.AbstractODEModel, *, model_spec: str,
               data: str, fixed: dict[str, float], settings: dict[str, Any]) -> dict:
    """The content of parameters.json."""
    import diffrax
    import jax
    import optimistix

    space = model.parameter_space
    estimates = np.asarray(result.estimates)
    se = np.asarray(result.standard_errors)
    codes = np.asarray(result.result)
    individuals = []
    for i, ind in enumerate(result.individuals):
        individuals.append({
            "individual": ind,
            "estimates": {n: estimates[i, j] for j, n in enumerate(result.estimated)},
            "standard_errors": {n: se[i, j] for j, n in enumerate(result.estimated)},
            "loss": result.loss[i],
            "grad_norm": result.grad_norm[i],
            "steps": result.steps[i],
            "status": cal.result_name(codes[i]),
            "message": cal.result_message(codes[i]),
        })
    return {
        "model": model.name,
        "model_spec": model_spec,
        "data": data,
        "estimated": list(result.estimated),
        "scales": {n: space[n].scale for n in result.estimated},
        "standard_errors_note": (
            "standard errors are on each parameter's scale (see 'scales': for 'log' an "
            "absolute error of log(value), i.e. a relative error); null means not "
            "identifiable"
        ),
        "fixed": fixed,
        "settings": settings,
        "n_individuals": len(result.individuals),
        "n_successful": int(np.sum(codes == cal.RESULTS.successful._value)),
        "individuals": individuals,
        "calibrate_version": cal.__version__,
        "versions": {
            "calibrate": cal.__version__, "jax": jax.__version__,
            "diffrax": diffrax.__version__, "optimistix": optimistix.__version__,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@app.command(
    epilog="Examples:\n\n"
    "  [bold]calibrate fit enzyme_kinetics examples/enzyme_kinetics/measurements.csv "
    "--out results/enzyme[/]\n\n"
    "  [bold]calibrate fit enzyme_kinetics data.csv --out fits --estimate kf,kcat "
    "--fix kr=1.0 --starts 8[/]\n\n"
    "  [bold]calibrate fit models/my_model.py:Toggle data.tsv --out fits[/]",
)
@handle_errors
def fit(
    model: Annotated[str, typer.Argument(
        help="Zoo model name or path/to/file.py:ClassName.", show_default=False)],
    data: Annotated[Path, typer.Argument(
        help="Measurements in long format (CSV, TSV or Parquet) with columns "
        "individual, time, observable, value and optionally sigma.",
        show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR",
        help="Output directory (created if missing) for parameters.csv and "
        "parameters.json; other files in it are left alone.", show_default=False)],
    estimate: Annotated[list[str] | None, typer.Option(
        "--estimate", "-e", metavar="NAME,NAME",
        help="Parameters to estimate (comma-separated or repeated). Default: the "
        "model's estimated parameters minus those given with --fix.")] = None,
    fix: Annotated[list[str] | None, typer.Option(
        "--fix", "-f", metavar="NAME=VALUE",
        help="Fix a parameter at a value (repeatable, or comma-separated).")] = None,
    starts: Annotated[int, typer.Option(
        min=0, help="Extra Sobol start points per individual (0: start from the "
        "defaults only).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the start points.")] = 0,
    max_steps: Annotated[int, typer.Option(
        min=1, help="Optimiser step limit per start.")] = 256,
    rtol: Annotated[float, typer.Option(
        help="Relative tolerance of the ODE solver.")] = _DEFAULTS.rtol,
    atol: Annotated[float, typer.Option(
        help="Absolute tolerance of the ODE solver.")] = _DEFAULTS.atol,
):
    """Fit MODEL to each individual in DATA (maximum likelihood).

    Writes DIR/parameters.csv (one row per individual: estimates,
    standard errors, loss, grad_norm, steps, status) and
    DIR/parameters.json (the same plus the messages of failed fits,
    the settings and versions), and prints a summary table.

    Standard errors are on each parameter's scale (relative errors for
    log-scale parameters). The exit status is 0 once the results are
    written, even if some fits did not converge (see their status).
    """
    _check_tolerances(rtol, atol)
    resolved = resolve_model(model)
    m = resolved.model
    fixed = parse_assignments(fix, "--fix")
    check_parameter_names(m, fixed, "--fix")
    if estimate is not None:
        names = parse_names(estimate)
        check_parameter_names(m, names, "--estimate")
        both = [n for n in names if n in fixed]
        if both:
            raise CLIError(*[f"{n} is given both to --estimate and to --fix" for n in both])
        if not names:
            raise CLIError("--estimate: no parameter names given")
    else:
        names = [p.name for p in m.parameters if p.estimate and p.name not in fixed]
        if not names:
            raise CLIError("nothing to estimate: every estimated parameter is fixed; "
                           "name some with --estimate")
    all_values = m.parameter_space.complete(fixed)  # bounds check (ParameterError)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    dataset = cal.dataset_for_model(m, data)
    out.mkdir(parents=True, exist_ok=True)

    integrator = cal.Integrator(rtol=rtol, atol=atol)
    message = (f"fitting {len(dataset)} individual(s) of {escape(str(data))} "
               "(compiling first, which takes a while)")
    with _stderr().status(message), warnings.catch_warnings():
        # Sobol points warn when n is not a power of two; the points are still fine.
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        result = cal.fit(
            m, dataset, estimate=names, fixed=fixed,
            starts=cal.SobolStarts(starts) if starts > 0 else None,
            integrator=integrator, max_steps=max_steps, seed=seed,
        )

    settings = {
        "starts": starts, "seed": seed, "max_steps": max_steps,
        "solver": "LevenbergMarquardt(rtol=1e-8, atol=1e-8)",
        "integrator": {"solver": "Kvaerno5 (chord Newton)", "rtol": rtol, "atol": atol,
                       "max_steps": integrator.max_steps},
        "sensitivity": "ForwardMode",
    }
    fixed_values = {n: float(v) for n, v in all_values.items() if n not in names}
    report = fit_report(result, m, model_spec=resolved.spec, data=str(data),
                        fixed=fixed_values, settings=settings)
    csv_path = write_csv_atomic(out / "parameters.csv", result.to_frame())
    json_path = write_json_atomic(out / "parameters.json", report)

    stdout = _stdout()
    stdout.print(_fit_summary_table(result, m, stdout.width))
    failed = result.messages()
    console = _stderr()
    for ind, text in failed.items():
        console.print(f"[yellow]warning:[/] {escape(ind)}: ", end="")
        console.print(text, markup=False)
    console.print(
        f"{len(result.individuals) - len(failed)} of {len(result.individuals)} fits "
        f"successful; wrote {csv_path} and {json_path}",
        markup=False,
    )


def main() -> None:
    """Entry point of the `calibrate` console script."""
    app(prog_name="calibrate")


if __name__ == "__main__":
    main()
