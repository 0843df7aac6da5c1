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

import functools
import hashlib
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import calibrate as cal

from . import _report as report
from ._batching import cpu_cores, default_chunk_size, map_individuals
from ._io import write_csv_atomic, write_json_atomic
from ._modelspec import did_you_mean as _did_you_mean, resolve_model
from ._petab import measurement_table, problem_files


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


def _listed(names, limit: int = 12) -> str:
    """`names` joined, or for a long list its first and last few and the count."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:4])}, …, {', '.join(names[-2:])} ({len(names)})"


def _parameter_summary(model: cal.AbstractODEModel) -> str:
    return _listed(p.name if p.estimate else f"{p.name}*" for p in model.parameters)


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
            _listed(model.states),
            _parameter_summary(model),
            _listed(model.observable_names),
        )))
    table.caption = "* not estimated by default"
    _stdout().print(table)


@app.command(
    epilog="Examples:\n\n"
    "  [bold]calibrate simulate reference --param p=2 --times 0:10:101 --out x.csv[/]\n\n"
    "  [bold]calibrate simulate enzyme_kinetics --param kf=3,kcat=0.2[/]\n\n"
    "  [bold]calibrate simulate my_model.py:Toggle --times 0,1,2,5,10[/]\n\n"
    "  [bold]calibrate simulate examples/dosing/problem.toml --param p=2 --out doses.csv[/]",
)
@handle_errors
def simulate(
    model: Annotated[str, typer.Argument(
        metavar="MODEL|PROBLEM",
        help="Zoo model name, path/to/file.py:ClassName, or a problem file "
        "(PROBLEM.toml or a PEtab PROBLEM.yaml).", show_default=False)],
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
    """Simulate MODEL, or every individual of PROBLEM.toml, as long-format CSV.

    With a PEtab PROBLEM.yaml: the PEtab simulation table (the
    measurement table with `simulation` in place of `measurement`) at
    the parameter table's nominal values (changed with --param), as TSV,
    solved with the Rodas5 Rosenbrock method.

    Columns: time, kind ("observable" or "state"), name, value: one
    row per time and variable, observables first. For a problem file,
    an `individual` column comes first: each individual is simulated
    with its own conditions (inputs) at the problem's start values
    (changed with --param), at --times or else at 101 times from t0 to
    its last measurement.
    """
    _check_tolerances(rtol, atol)
    if _is_petab(Path(model.strip())):
        if times is not None:
            raise CLIError("--times does not apply to a PEtab problem: its measurement "
                           "table gives the times")
        frame = simulate_petab(Path(model.strip()), param, rtol, atol)
        if out is None:
            sys.stdout.write(frame.to_csv(index=False, sep="\t", lineterminator="\n"))
        else:
            write_csv_atomic(out, frame, sep="\t")
            _stderr().print(f"wrote {len(frame)} rows to {out}", markup=False)
        return
    if model.strip().lower().endswith(".toml"):
        frame = simulate_problem(Path(model), param, times, states, rtol, atol)
        if out is None:
            sys.stdout.write(frame.to_csv(index=False, lineterminator="\n"))
        else:
            write_csv_atomic(out, frame)
            _stderr().print(f"wrote {len(frame)} rows to {out}", markup=False)
        return
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


@eqx.filter_jit
def _petab_predict_at(problem: cal.PEtabProblem, theta):
    return problem.predict(theta, problem.measurements)


def simulate_petab(path: Path, param, rtol: float, atol: float) -> pd.DataFrame:
    """The PEtab simulation table at the nominal parameters (or --param values)."""
    problem = cal.load_petab(path, integrator=cal.Integrator(rtol=rtol, atol=atol))
    values = parse_assignments(param, "--param")
    unknown = [name for name in values if name not in problem.parameter_ids]
    if unknown:
        raise CLIError(*[f"--param {name}: not a parameter of the parameter table"
                         f"{_did_you_mean(name, problem.parameter_ids)}" for name in unknown])
    theta = np.asarray(problem.nominal).copy()
    for name, value in values.items():
        theta[problem.parameter_ids.index(name)] = value
    y_pred, sigma, result = _petab_predict_at(problem, jnp.asarray(theta))
    if result != cal.RESULTS.successful:
        code = cal.result_code(result)
        raise CLIError(f"the simulation of {path.name} failed ({cal.result_name(code)}): "
                       f"{cal.result_message(code)}", exit_code=EXIT_RUNTIME_ERROR)
    frame, _ = _petab_simulations(measurement_table(path), y_pred, sigma,
                                  problem.measurements.row)
    return frame


def simulate_problem(path: Path, param, times: str | None, states: bool, rtol: float,
                     atol: float) -> pd.DataFrame:
    """Every individual of a problem, with its conditions, at the start values."""
    problem = cal.load_problem(path)
    m = problem.model
    values = parse_assignments(param, "--param")
    check_parameter_names(m, values, "--param")
    params = m.parameter_space.complete({**problem.start, **values})
    data = problem.data
    n = len(data)
    if times is not None:
        t = parse_times(times, m.t0)
        grid = np.broadcast_to(t, (n, len(t)))
    else:
        end = np.maximum(np.asarray(data.measurements.times).max(axis=1), m.t0 + 1e-9)
        grid = m.t0 + (end[:, None] - m.t0) * np.linspace(0, 1, 101)[None, :]
    inputs = data.batched_inputs(m)
    integrator = cal.Integrator(rtol=rtol, atol=atol)
    chunk = default_chunk_size(n, len(m.states) ** 3)
    trajectories = _simulate_batch(m, params, jax.numpy.asarray(grid), inputs, integrator,
                                   chunk)
    frames = []
    for i, individual in enumerate(data.individuals):
        trajectory = jax.tree.map(lambda x: x[i], trajectories)
        if not bool(trajectory.ok):
            code = cal.result_code(trajectory.result)
            raise CLIError(f"the simulation of {individual} failed "
                           f"({cal.result_name(code)}): {cal.result_message(code)}",
                           exit_code=EXIT_RUNTIME_ERROR)
        frame = trajectory_frame(m, trajectory, states=states)
        frame.insert(0, "individual", individual)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _simulate_batch(model, params, times, inputs, integrator, chunk_size):
    return map_individuals(
        lambda t, u: cal.simulate(model, params, t, inputs=u, integrator=integrator),
        (times, inputs), (0, None if inputs is None else 0), chunk_size)


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
        "devices": [str(d) for d in jax.devices()],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@app.command(
    epilog="Examples:\n\n"
    "  [bold]calibrate fit examples/dosing/problem.toml --out results/dosing[/]\n\n"
    "  [bold]calibrate fit examples/dosing/problem.toml --out results/dosing --resume[/]"
    "\n\n"
    "  [bold]calibrate fit enzyme_kinetics examples/enzyme_kinetics/measurements.csv "
    "--out results/enzyme[/]\n\n"
    "  [bold]calibrate fit enzyme_kinetics data.csv --out fits --estimate kf,kcat "
    "--fix kr=1.0 --starts 8[/]\n\n"
    "  [bold]calibrate fit models/my_model.py:Toggle data.tsv --out fits[/]",
)
@handle_errors
def fit(
    model: Annotated[str, typer.Argument(
        metavar="PROBLEM|MODEL",
        help="A problem file (PROBLEM.toml or a PEtab PROBLEM.yaml), or a zoo model "
        "name, path/to/file.py:ClassName or an SBML file followed by DATA.",
        show_default=False)],
    data: Annotated[Path | None, typer.Argument(
        help="With MODEL: measurements in long format (CSV, TSV or Parquet) with "
        "columns individual, time, observable, value and optionally sigma.",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR",
        help="Output directory (created if missing); files of earlier runs that this "
        "run does not write are left alone.", show_default=False)] = ...,
    estimate: Annotated[list[str] | None, typer.Option(
        "--estimate", "-e", metavar="NAME,NAME",
        help="Parameters to estimate (comma-separated or repeated). Default: the "
        "model's estimated parameters minus those given with --fix.")] = None,
    fix: Annotated[list[str] | None, typer.Option(
        "--fix", "-f", metavar="NAME=VALUE",
        help="Fix a parameter at a value (repeatable, or comma-separated).")] = None,
    starts: Annotated[int | None, typer.Option(
        min=0, help="Extra Sobol start points per individual (default 0: start from "
        "the defaults only).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the start points (default 0).", show_default=False)] = None,
    max_steps: Annotated[int | None, typer.Option(
        min=1, help="Optimiser step limit per start (default 256).",
        show_default=False)] = None,
    rtol: Annotated[float | None, typer.Option(
        help=f"Relative tolerance of the ODE solver (default {_DEFAULTS.rtol:g}).",
        show_default=False)] = None,
    atol: Annotated[float | None, typer.Option(
        help=f"Absolute tolerance of the ODE solver (default {_DEFAULTS.atol:g}).",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With a hierarchical PROBLEM.toml or a PEtab population: "
        "continue an interrupted "
        "fit from DIR/checkpoint.bin (written every [population] checkpoint_every "
        "outer steps); the result is the one the uninterrupted run gives.")] = False,
):
    """Fit a problem file, or MODEL to each individual in DATA.

    With a PEtab PROBLEM.yaml: a multistart maximum-likelihood fit
    (--starts random starts inside the bounds, default 16, batched) that
    writes DIR/starts.csv (every start's objective, parameters and
    status, best first), DIR/estimates.json (the best parameters on
    linear and PEtab scales, settings, versions) and DIR/simulations.tsv
    (the measurement table with a `simulation` column at the best fit).
    A PEtab problem with the population extension (an individualId
    column and populationDistribution in the parameter table) runs the
    population calibrator instead (--max-steps outer steps, default
    100; --resume continues it) and writes the population outputs
    below, with simulations.tsv in place of predictions.csv.

    With PROBLEM.toml (see `calibrate check`): a hierarchical problem
    runs the population calibrator and writes DIR/population.csv and
    .json (population estimates with standard errors, -2 log L, AIC,
    BIC), individuals.csv, predictions.csv, diagnostics.csv,
    history.csv and run.json; a problem without random or fixed
    effects fits each individual on its own, as below, plus
    predictions.csv and run.json.

    With MODEL DATA (maximum likelihood per individual): writes
    DIR/parameters.csv (one row per individual: estimates, standard
    errors, loss, grad_norm, steps, status) and
    DIR/parameters.json (the same plus the messages of failed fits,
    the settings and versions), and prints a summary table.

    Standard errors are on each parameter's scale (relative errors for
    log-scale parameters). The exit status is 0 once the results are
    written, even if some fits did not converge (see their status).
    """
    if _is_petab(Path(model.strip())):
        if data is not None:
            raise CLIError(f"{model} is a PEtab problem: it names its data itself; "
                           f"drop {data}")
        if estimate is not None or fix is not None:
            raise CLIError("--estimate and --fix do not apply to PEtab problems; "
                           "set `estimate` in the parameter table")
        return fit_petab_problem(
            Path(model.strip()), out, starts=starts, seed=seed, max_steps=max_steps,
            rtol=_DEFAULTS.rtol if rtol is None else rtol,
            atol=_DEFAULTS.atol if atol is None else atol, resume=resume,
        )
    if model.strip().lower().endswith(".toml"):
        given = [f"--{name.replace('_', '-')}" for name, value in (
            ("estimate", estimate), ("fix", fix), ("starts", starts), ("seed", seed),
            ("max_steps", max_steps), ("rtol", rtol), ("atol", atol)) if value is not None]
        if data is not None:
            raise CLIError(f"{model} is a problem file: it names its data itself; "
                           f"drop {data}")
        if given:
            raise CLIError(f"{', '.join(given)}: with a problem file, give these "
                           "settings in the file")
        return fit_problem(Path(model), out, resume=resume)
    if resume:
        raise CLIError("--resume needs a hierarchical PROBLEM.toml")
    if data is None:
        raise CLIError(f"{model}: give the measurements file after the model "
                       "(calibrate fit MODEL DATA --out DIR), or a PROBLEM.toml")
    starts = 0 if starts is None else starts
    seed = 0 if seed is None else seed
    max_steps = 256 if max_steps is None else max_steps
    rtol = _DEFAULTS.rtol if rtol is None else rtol
    atol = _DEFAULTS.atol if atol is None else atol
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
        "integrator": integrator.settings(),
        "sensitivity": result.sensitivity,
    }
    fixed_values = {n: float(v) for n, v in all_values.items() if n not in names}
    report = fit_report(result, m, model_spec=resolved.spec, data=str(data),
                        fixed=fixed_values, settings=settings)
    csv_path = write_csv_atomic(out / "parameters.csv", result.to_frame())
    json_path = write_json_atomic(out / "parameters.json", report)

    _print_individual_fits(result, m, f"{csv_path} and {json_path}")


def _print_individual_fits(result: cal.FitResult, model: cal.AbstractODEModel,
                           written: str) -> None:
    """The summary table on stdout; failed fits and what was written on stderr."""
    stdout = _stdout()
    stdout.print(_fit_summary_table(result, model, stdout.width))
    failed = result.messages()
    console = _stderr()
    for ind, text in failed.items():
        console.print(f"[yellow]warning:[/] {escape(ind)}: ", end="")
        console.print(text, markup=False)
    console.print(
        f"{len(result.individuals) - len(failed)} of {len(result.individuals)} fits "
        f"successful; wrote {written}", markup=False)


# --------------------------------------------------------------------------------------
# Problem files


def _roles_table(problem: cal.Problem) -> Table:
    table = Table(title=escape(f"{problem.model.name}: parameters"))
    for column in ("parameter", "role", "start", "bounds", "scale"):
        table.add_column(column, no_wrap=True)
    space = problem.model.parameter_space
    for name, role in problem.roles.items():
        p = space[name]
        table.add_row(name, role, f"{problem.start[name]:.6g}",
                      f"[{p.lower:.3g}, {p.upper:.3g}]", p.scale)
    return table


@app.command(
    epilog="Example:\n\n  [bold]calibrate check examples/dosing/problem.toml[/]",
)
@handle_errors
def check(
    problem: Annotated[Path, typer.Argument(
        metavar="PROBLEM", help="The problem file: TOML, or a PEtab v1 YAML.",
        show_default=False)],
):
    """Validate PROBLEM and every file it names, and report all problems at once.

    Each problem is one line naming the file and the setting, or the
    row and column of a table. Exit status 0 when the problem is valid
    (a summary is printed), 2 otherwise.
    """
    if _is_petab(problem):
        return check_petab(problem)
    loaded = cal.load_problem(problem)
    stdout = _stdout()
    data = loaded.data
    n_measurements = int(np.sum(np.asarray(data.measurements.mask)))
    kind = ("hierarchical (population calibration)" if loaded.hierarchical
            else "individual fits")
    stdout.print(f"{escape(str(problem))}: valid; {kind} of {loaded.model.name} to "
                 f"{len(data)} individual(s), {n_measurements} measurements",
                 markup=False)
    stdout.print(_roles_table(loaded))


def _versions() -> dict[str, str]:
    import diffrax
    import equinox
    import jaxlib
    import lineax
    import optax
    import optimistix

    return {"calibrate": cal.__version__, "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "diffrax": diffrax.__version__, "equinox": equinox.__version__,
            "optimistix": optimistix.__version__, "lineax": lineax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_record(problem: cal.Problem, started: datetime, **extra) -> dict[str, Any]:
    """What `run.json` holds: enough to reproduce the run."""
    finished = datetime.now(UTC)
    return {
        "command": ["calibrate", *sys.argv[1:]],
        "problem": str(problem.path),
        "files": {role: {"path": path, "sha256": _sha256(path)}
                  for role, path in problem.files.items()},
        "model": problem.model.name,
        "model_spec": problem.model_spec,
        "seed": problem.seed,
        "roles": problem.roles,
        "start": problem.start,
        "settings": problem.settings,
        "versions": _versions(),
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "wall_seconds": round((finished - started).total_seconds(), 3),
        **extra,
    }


def _population_table(result: cal.PopulationResult, model_name: str) -> Table:
    table = Table(title=escape(f"{model_name}: population estimates"))
    for column in ("parameter", "kind", "estimate", "se"):
        table.add_column(column, justify="right" if column in ("estimate", "se") else "left",
                         no_wrap=True)
    for row in result.population.itertuples(index=False):
        if row.kind == "mean_scaled":
            continue
        table.add_row(escape(row.parameter), row.kind, f"{row.estimate:.6g}",
                      f"{row.se:.2g}" if math.isfinite(row.se) else "—")
    return table


def _population_report(result: cal.PopulationResult, model_name: str,
                       objective_kind: str) -> dict:
    h = result.hypergradients
    return {
        "model": model_name,
        "population": result.population.to_dict(orient="records"),
        "objective": result.objective,
        "objective_kind": objective_kind,
        "minus_two_log_likelihood": result.minus_two_log_likelihood,
        "aic": result.aic,
        "bic": result.bic,
        "converged": result.converged,
        "outer_steps": result.outer_steps,
        "score_decrement": result.score_decrement,
        "omega": result.omega,
        "shrinkage": result.shrinkage,
        "theta": result.theta,
        "covariance_theta": result.covariance_theta,
        "n_individuals": len(result.individual),
        "n_successful": int(np.sum(result.individual["status"] == "successful")),
        "n_stationary": int(np.sum(np.asarray(h.stationary))),
    }


def _diagnostics_frame(result: cal.PopulationResult, individuals) -> pd.DataFrame:
    h = result.hypergradients
    return pd.DataFrame({
        "individual": list(individuals),
        "status": [cal.result_name(c) for c in np.asarray(h.result)],
        "stationarity": np.asarray(h.stationarity),
        "stationarity_bound": np.asarray(h.stationarity_bound),
        "stationary": np.asarray(h.stationary),
        "outer_loss": np.asarray(h.outer_loss),
    })


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=_stderr(),
                    transient=False)


def _figures_and_report(problem: cal.Problem, out: Path, predictions: pd.DataFrame,
                        estimates: dict, names: Sequence[str], summary: Sequence[str],
                        problems: Sequence[str], *, tables, history=None,
                        population=None) -> list[Path]:
    """PNG plots and report.html in `out`; returns the paths written."""
    curves = report.dense_predictions(problem.model, problem.data, estimates,
                                      integrator=problem.integrator)
    individual = pd.DataFrame({name: np.broadcast_to(np.asarray(estimates[name], float),
                                                     (len(problem.data),))
                               for name in names})
    space = problem.model.parameter_space
    figures = [
        ("Individual fits", report.plot_individual_fits(predictions, curves,
                                                        out / "fits.png")),
        ("Observed against predicted",
         report.plot_observed_vs_predicted(predictions, out / "observed_vs_predicted.png")),
        ("Residuals", report.plot_residuals(predictions, out / "residuals.png")),
    ]
    if history is not None and len(history):
        figures.append(("Outer convergence",
                        report.plot_convergence(history, out / "convergence.png")))
    if names:
        figures.append(("Parameter distributions", report.plot_parameter_distributions(
            individual, names, {n: space[n].scale for n in names},
            out / "parameters.png", population)))
    page = report.write_html_report(
        out / "report.html", title=f"calibrate: {problem.model.name} ({problem.path.name})",
        summary=summary, tables=tables, figures=figures, warnings=problems,
        run={"problem": problem.path, "seed": problem.seed,
             "calibrate": cal.__version__, "jax": jax.__version__})
    return [path for _, path in figures] + [page]


CHECKPOINT = "checkpoint.bin"


def _run_population(model, data, arguments, n: int, max_steps: int,
                    checkpoint: cal.Checkpoint, resume: bool,
                    done: int) -> cal.PopulationResult:
    """`calibrate_population` with a progress bar; Ctrl-C exits with status 130 and
    says where the checkpoint is."""
    with _progress() as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.HypergradientWarning)
        task = progress.add_task(
            f"compiling, then resuming after outer step {done}" if resume else
            f"compiling, then fitting {n} individuals from the start values",
            total=max_steps, completed=done)

        def callback(step, theta, value, hypergradients):
            stationary = int(np.sum(np.asarray(hypergradients.stationary)))
            failed = int(np.sum(~np.isfinite(np.asarray(hypergradients.outer_loss))))
            progress.update(task, completed=step, description=(
                f"outer step {step}: objective {value:.6g}, {stationary}/{n} inner fits "
                f"stationary" + (f", {failed} failed solves" if failed else "")))

        try:
            result = cal.calibrate_population(
                model, data, callback=callback, checkpoint=checkpoint, resume=resume,
                **arguments)
        except KeyboardInterrupt:
            progress.stop()
            saved = (f"the checkpoint after outer step {checkpoint.meta()['step']} is in "
                     f"{checkpoint.path}; continue with --resume"
                     if checkpoint.path.exists() else "no checkpoint was written yet")
            _stderr().print(f"interrupted: {saved}", markup=False)
            raise typer.Exit(130) from None
        progress.update(task, total=result.outer_steps, completed=result.outer_steps,
                        description=f"done after {result.outer_steps} outer steps "
                        f"({'converged' if result.converged else 'not converged'})")
    return result


# Two orders of magnitude above the outer optimisers' default decrement_tol.
SCORE_DECREMENT_WARNING = 1e-2


def _population_warnings(result: cal.PopulationResult,
                         diagnostics: pd.DataFrame) -> list[str]:
    problems = []
    if not result.converged:
        problems.append("the outer optimisation did not converge in "
                        f"{result.outer_steps} steps; see history.csv")
    elif result.score_decrement > SCORE_DECREMENT_WARNING:
        problems.append(
            "the individuals' scores predict that the objective can still fall by "
            f"{result.score_decrement:.2g}: the outer optimiser may have stopped short of "
            "the optimum, or a poorly determined parameter is still drifting (compare "
            "optimiser = \"bhhh\")")
    for row in diagnostics[~diagnostics["stationary"]].itertuples(index=False):
        problems.append(f"{row.individual}: inner fit not stationary "
                        f"({row.stationarity:.2g} > {row.stationarity_bound:.2g}, "
                        f"{row.status}); its hypergradient is unreliable")
    return problems


def _objective_summary(result: cal.PopulationResult) -> str:
    return (f"-2 log L {result.minus_two_log_likelihood:.6g}, AIC {result.aic:.6g}, "
            f"BIC {result.bic:.6g}" if result.aic is not None
            else f"validation loss {result.objective:.6g}")


def _individuals_with_eta(result: cal.PopulationResult, random) -> pd.DataFrame:
    individuals = result.individual.copy()
    for j, name in enumerate(random):
        individuals[f"eta_{name}"] = result.eta[:, j]
    return individuals


def _print_population_result(result, model_name, problems, objective, written, out):
    _stdout().print(_population_table(result, model_name))
    console = _stderr()
    for text in problems:
        console.print("[yellow]warning:[/] ", end="")
        console.print(text, markup=False)
    console.print(f"{objective}; wrote {', '.join(p.name for p in written)} to {out}",
                  markup=False)


def fit_problem(path: Path, out: Path, resume: bool = False) -> None:
    """`calibrate fit PROBLEM.toml --out DIR [--resume]`."""
    problem = cal.load_problem(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    started = datetime.now(UTC)
    if not problem.hierarchical:
        if resume:
            raise CLIError("--resume: only hierarchical problems have an outer loop to "
                           "resume; this one fits each individual on its own")
        out.mkdir(parents=True, exist_ok=True)
        _fit_problem_individually(problem, out, started)
        return
    checkpoint = cal.Checkpoint(out / CHECKPOINT,
                                every=problem.settings["population"]["checkpoint_every"],
                                fingerprint=problem.fingerprint())
    done = 0
    if resume:
        done = checkpoint.meta()["step"]  # CheckpointError (exit 2) if none or foreign
    out.mkdir(parents=True, exist_ok=True)
    arguments = problem.population_arguments()
    max_steps = problem.settings["population"]["max_steps"]
    n = len(problem.data)
    result = _run_population(problem.model, problem.data, arguments, n, max_steps,
                             checkpoint, resume, done)
    estimates = dict(problem.start)
    for name in result.individual.columns:
        if name in estimates:
            estimates[name] = result.individual[name].to_numpy()
    predictions = cal.predictions_frame(problem.model, problem.data, estimates,
                                        integrator=problem.integrator)
    individuals = _individuals_with_eta(result, arguments["hierarchy"].random)
    diagnostics = _diagnostics_frame(result, problem.data.individuals)
    written = [
        write_csv_atomic(out / "population.csv", result.population),
        write_json_atomic(out / "population.json", _population_report(
            result, problem.model.name, problem.settings["population"]["objective"])),
        write_csv_atomic(out / "individuals.csv", individuals),
        write_csv_atomic(out / "predictions.csv", predictions),
        write_csv_atomic(out / "diagnostics.csv", diagnostics),
        write_csv_atomic(out / "history.csv", result.history),
    ]
    problems = _population_warnings(result, diagnostics)
    objective = _objective_summary(result)
    names = [*arguments["hierarchy"].random, *arguments["hierarchy"].individual]
    summary = [
        f"Model {problem.model.name}, {n} individuals, "
        f"{int(np.sum(np.asarray(problem.data.measurements.mask)))} measurements",
        f"Outer objective {problem.settings['population']['objective']}: {objective}",
        f"{'Converged' if result.converged else 'Not converged'} after "
        f"{result.outer_steps} outer steps; "
        f"{int(diagnostics['stationary'].sum())} of {n} inner fits stationary",
    ]
    population = result.population[result.population.kind != "mean_scaled"]
    written += _figures_and_report(
        problem, out, predictions, estimates, names, summary, problems,
        tables=[("Population estimates", population), ("Individuals", individuals),
                ("Diagnostics", diagnostics)],
        history=result.history, population=result.population)
    written.append(write_json_atomic(out / "run.json", run_record(
        problem, started, outputs=[p.name for p in written], resumed=resume)))
    # Every result is written: a later --resume would only repeat the last step.
    checkpoint.path.unlink(missing_ok=True)
    _print_population_result(result, problem.model.name, problems, objective, written, out)


def _fit_problem_individually(problem: cal.Problem, out: Path, started) -> None:
    arguments = problem.fit_arguments()
    message = (f"fitting {len(problem.data)} individual(s) "
               "(compiling first, which takes a while)")
    with _stderr().status(message), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        result = cal.fit(problem.model, problem.data, **arguments)
    estimates = dict(problem.start)
    estimates.update({name: np.asarray(result[name]) for name in result.estimated})
    predictions = cal.predictions_frame(problem.model, problem.data, estimates,
                                        integrator=problem.integrator)
    settings = {"starts": problem.settings["individual"]["starts"], "seed": problem.seed,
                "max_steps": problem.settings["individual"]["max_steps"],
                "ode": problem.settings["ode"],
                "sensitivity": {"method": problem.settings["sensitivity"]["method"],
                                "used": result.sensitivity}}
    report = fit_report(result, problem.model, model_spec=problem.model_spec,
                        data=problem.files["measurements"], fixed=problem.constants,
                        settings=settings)
    written = [
        write_csv_atomic(out / "parameters.csv", result.to_frame()),
        write_json_atomic(out / "parameters.json", report),
        write_csv_atomic(out / "predictions.csv", predictions),
    ]
    failed = result.messages()
    summary = [f"Model {problem.model.name}, {len(problem.data)} individuals fitted "
               "one by one (maximum likelihood)",
               f"{len(result.individuals) - len(failed)} of {len(result.individuals)} fits "
               "successful"]
    written += _figures_and_report(
        problem, out, predictions, estimates, list(result.estimated), summary,
        [f"{ind}: {text}" for ind, text in failed.items()],
        tables=[("Individual estimates", result.to_frame())])
    written.append(write_json_atomic(out / "run.json", run_record(
        problem, started, outputs=[p.name for p in written])))
    _print_individual_fits(result, problem.model,
                           f"{', '.join(p.name for p in written)} to {out}")


def _is_petab(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def check_petab(path: Path) -> None:
    problem = cal.load_petab(path)
    stdout = _stdout()
    simulated = np.asarray(problem.measurements.conditions)
    pre = int(np.sum(np.asarray(problem.preequilibration_slot)[simulated] >= 0))
    population = (f"; population extension: {len(problem.individual_ids)} individuals"
                  if problem.is_population else "")
    stdout.print(
        f"{path}: valid PEtab problem; model {problem.model.name} with "
        f"{len(problem.model.states)} states, {len(simulated)} simulation "
        f"condition(s) ({pre} pre-equilibrated), {len(problem.observable_ids)} "
        f"observable(s), {problem.n_measurements} measurements, "
        f"{len(problem.estimated_ids)} of {len(problem.parameter_ids)} parameters "
        f"estimated{population}", markup=False)
    table = Table(title="estimated parameters")
    columns = ["parameter", "scale", "lower", "upper", "nominal"]
    roles = {r.parameter: r for r in problem.population_roles}
    if roles:
        columns += ["population", "start sd"]
    for column in columns:
        table.add_column(column)
    space = problem.parameter_space
    for name in problem.estimated_ids:
        p = space[name]
        cells = [escape(name), p.scale, f"{p.lower:g}", f"{p.upper:g}", f"{p.default:.6g}"]
        if roles:
            role = roles[name]
            cells += [role.distribution or role.role,
                      "" if role.sd is None else f"{role.sd:g}"]
        table.add_row(*cells)
    stdout.print(table)


def fit_petab_problem(path: Path, out: Path, *, starts: int | None, seed: int | None,
                      max_steps: int | None, rtol: float, atol: float,
                      resume: bool = False) -> None:
    """`calibrate fit PROBLEM.yaml`: multistart fit (or, with the population extension,
    the population calibrator), tables and a record."""
    _check_tolerances(rtol, atol)
    started = datetime.now(UTC)
    integrator = cal.Integrator(rtol=rtol, atol=atol)
    problem = cal.load_petab(path, integrator=integrator)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    if problem.is_population:
        if starts is not None or seed is not None:
            raise CLIError("--starts and --seed do not apply to a PEtab population: its "
                           "fit starts from the parameter table's nominal values")
        return _fit_petab_population(path, problem, out, resume=resume, started=started,
                                     max_steps=100 if max_steps is None else max_steps)
    if resume:
        raise CLIError("--resume: only a population (hierarchical) fit has an outer loop "
                       "to resume")
    starts = 16 if starts is None else starts
    seed = 0 if seed is None else seed
    max_steps = 500 if max_steps is None else max_steps
    if starts < 1:
        raise CLIError("--starts: a PEtab fit needs at least one start")
    out.mkdir(parents=True, exist_ok=True)
    message = (f"fitting {path.name} from {starts} starts (compiling first, which takes a "
               "while)")
    with _stderr().status(message), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        result = cal.fit_petab(problem, starts=cal.SobolStarts(starts), seed=seed,
                               max_steps=max_steps)
    best = np.asarray(result.best_x)
    theta = np.asarray(problem.theta(result.best_x))
    linear = {pid: float(theta[problem.parameter_ids.index(pid)])
              for pid in problem.estimated_ids}
    y_pred, sigma, _ = _petab_predict_at(problem, problem.theta(result.best_x))
    simulations, _ = _petab_simulations(measurement_table(path), y_pred, sigma,
                                        problem.measurements.row)
    converged = int(np.sum(np.asarray(result.result) == cal.RESULTS.successful._value))
    within = result.n_within(1e-3)
    settings = {"starts": starts, "seed": seed, "max_steps": max_steps,
                "optimiser": "BFGS(rtol=1e-10, atol=1e-10) on bound-reflected scaled "
                             "parameters",
                "integrator": integrator.settings(),
                "sensitivity": result.sensitivity}
    record = {
        "problem": str(path),
        "files": _petab_files(path),
        "objective": result.best_objective,
        "estimates": linear,
        "estimates_scaled": dict(zip(problem.estimated_ids, map(float, best), strict=True)),
        "starts_converged": converged,
        "starts_within_1e-3_of_best": within,
        "wall_seconds": round(result.wall_seconds, 3),
        "compile_seconds": round(result.compile_seconds, 3),
        "settings": settings,
        "command": ["calibrate", *sys.argv[1:]],
        "versions": _versions(),
        "devices": [str(d) for d in jax.devices()],
        "started": started.isoformat(timespec="seconds"),
    }
    written = [
        write_csv_atomic(out / "starts.csv", result.to_frame()),
        write_json_atomic(out / "estimates.json", record),
        write_csv_atomic(out / "simulations.tsv", simulations, sep="\t"),
    ]
    stdout = _stdout()
    table = Table(title=escape(f"{path.name}: best of {starts} starts, objective "
                               f"{result.best_objective:.6f}"))
    for column in ("parameter", "scale", "estimate (scaled)", "estimate"):
        table.add_column(column)
    for j, name in enumerate(problem.estimated_ids):
        table.add_row(escape(name), problem.parameter_space[name].scale,
                      f"{best[j]:.6g}", f"{linear[name]:.6g}")
    stdout.print(table)
    _stderr().print(
        f"{converged} of {starts} starts converged, {within} within 1e-3 of the best; "
        f"{result.wall_seconds:.1f} s ({result.compile_seconds:.1f} s compiling); wrote "
        f"{', '.join(p.name for p in written)} to {out}", markup=False)


def _petab_files(path: Path) -> dict[str, list[dict[str, str]]]:
    return {role: [{"path": str(f), "sha256": _sha256(f)} for f in files]
            for role, files in problem_files(path).items()}


def _petab_simulations(frame: pd.DataFrame, y_pred, sigma,
                       rows) -> tuple[pd.DataFrame, np.ndarray]:
    """PEtab's simulation table (the measurement table `frame` with `simulation` in
    place of `measurement`) and each row's σ; `rows` says which measurement table row
    each prediction belongs to."""
    simulation = np.full(len(frame), np.nan)
    noise = np.full(len(frame), np.nan)
    rows = np.asarray(rows).ravel()
    keep = rows >= 0
    simulation[rows[keep]] = np.asarray(y_pred).ravel()[keep]
    noise[rows[keep]] = np.asarray(sigma).ravel()[keep]
    frame = frame.rename(columns={"measurement": "simulation"})
    frame["simulation"] = simulation
    return frame, noise


@eqx.filter_jit
def _petab_individual_predictions(likelihood, params):
    problem = likelihood.problem
    thetas = jax.vmap(likelihood.theta)(params)
    return jax.vmap(problem.predict)(thetas, problem.individual_measurements)


def _fit_petab_population(path: Path, problem: cal.PEtabProblem, out: Path, *,
                          resume: bool, started, max_steps: int) -> None:
    """`calibrate fit PROBLEM.yaml` for a problem with the population extension."""
    files = _petab_files(path)
    digest = hashlib.sha256(cal.__version__.encode())
    for role in sorted(files):
        for entry in files[role]:
            digest.update(f"{role}\0{entry['sha256']}".encode())
    digest.update(f"max_steps={max_steps};{problem.integrator}".encode())
    checkpoint = cal.Checkpoint(out / CHECKPOINT, every=1, fingerprint=digest.hexdigest())
    done = checkpoint.meta()["step"] if resume else 0
    out.mkdir(parents=True, exist_ok=True)
    n = len(problem.individual_ids)
    roles = cal.petab_population_roles(problem)
    result = _run_population(problem, None, {"outer": cal.QuasiNewton(max_steps=max_steps)},
                             n, max_steps, checkpoint, resume, done)
    params = {name: jnp.asarray(result.individual[name].to_numpy(float))
              for name in problem.estimated_ids}
    y_pred, sigma, _ = _petab_individual_predictions(cal.PEtabLikelihood(problem), params)
    table = measurement_table(path)
    measured = table["measurement"].astype(float).to_numpy()
    simulations, noise = _petab_simulations(table, y_pred, sigma,
                                            problem.individual_measurements.row)
    predictions = pd.DataFrame({
        "individual": simulations["individualId"], "observable": simulations["observableId"],
        "time": simulations["time"].astype(float), "observed": measured,
        "predicted": simulations["simulation"],
        "weighted_residual": (measured - simulations["simulation"]) / noise})
    individuals = _individuals_with_eta(result, roles["random"])
    diagnostics = _diagnostics_frame(result, problem.individual_ids)
    written = [
        write_csv_atomic(out / "population.csv", result.population),
        write_json_atomic(out / "population.json", _population_report(
            result, problem.model.name, "laplace")),
        write_csv_atomic(out / "individuals.csv", individuals),
        write_csv_atomic(out / "simulations.tsv", simulations, sep="\t"),
        write_csv_atomic(out / "diagnostics.csv", diagnostics),
        write_csv_atomic(out / "history.csv", result.history),
    ]
    problems = _population_warnings(result, diagnostics)
    objective = _objective_summary(result)
    space = cal.petab_population_space(problem)
    names = [*roles["random"], *roles["individual"]]
    figures = [
        ("Observed against predicted",
         report.plot_observed_vs_predicted(predictions, out / "observed_vs_predicted.png")),
        ("Residuals (on the linear scale)",
         report.plot_residuals(predictions, out / "residuals.png")),
        ("Outer convergence", report.plot_convergence(result.history,
                                                      out / "convergence.png")),
        ("Parameter distributions", report.plot_parameter_distributions(
            result.individual, names, {name: space[name].scale for name in names},
            out / "parameters.png", result.population)),
    ]
    summary = [
        f"PEtab problem {path.name}: model {problem.model.name}, {n} individuals, "
        f"{problem.n_measurements} measurements",
        f"Outer objective laplace: {objective}",
        f"{'Converged' if result.converged else 'Not converged'} after "
        f"{result.outer_steps} outer steps; "
        f"{int(diagnostics['stationary'].sum())} of {n} inner fits stationary",
    ]
    written += [path for _, path in figures]
    written.append(report.write_html_report(
        out / "report.html", title=f"calibrate: {problem.model.name} ({path.name})",
        summary=summary, figures=figures, warnings=problems,
        tables=[("Population estimates",
                 result.population[result.population.kind != "mean_scaled"]),
                ("Individuals", individuals), ("Diagnostics", diagnostics)],
        run={"problem": path, "calibrate": cal.__version__, "jax": jax.__version__}))
    finished = datetime.now(UTC)
    written.append(write_json_atomic(out / "run.json", {
        "command": ["calibrate", *sys.argv[1:]], "problem": str(path), "files": files,
        "roles": {r.parameter: r.role if r.role != "random" else r.distribution
                  for r in problem.population_roles},
        "settings": {"outer": f"QuasiNewton(max_steps={max_steps})",
                     "objective": "laplace",
                     "integrator": problem.integrator.settings(),
                     "sensitivity": type(problem.sensitivity.for_jacobian()).__name__},
        "outputs": [p.name for p in written], "resumed": resume,
        "versions": _versions(), "devices": [str(d) for d in jax.devices()],
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((finished - started).total_seconds(), 3)}))
    checkpoint.path.unlink(missing_ok=True)
    _print_population_result(result, problem.model.name, problems, objective, written, out)


def _one_cpu_device_per_core() -> None:
    """Split the individuals over the CPU's cores: JAX makes one CPU device for the
    whole machine, whose loops run on one core at a time, so the CLI asks for one
    device per core available to it (`CALIBRATE_CPU_DEVICES` sets the count; an
    `XLA_FLAGS` device count is left alone). `calibrate._batching` then gives each
    device its own share of the individuals. It must run before JAX starts its
    backends."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    setting = os.environ.get("CALIBRATE_CPU_DEVICES", "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            print_errors([f"CALIBRATE_CPU_DEVICES={setting!r}: expected a positive "
                          "integer (CPU devices to split the individuals over)"])
            raise SystemExit(EXIT_INPUT_ERROR)
        count = int(setting)
    else:
        count = cpu_cores()
    jax.config.update("jax_num_cpu_devices", count)


def main() -> None:
    """Entry point of the `calibrate` console script."""
    _one_cpu_device_per_core()
    app(prog_name="calibrate")


if __name__ == "__main__":
    main()
