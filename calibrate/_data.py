"""Measurements in long format, validated, and laid out as padded arrays for `vmap`.

A measurement table has one row per measurement with columns

| column | meaning |
|---|---|
| `individual` | id of the individual / cell / patient / experiment |
| `time` | observation time (>= the model's t0) |
| `observable` | name of a model observable |
| `value` | measured value |
| `sigma` | optional: known standard deviation of this measurement (empty: use the noise model) |

Rows are numbered as a spreadsheet shows them: the header is row 1, so the first
measurement is row 2. Replicates (same individual, time and observable, different
values) are kept; identical rows are rejected as duplicates.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float

from ._inputs import AbstractInput


REQUIRED_COLUMNS = ("individual", "time", "observable", "value")
OPTIONAL_COLUMNS = ("sigma",)
_MAX_LISTED_ISSUES = 25


@dataclass(frozen=True)
class Issue:
    """One problem in an input, located by file, row (spreadsheet numbering) and column,
    or by the key of a setting in a problem file."""

    file: str
    message: str
    row: int | None = None
    column: str | None = None
    key: str | None = None  # a setting of a problem file, e.g. "parameters.q.lower"

    def __str__(self) -> str:
        where = self.file
        if self.key is not None:
            where += f", {self.key}"
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class DataError(ValueError):
    """Invalid input data; `issues` lists every problem found, each with its location."""

    def __init__(self, issues: Sequence[Issue]):
        self.issues = list(issues)
        shown = [str(i) for i in self.issues[:_MAX_LISTED_ISSUES]]
        more = len(self.issues) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more" if more > 0 else "")
        super().__init__(text)


class Measurements(eqx.Module):
    """Padded measurements of one individual (or, with a leading axis, of many).

    `values[t, k]` is observable k at `times[t]`; `mask` marks real measurements;
    `sigma` is NaN where the noise model decides. Padding repeats the last time.
    """

    times: Float[Array, "*batch T"]
    values: Float[Array, "*batch T n_observables"]
    sigma: Float[Array, "*batch T n_observables"]
    mask: Bool[Array, "*batch T n_observables"]


class Dataset(eqx.Module):
    """Measurements of N individuals, batched for `vmap` over the leading axis."""

    individuals: tuple[str, ...] = eqx.field(static=True)
    observables: tuple[str, ...] = eqx.field(static=True)
    measurements: Measurements
    inputs: dict[str, AbstractInput] | None = None
    source: str = eqx.field(static=True, default="<memory>")

    def __len__(self) -> int:
        return len(self.individuals)

    def index(self, individual: str) -> int:
        try:
            return self.individuals.index(individual)
        except ValueError:
            raise KeyError(
                f"{self.source}: no individual {individual!r}; known: "
                f"{', '.join(self.individuals[:10])}{' ...' if len(self) > 10 else ''}"
            ) from None

    def select(self, individuals: Sequence[str] | Sequence[int]) -> Dataset:
        idx = np.array(
            [self.index(i) if isinstance(i, str) else int(i) for i in individuals], int
        )
        take = lambda x: x[idx]
        return Dataset(
            individuals=tuple(self.individuals[i] for i in idx),
            observables=self.observables,
            measurements=jax.tree.map(take, self.measurements),
            inputs=None if self.inputs is None else jax.tree.map(take, self.inputs),
            source=self.source,
        )

    def batched_inputs(self, model) -> dict[str, AbstractInput] | None:
        """Each individual's inputs (leading axis N): the dataset's own, else the
        model's defaults for everyone; `None` for a model without inputs."""
        if self.inputs is not None:
            return self.inputs
        if not model.inputs:
            return None
        n = len(self)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))),
                            model.default_inputs())

    def to_frame(self) -> pd.DataFrame:
        """Back to the long format (real measurements only)."""
        m = self.measurements
        mask = np.asarray(m.mask)
        i, t, k = np.nonzero(mask)
        frame = pd.DataFrame(
            {
                "individual": np.asarray(self.individuals, dtype=object)[i],
                "time": np.asarray(m.times)[i, t],
                "observable": np.asarray(self.observables, dtype=object)[k],
                "value": np.asarray(m.values)[i, t, k],
                "sigma": np.asarray(m.sigma)[i, t, k],
            }
        )
        if frame["sigma"].isna().all():
            frame = frame.drop(columns="sigma")
        return frame


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read CSV, TSV or Parquet (by suffix) with every column as text, so validation
    sees exactly what the file holds (missing cells become "").

    The index, named `row`, holds each measurement's row number as a spreadsheet shows
    it: the header is row 1 and blank lines count, so messages point at the right row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError([Issue(str(path), "file not found")])
    if path.stat().st_size == 0:
        raise DataError([Issue(str(path), "file is empty")])
    suffix = path.suffix.lower()
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise DataError(
            [Issue(str(path), "reading Parquet needs pyarrow: pip install 'calibrate[parquet]'")]
        )
    try:
        if suffix == ".parquet":
            raw = pd.read_parquet(path)
            frame = pd.DataFrame(
                {j: _as_text(raw.iloc[:, j]).to_numpy() for j in range(raw.shape[1])},
                index=pd.Index(np.arange(len(raw)) + 2, name="row"),
            )
            frame.columns = [str(c) for c in raw.columns]
        else:
            frame = _read_delimited(path, "\t" if suffix in (".tsv", ".tab") else ",")
    except DataError:
        raise
    except Exception as error:  # malformed files raise many types
        raise DataError([Issue(str(path), f"cannot be read as a table: {error}")]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _read_delimited(path: Path, sep: str) -> pd.DataFrame:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        records = list(csv.reader(handle, delimiter=sep, skipinitialspace=True))
    # Record k is spreadsheet row k + 1; blank records keep their row numbers.
    filled = [k for k, record in enumerate(records) if any(f.strip() for f in record)]
    if not filled:
        raise DataError([Issue(str(path), "file is empty")])
    header = records[filled[0]]
    n = len(header)
    rows, cells, issues = [], [], []
    for k in filled[1:]:
        record = records[k]
        if len(record) > n and any(f.strip() for f in record[n:]):
            issues.append(Issue(str(path), f"{len(record)} fields but the header has {n}",
                                row=k + 1))
            continue
        rows.append(k + 1)
        cells.append((record + [""] * n)[:n])
    if issues:
        raise DataError(issues)
    index = pd.Index(rows, name="row", dtype=int)
    frame = pd.DataFrame(cells, columns=range(n), index=index, dtype=object)
    frame.columns = header  # may repeat names; validation reports that
    return frame


def _as_text(column: pd.Series) -> pd.Series:
    """Cells as stripped strings; missing cells (None, NaN, NA, NaT) become ""."""
    return column.map(
        lambda v: "" if v is None or (pd.api.types.is_scalar(v) and pd.isna(v))
        else str(v).strip()
    ).astype(object)


def _parse_numbers(texts: pd.Series) -> np.ndarray:
    return pd.to_numeric(_as_text(texts), errors="coerce").to_numpy(float)


def dataset_from_frame(
    frame: pd.DataFrame,
    *,
    observables: Sequence[str] | None = None,
    source: str = "<table>",
    t0: float = 0.0,
    positive_observables: Sequence[str] = (),
) -> Dataset:
    """Validate a long-format table and lay it out as a `Dataset`.

    **Arguments:**

    - `observables`: the model's observables; rows naming others are errors. Their
      order fixes the layout. `None`: take the names found, sorted.
    - `source`: file name used in error messages.
    - `t0`: earliest allowed time.
    - `positive_observables`: observables whose values must be > 0 (log-normal noise).

    Rows are numbered from 2 (the header is row 1) in the frame's order, unless the
    index is named `row` (as `read_table` makes it): then it holds the row numbers.

    **Raises:** `DataError` listing every problem with file, row and column.
    """
    issues: list[Issue] = []
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = list(frame.columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    for c in missing:
        close = difflib.get_close_matches(c, columns, n=1, cutoff=0.6)
        hint = f"; is '{close[0]}' a misspelling of it?" if close else ""
        issues.append(
            Issue(source, f"missing required column '{c}' (found: {', '.join(columns)}){hint}",
                  column=c)
        )
    unknown_columns = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    for c in unknown_columns:
        close = difflib.get_close_matches(c, REQUIRED_COLUMNS + OPTIONAL_COLUMNS, n=1)
        if close and close[0] not in columns:
            issues.append(Issue(source, f"unknown column; did you mean '{close[0]}'?",
                                column=c))
    repeated = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if columns.count(c) > 1]
    for c in repeated:
        issues.append(Issue(source, f"column appears {columns.count(c)} times", column=c))
    if missing or repeated:
        raise DataError(issues)
    if len(frame) == 0:
        raise DataError([Issue(source, "table has a header but no measurements")])

    if frame.index.name == "row" and pd.api.types.is_integer_dtype(frame.index):
        rows = frame.index.to_numpy(int)
    else:
        rows = np.arange(len(frame)) + 2
    columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in columns]
    text = {c: _as_text(frame[c]) for c in columns}

    blank = {c: ((text[c] == "") | (text[c].str.lower() == "nan")).to_numpy()
             for c in ("individual", "observable")}
    for c in ("individual", "observable"):
        for r in rows[blank[c]]:
            issues.append(Issue(source, "empty; a name is needed", row=int(r), column=c))

    numbers = {}
    for c in ("time", "value"):
        values = _parse_numbers(text[c])
        numbers[c] = values
        for r, raw, v in zip(rows, text[c], values):
            if raw == "" or raw.lower() == "nan":
                issues.append(Issue(source, "empty or NaN; a number is needed", int(r), c))
            elif math.isnan(v):
                issues.append(Issue(source, f"'{raw}' is not a number", int(r), c))
            elif math.isinf(v):
                issues.append(Issue(source, f"'{raw}' is not finite", int(r), c))
    for r, v in zip(rows, numbers["time"]):
        if np.isfinite(v) and v < t0:
            message = "negative time" if t0 == 0 else f"time before the model's t0={t0}"
            issues.append(Issue(source, f"{message} ({v:g})", int(r), "time"))

    if "sigma" in columns:
        sigma = _parse_numbers(text["sigma"])
        for r, raw, s in zip(rows, text["sigma"], sigma):
            if raw == "" or raw.lower() == "nan":
                sigma_given = False
            else:
                sigma_given = True
            if not sigma_given:
                continue
            if math.isnan(s):
                issues.append(Issue(source, f"'{raw}' is not a number", int(r), "sigma"))
            elif not math.isfinite(s) or s <= 0:
                issues.append(
                    Issue(source, f"sigma must be positive and finite, got {raw}", int(r),
                          "sigma")
                )
        sigma = np.where(
            text["sigma"].isin(["", "nan", "NaN", "NAN"]).to_numpy(), np.nan, sigma
        )
    else:
        sigma = np.full(len(frame), np.nan)

    names_found = sorted(set(text["observable"][~blank["observable"]]))
    if observables is None:
        observables = names_found
    observables = tuple(observables)
    for r, name, is_blank in zip(rows, text["observable"], blank["observable"]):
        if not is_blank and name not in observables:
            close = difflib.get_close_matches(name, observables, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            issues.append(
                Issue(source, f"unknown observable '{name}' (model has: "
                      f"{', '.join(observables)}){hint}", int(r), "observable")
            )
    for r, name, v in zip(rows, text["observable"], numbers["value"]):
        if name in positive_observables and np.isfinite(v) and v <= 0:
            issues.append(
                Issue(source, f"value {v:g} must be positive: '{name}' has log-normal noise",
                      int(r), "value")
            )

    key = pd.DataFrame(
        {
            "individual": text["individual"],
            "time": numbers["time"],
            "observable": text["observable"],
            "value": numbers["value"],
        }
    )
    duplicated = key.duplicated(keep="first").to_numpy()
    if duplicated.any():
        first_row = {}
        for r, row_key in zip(rows, map(tuple, key.itertuples(index=False))):
            first_row.setdefault(row_key, int(r))
        for r, row_key, dup in zip(rows, map(tuple, key.itertuples(index=False)), duplicated):
            if dup:
                issues.append(
                    Issue(source, f"duplicate of row {first_row[row_key]} (same individual, "
                          "time, observable and value)", int(r))
                )

    if issues:
        issues.sort(key=lambda i: (i.row or 0, i.column or ""))
        raise DataError(issues)

    return _layout(key.assign(sigma=sigma), observables, source)


def _layout(frame: pd.DataFrame, observables: tuple[str, ...], source: str) -> Dataset:
    individuals = tuple(dict.fromkeys(frame["individual"]))  # order of first appearance
    obs_index = {name: k for k, name in enumerate(observables)}
    frame = frame.assign(
        _k=frame["observable"].map(obs_index),
        _replicate=frame.groupby(["individual", "time", "observable"]).cumcount(),
    )
    # One time slot per (time, replicate) pair, so replicates need no special casing.
    slots = {
        ind: sorted(set(zip(group["time"], group["_replicate"])))
        for ind, group in frame.groupby("individual", sort=False)
    }
    n_slots = max(len(s) for s in slots.values())
    n, o = len(individuals), len(observables)
    times = np.zeros((n, n_slots))
    values = np.zeros((n, n_slots, o))
    sigma = np.full((n, n_slots, o), np.nan)
    mask = np.zeros((n, n_slots, o), bool)
    for i, ind in enumerate(individuals):
        slot_times = [t for t, _ in slots[ind]]
        times[i, : len(slot_times)] = slot_times
        times[i, len(slot_times):] = slot_times[-1]
        slot_of = {s: j for j, s in enumerate(slots[ind])}
        group = frame[frame["individual"] == ind]
        js = [slot_of[(t, r)] for t, r in zip(group["time"], group["_replicate"])]
        ks = group["_k"].to_numpy()
        values[i, js, ks] = group["value"].to_numpy()
        sigma[i, js, ks] = group["sigma"].to_numpy()
        mask[i, js, ks] = True
    return Dataset(
        individuals=individuals,
        observables=observables,
        measurements=Measurements(
            # device_put, not jnp.asarray: the latter compiles a conversion per shape.
            times=jax.device_put(times),
            values=jax.device_put(values),
            sigma=jax.device_put(sigma),
            mask=jax.device_put(mask),
        ),
        source=source,
    )


def load_measurements(
    path: str | os.PathLike,
    *,
    observables: Sequence[str] | None = None,
    t0: float = 0.0,
    positive_observables: Sequence[str] = (),
) -> Dataset:
    """Load a long-format measurement table (CSV, TSV or Parquet) into a `Dataset`.

    **Raises:** `DataError` naming file, row and column of every problem.
    """
    frame = read_table(path)
    return dataset_from_frame(
        frame,
        observables=observables,
        source=str(path),
        t0=t0,
        positive_observables=positive_observables,
    )


def dataset_for_model(model, frame_or_path, **kwargs) -> Dataset:
    """Load or validate measurements against a model's observables and noise models."""
    from ._noise import LogNormal

    positive = [o.name for o in model.observables if isinstance(o.noise, LogNormal)]
    options = dict(observables=model.observable_names, t0=model.t0,
                   positive_observables=positive)
    options.update(kwargs)
    if isinstance(frame_or_path, pd.DataFrame):
        return dataset_from_frame(frame_or_path, **options)
    return load_measurements(frame_or_path, **options)


def stack_inputs(inputs: Sequence[Mapping[str, AbstractInput]]) -> dict[str, AbstractInput]:
    """Stack per-individual inputs (same structure and shapes) along a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(i) for i in inputs])
