"""Plots and an HTML report of a fit (matplotlib, written atomically)."""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._data import Dataset, Measurements
from ._io import write_bytes_atomic, write_text_atomic
from ._model import AbstractODEModel
from ._predictions import predictions_frame
from ._simulate import Integrator


MAX_INDIVIDUALS_PLOTTED = 24


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def dense_predictions(model: AbstractODEModel, data: Dataset,
                      parameters: Mapping[str, object], *, n_times: int = 200,
                      integrator: Integrator = Integrator()) -> pd.DataFrame:
    """Each individual's observables on `n_times` points from the model's t0 to its
    last measurement: the curves drawn through the data."""
    times = np.asarray(data.measurements.times)
    end = np.maximum(times.max(axis=1), model.t0 + 1e-9)
    grid = model.t0 + (end[:, None] - model.t0) * np.linspace(0, 1, n_times)[None, :]
    n, k = len(data), len(data.observables)
    dense = Dataset(
        individuals=data.individuals, observables=data.observables,
        measurements=Measurements(times=jnp.asarray(grid), values=jnp.ones((n, n_times, k)),
                                  sigma=jnp.full((n, n_times, k), jnp.nan),
                                  mask=jnp.ones((n, n_times, k), bool)),
        inputs=data.inputs, source=data.source)
    frame = predictions_frame(model, dense, parameters, integrator=integrator)
    return frame[["individual", "time", "observable", "predicted", "status"]]


def plot_individual_fits(predictions: pd.DataFrame, curves: pd.DataFrame,
                         path: Path) -> Path:
    """One panel per individual (the first `MAX_INDIVIDUALS_PLOTTED`): data as points,
    the fitted model as lines, one colour per observable."""
    plt = _pyplot()
    individuals = list(dict.fromkeys(predictions["individual"]))
    shown = individuals[:MAX_INDIVIDUALS_PLOTTED]
    observables = list(dict.fromkeys(predictions["observable"]))
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.5 * rows),
                             squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ind in zip(axes.flat, shown):
        for j, obs in enumerate(observables):
            colour = colours[j % len(colours)]
            points = predictions[(predictions.individual == ind)
                                 & (predictions.observable == obs)]
            line = curves[(curves.individual == ind) & (curves.observable == obs)]
            ax.plot(line["time"], line["predicted"], color=colour, lw=1.2,
                    label=f"{obs} (model)")
            ax.plot(points["time"], points["observed"], "o", color=colour, ms=3,
                    label=f"{obs} (data)")
        ax.set_title(str(ind), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    title = "Individual fits"
    if len(individuals) > len(shown):
        title += f" (first {len(shown)} of {len(individuals)})"
    fig.suptitle(title)
    fig.supxlabel("time")
    return _save(fig, path)


def plot_observed_vs_predicted(predictions: pd.DataFrame, path: Path) -> Path:
    plt = _pyplot()
    observables = list(dict.fromkeys(predictions["observable"]))
    fig, axes = plt.subplots(1, len(observables), figsize=(3.6 * len(observables), 3.4),
                             squeeze=False)
    for ax, obs in zip(axes.flat, observables):
        rows = predictions[predictions.observable == obs]
        ax.plot(rows["predicted"], rows["observed"], "o", ms=3, alpha=0.6)
        low = float(np.nanmin([rows["predicted"].min(), rows["observed"].min()]))
        high = float(np.nanmax([rows["predicted"].max(), rows["observed"].max()]))
        ax.plot([low, high], [low, high], "k--", lw=1)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
        ax.set_title(obs)
    fig.suptitle("Observed against predicted")
    return _save(fig, path)


def plot_residuals(predictions: pd.DataFrame, path: Path) -> Path:
    """Weighted residuals against time and their histogram against N(0, 1)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    for obs, rows in predictions.groupby("observable", sort=False):
        left.plot(rows["time"], rows["weighted_residual"], "o", ms=3, alpha=0.6, label=obs)
    left.axhline(0, color="k", lw=1)
    for level in (-2, 2):
        left.axhline(level, color="k", lw=0.5, ls=":")
    left.set_xlabel("time")
    left.set_ylabel("weighted residual")
    left.legend(fontsize=7)
    residuals = predictions["weighted_residual"].to_numpy()
    residuals = residuals[np.isfinite(residuals)]
    right.hist(residuals, bins=30, density=True, alpha=0.7)
    grid = np.linspace(-4, 4, 200)
    right.plot(grid, np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), "k", lw=1,
               label="N(0, 1)")
    right.set_xlabel("weighted residual")
    right.legend(fontsize=7)
    fig.suptitle("Residuals")
    return _save(fig, path)


def plot_convergence(history: pd.DataFrame, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    objective = history["objective"].to_numpy()
    ax.plot(history["step"], objective, "o-", ms=3)
    ax.set_xlabel("outer step")
    ax.set_ylabel("objective")
    ax.set_title("Outer convergence")
    return _save(fig, path)


def plot_parameter_distributions(individual: pd.DataFrame, names: Sequence[str],
                                 scales: Mapping[str, str], path: Path,
                                 population: pd.DataFrame | None = None) -> Path:
    """Histogram of the individual estimates of each parameter (on its scale), with
    the estimated population density N(μ, sd²) for population-distributed ones."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = individual[name].to_numpy(float)
        scale = scales[name]
        transform = {"lin": lambda v: v, "log": np.log, "log10": np.log10}[scale]
        shown = transform(values)
        ax.hist(shown, bins=max(5, min(30, len(values) // 2)), density=True, alpha=0.7)
        label = name if scale == "lin" else f"{scale}({name})"
        if population is not None:
            mean = population[(population.parameter == name)
                              & (population.kind == "mean_scaled")]
            sd = population[(population.parameter == name) & (population.kind == "sd")]
            if len(mean) and len(sd):
                mu, omega = float(mean.estimate.iloc[0]), float(sd.estimate.iloc[0])
                grid = np.linspace(mu - 4 * omega, mu + 4 * omega, 200)
                ax.plot(grid, np.exp(-0.5 * ((grid - mu) / omega) ** 2)
                        / (omega * math.sqrt(2 * math.pi)), "k", lw=1, label="population")
                ax.legend(fontsize=7)
        ax.set_xlabel(label)
    fig.suptitle("Individual estimates")
    return _save(fig, path)


def _table(frame: pd.DataFrame, max_rows: int = 50) -> str:
    shown = frame.head(max_rows)
    text = shown.to_html(index=False, float_format=lambda v: f"{v:.6g}", border=0,
                         classes="table", na_rep="—")
    if len(frame) > max_rows:
        text += f"<p>… {len(frame) - max_rows} more rows in the CSV file.</p>"
    return text


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
table.table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
table.table th, table.table td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd;
       text-align: right; }
table.table th:first-child, table.table td:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0 1.5em; }
.warning { color: #a40; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def write_html_report(path: Path, *, title: str, summary: Sequence[str],
                      tables: Sequence[tuple[str, pd.DataFrame]],
                      figures: Sequence[tuple[str, str | os.PathLike]],
                      warnings: Sequence[str] = (),
                      run: Mapping[str, object] | None = None) -> Path:
    """One self-contained page (images referenced by relative path, next to it)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
             f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>"]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f"<li class='warning'>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    for heading, frame in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_table(frame)}")
    for heading, image in figures:
        name = Path(image).name
        parts.append(f"<h2>{html.escape(heading)}</h2>"
                     f"<img src='{html.escape(name)}' alt='{html.escape(heading)}'>")
    if run:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td><code>"
                       f"{html.escape(str(v))}</code></td></tr>" for k, v in run.items())
        parts.append(f"<h2>Run</h2><table class='table'>{rows}</table>")
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts) + "\n")
