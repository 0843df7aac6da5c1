"""Per-individual conditions: the inputs $u_i(t)$ (doses, stimuli, covariates) of each
individual, read from a table.

Two layouts are accepted:

- **wide**, one row per individual: a column `individual` and one column per model
  input holding a constant level, e.g. `individual,dose` / `patient1,2.5`;
- **long**, for schedules: columns `individual`, `input`, `time`, `value`, one row per
  change of level. Input `input` of that individual is `value` from `time` on (and the
  first value before the first time): a `PiecewiseConstant` whose jumps the ODE solver
  steps onto.

Inputs the table does not name keep the model's default for every individual. Every
individual with measurements needs a row, and every individual in the table needs
measurements.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._data import DataError, Dataset, Issue, _as_text, _parse_numbers, read_table
from ._inputs import AbstractInput, Constant, PiecewiseConstant
from ._model import AbstractODEModel


LONG_COLUMNS = ("individual", "input", "time", "value")


def _rows(frame: pd.DataFrame) -> np.ndarray:
    if frame.index.name == "row" and pd.api.types.is_integer_dtype(frame.index):
        return frame.index.to_numpy(int)
    return np.arange(len(frame)) + 2


def _input_hint(name: str, model: AbstractODEModel) -> str:
    if not model.inputs:
        return f"model {model.name} has no inputs"
    close = difflib.get_close_matches(name, model.inputs, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"model {model.name} has inputs {', '.join(model.inputs)}{hint}"


def _numbers(text: pd.Series, rows, column, source, issues) -> np.ndarray:
    values = _parse_numbers(text)
    for r, raw, v in zip(rows, text, values):
        if raw == "" or raw.lower() == "nan":
            issues.append(Issue(source, "empty or NaN; a number is needed", int(r), column))
        elif math.isnan(v):
            issues.append(Issue(source, f"'{raw}' is not a number", int(r), column))
        elif math.isinf(v):
            issues.append(Issue(source, f"'{raw}' is not finite", int(r), column))
    return values


def _check_individuals(found: Sequence[str], rows, individuals: Sequence[str] | None,
                       source, issues) -> None:
    for r, ind in zip(rows, found):
        if ind == "":
            issues.append(Issue(source, "empty; a name is needed", int(r), "individual"))
    if individuals is None:  # measurements unknown (invalid): nothing to match
        return
    known = set(individuals)
    for r, ind in zip(rows, found):
        if ind != "" and ind not in known:
            close = difflib.get_close_matches(ind, individuals, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            issues.append(Issue(source, f"individual '{ind}' has no measurements{hint}",
                                int(r), "individual"))
    present = set(found)
    for ind in individuals:
        if ind not in present:
            issues.append(Issue(source, f"individual '{ind}' has measurements but no "
                                "conditions", column="individual"))


def _wide(frame, rows, model, individuals, source, issues) -> dict[str, list]:
    text = {c: _as_text(frame[c]) for c in frame.columns}
    names = [c for c in frame.columns if c != "individual"]
    for c in names:
        if c not in model.inputs:
            issues.append(Issue(source, f"unknown input: {_input_hint(c, model)}", column=c))
    if not names:
        issues.append(Issue(source, "no input columns: name model inputs as columns "
                            "(wide layout) or give columns individual, input, time, value"))
    ids = list(text["individual"])
    _check_individuals(ids, rows, individuals, source, issues)
    seen: dict[str, int] = {}
    for r, ind in zip(rows, ids):
        if ind in seen and ind != "":
            issues.append(Issue(source, f"individual '{ind}' already has a row "
                                f"(row {seen[ind]})", int(r), "individual"))
        seen.setdefault(ind, int(r))
    levels = {c: _numbers(text[c], rows, c, source, issues) for c in names
              if c in model.inputs}
    per_input: dict[str, list] = {}
    index = {ind: j for j, ind in reversed(list(enumerate(ids)))}
    for name, values in levels.items():
        if individuals is None:
            continue
        per_input[name] = [
            Constant(float(values[index[ind]])) if ind in index else None
            for ind in individuals
        ]
    return per_input


def _long(frame, rows, model, individuals, t0, source, issues) -> dict[str, list]:
    text = {c: _as_text(frame[c]) for c in LONG_COLUMNS}
    inputs = list(text["input"])
    for r, name in zip(rows, inputs):
        if name == "":
            issues.append(Issue(source, "empty; an input name is needed", int(r), "input"))
        elif name not in model.inputs:
            issues.append(Issue(source, f"unknown input '{name}': "
                                f"{_input_hint(name, model)}", int(r), "input"))
    times = _numbers(text["time"], rows, "time", source, issues)
    values = _numbers(text["value"], rows, "value", source, issues)
    for r, t in zip(rows, times):
        if np.isfinite(t) and t < t0:
            issues.append(Issue(source, f"time {t:g} is before the model's t0={t0:g}",
                                int(r), "time"))
    ids = list(text["individual"])
    _check_individuals(ids, rows, individuals, source, issues)
    first: dict[tuple, int] = {}
    for r, key in zip(rows, zip(ids, inputs, times)):
        if key in first:
            issues.append(Issue(source, f"input '{key[1]}' of individual '{key[0]}' "
                                f"already changes at time {key[2]:g} (row {first[key]})",
                                int(r)))
        first.setdefault(key, int(r))
    table = pd.DataFrame({"individual": ids, "input": inputs, "time": times,
                          "value": values})
    per_input: dict[str, list] = {}
    for name in model.inputs if individuals is not None else ():
        rows_of = table[table["input"] == name]
        if rows_of.empty:
            continue
        schedules = []
        for ind in individuals:
            mine = rows_of[rows_of["individual"] == ind].sort_values("time", kind="stable")
            schedules.append(None if mine.empty else
                             (mine["time"].to_numpy(float), mine["value"].to_numpy(float)))
        missing = [ind for ind, s in zip(individuals, schedules) if s is None]
        for ind in missing:
            issues.append(Issue(source, f"individual '{ind}' has no schedule for input "
                                f"'{name}' (other individuals have one)", column="input"))
        if missing:
            continue
        # One shape for all (vmap): pad by repeating the last change.
        length = max(len(t) for t, _ in schedules)
        per_input[name] = [
            PiecewiseConstant(np.pad(t, (0, length - len(t)), mode="edge"),
                              np.pad(v, (0, length - len(v)), mode="edge"))
            for t, v in schedules
        ]
    return per_input


def conditions_from_frame(
    frame: pd.DataFrame,
    model: AbstractODEModel,
    individuals: Sequence[str] | None,
    *,
    source: str = "<conditions>",
) -> dict[str, AbstractInput] | None:
    """Validate a conditions table and build every model input, stacked over
    `individuals` (in that order) for `vmap`. With `individuals=None` the table is
    only validated (returns `None`).

    **Raises:** `DataError` naming file, row and column of every problem.
    """
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = list(frame.columns)
    issues: list[Issue] = []
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    for c in repeated:
        issues.append(Issue(source, f"column appears {columns.count(c)} times", column=c))
    if "individual" not in columns:
        close = difflib.get_close_matches("individual", columns, n=1, cutoff=0.6)
        hint = f"; is '{close[0]}' a misspelling of it?" if close else ""
        issues.append(Issue(source, f"missing required column 'individual' (found: "
                            f"{', '.join(columns)}){hint}", column="individual"))
    if issues:
        raise DataError(issues)
    if len(frame) == 0:
        raise DataError([Issue(source, "table has a header but no rows")])
    rows = _rows(frame)
    long = "input" in columns or ("time" in columns and "value" in columns)
    if long:
        missing = [c for c in LONG_COLUMNS if c not in columns]
        extra = [c for c in columns if c not in LONG_COLUMNS]
        for c in missing:
            issues.append(Issue(source, f"missing column '{c}' of the long layout "
                                "(individual, input, time, value)", column=c))
        for c in extra:
            issues.append(Issue(source, "unknown column in the long layout (individual, "
                                "input, time, value)", column=c))
        if issues:
            raise DataError(issues)
        individuals = None if individuals is None else list(individuals)
        per_input = _long(frame, rows, model, individuals, model.t0, source, issues)
    else:
        individuals = None if individuals is None else list(individuals)
        per_input = _wide(frame, rows, model, individuals, source, issues)
    if issues:
        issues.sort(key=lambda i: (i.row or 0, i.column or ""))
        raise DataError(issues)
    if individuals is None:
        return None
    n = len(individuals)
    defaults = model.default_inputs() if set(model.inputs) - set(per_input) else {}
    stacked = {}
    for name in model.inputs:
        if name in per_input:
            stacked[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_input[name])
        else:
            stacked[name] = jax.tree.map(
                lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), defaults[name])
    return stacked


def with_conditions(dataset: Dataset, model: AbstractODEModel, path_or_frame,
                    *, source: str | None = None) -> Dataset:
    """`dataset` with each individual's inputs read from a conditions table (a path to
    CSV, TSV or Parquet, or a frame)."""
    if isinstance(path_or_frame, pd.DataFrame):
        frame, source = path_or_frame, source or "<conditions>"
    else:
        frame, source = read_table(path_or_frame), source or str(path_or_frame)
    inputs = conditions_from_frame(frame, model, dataset.individuals, source=source)
    return Dataset(individuals=dataset.individuals, observables=dataset.observables,
                   measurements=dataset.measurements, inputs=inputs, source=dataset.source)
