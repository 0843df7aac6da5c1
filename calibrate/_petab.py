r"""PEtab problems: an SBML model, experiment tables and a parameter table (v1; v2 is
read into the same layout by `_petab_v2`).

`load_petab(yaml)` reads the problem, imports the SBML model (`_sbml`) and lays every
table out as arrays, so that the whole likelihood is one jit-compiled function: the
simulation conditions are batched with `vmap`, the measurements vectorised.

With $\theta$ the parameters of the parameter table (estimated ones on their
`parameterScale`, the others at `nominalValue`), each simulation condition $c$ maps
model parameters and initial values to numbers or to entries of $\theta$ (condition
table), each measurement $m$ fills the placeholders `observableParameter{k}_{id}` /
`noiseParameter{k}_{id}` of its observable, and

$$ -\log p(y \mid \theta) = \sum_m \tfrac12\log(2\pi\sigma_m^2) + \tfrac12 r_m^2 + J_m
   \quad\text{(normal)},\qquad \log(2\sigma_m) + |r_m| + J_m \quad\text{(Laplace)}, $$

with $r_m = (g(y_m) - g(\hat y_m))/\sigma_m$ for the observable transformation
$g \in \{\mathrm{id}, \log, \log_{10}\}$ and $J_m = \log|g'(y_m)|^{-1}$ its Jacobian
term ($\log y_m$, $\log(y_m \ln 10)$). Objective priors add their negative log-density.
Pre-equilibration simulates the pre-condition to steady state first; the simulation
condition's own initial values then override the steady state where it sets them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import sympy as sp
from jaxtyping import Array, Bool, Float, Int

from . import _codegen
from ._data import DataError, Issue
from ._modelspec import did_you_mean
from ._noise import SIGMA_RESIDUAL_SHIFT
from ._parameters import Parameter, ParameterSpace
from ._results import RESULTS
from ._sbml import (
    TIME,
    SBMLError,
    SBMLModel,
    SymbolicModel,
    build_model,
    model_arguments,
    read_sbml,
)
from ._sensitivity import AbstractSensitivity, Automatic, for_optimiser
from ._simulate import Integrator, simulate, steady_state


TRANSFORMATIONS = ("lin", "log", "log10")
DISTRIBUTIONS = ("normal", "laplace")
POPULATION_DISTRIBUTIONS = ("fixed", "individual", "normal", "logNormal")
PRIORS = (
    "uniform", "normal", "laplace", "logNormal", "logLaplace",
    "parameterScaleUniform", "parameterScaleNormal", "parameterScaleLaplace",
)
_LOG_2PI = math.log(2 * math.pi)
# Stand-in for placeholders of other observables: the formulas of every observable are
# evaluated for every measurement and the right one picked, so unused slots must keep
# the others finite.
_UNUSED_SLOT = 1.0


class PEtabError(DataError):
    """An invalid or unsupported PEtab problem; `issues` locate each problem."""


# ---------------------------------------------------------------------------------------
# Reading


@dataclass
class _Table:
    frame: pd.DataFrame
    path: str

    def issue(self, message, row=None, column=None) -> Issue:
        # Spreadsheet numbering: header is row 1.
        return Issue(self.path, message, None if row is None else row + 2, column)

    def not_one_of(self, value, choices, row, column) -> Issue:
        """The `column` of `row` holds `value`, which is none of `choices`."""
        return self.issue(f"{column} {value!r} is not one of {', '.join(choices)}"
                          f"{did_you_mean(value, choices)}", row, column)


def _read_tsv(path: Path, required: Sequence[str], issues: list[Issue]) -> _Table | None:
    if not path.is_file():
        issues.append(Issue(str(path), "file not found"))
        return None
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as error:  # pandas' parser errors carry the line
        issues.append(Issue(str(path), f"cannot be read as a TSV table: {error}"))
        return None
    frame.columns = [c.strip() for c in frame.columns]
    frame = frame.apply(lambda col: col.str.strip())
    missing = [c for c in required if c not in frame.columns]
    for c in missing:
        issues.append(Issue(
            str(path), f"missing required column '{c}'{did_you_mean(c, frame.columns)}"
        ))
    return None if missing else _Table(frame.reset_index(drop=True), str(path))


def _concat(tables: Sequence[_Table]) -> _Table:
    """One table from several files; rows keep their own file for messages."""
    if len(tables) == 1:
        return tables[0]
    return _Table(pd.concat([t.frame for t in tables], ignore_index=True),
                  " + ".join(t.path for t in tables))


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_missing(text: str) -> bool:
    return text == "" or text.lower() == "nan"


# ---------------------------------------------------------------------------------------
# The problem as arrays


class _Mapping(eqx.Module):
    """Values that are either constants or entries of θ: `source >= 0` indexes θ."""

    source: Int[Array, "*shape"]
    value: Float[Array, "*shape"]

    def resolve(self, theta):
        return jnp.where(self.source >= 0, theta[jnp.maximum(self.source, 0)], self.value)


class MeasurementSet(eqx.Module):
    """Measurements and the simulation conditions they need.

    `conditions` index the problem's simulated conditions; `condition` indexes
    `conditions`, `time` the condition's time grid (its last entry is the steady
    state when the problem has time-inf measurements). Padding rows have
    `mask = False` and harmless stand-in values; `row` is each measurement's row in
    the measurement table (-1 for padding).
    """

    conditions: Int[Array, " C"]
    condition: Int[Array, " M"]
    time: Int[Array, " M"]
    observable: Int[Array, " M"]
    value: Float[Array, " M"]
    transformation: Int[Array, " M"]
    distribution: Int[Array, " M"]
    observable_slots: _Mapping  # (M, J_obs)
    noise_slots: _Mapping  # (M, J_noise)
    mask: Bool[Array, " M"]
    row: Int[Array, " M"]


@dataclass(frozen=True)
class PopulationRole:
    """A parameter's role in the population extension (see `calibrate._petab_population`):
    `role` is "fixed", "random" or "individual"; a random parameter has a `distribution`
    ("normal" or "logNormal") and a start standard deviation `sd` on that scale."""

    parameter: str
    role: str
    distribution: str | None = None
    sd: float | None = None


class PEtabProblem(eqx.Module):
    """A PEtab problem compiled for JAX (see the module docstring for the maths).

    Parameter vectors `x` hold the *estimated* parameters on their PEtab
    `parameterScale`, in the order of `estimated_ids` (the parameter table's order).
    """

    model: SBMLModel
    parameter_ids: tuple[str, ...] = eqx.field(static=True)
    estimated_ids: tuple[str, ...] = eqx.field(static=True)
    parameter_space: ParameterSpace = eqx.field(static=True)
    condition_ids: tuple[str, ...] = eqx.field(static=True)
    observable_ids: tuple[str, ...] = eqx.field(static=True)
    source: str = eqx.field(static=True)

    nominal: Float[Array, " P"]
    estimated_index: Int[Array, " E"]
    estimated_scale: Int[Array, " E"]  # 0 lin, 1 log, 2 log10

    condition_parameters: _Mapping  # (C, K) model parameters per condition
    condition_initial: _Mapping  # (C, S) initial-value overrides
    condition_initial_set: Array  # (C, S) bool
    initial_divide_by: Int[Array, " S"]  # parameter index of the compartment, or -1
    preequilibration_conditions: Int[Array, " Q"]  # the distinct pre-conditions
    preequilibration_slot: Int[Array, " C"]  # index into those, or -1
    times: Float[Array, "C T"]
    steady_state_measured: Array | None  # (C,) bool; None: no time-inf measurements

    measurements: MeasurementSet  # every measurement of the problem, in table order
    # The population extension: each individual's measurements (leading axis N).
    individual_ids: tuple[str, ...] = eqx.field(static=True)
    individual_measurements: MeasurementSet | None
    population_roles: tuple[PopulationRole, ...] = eqx.field(static=True)

    prior_type: Int[Array, " E"]  # index into PRIORS, -1 for none
    prior_parameters: Float[Array, "E 2"]

    model_parameter_names: tuple[str, ...] = eqx.field(static=True)
    observe_function: Any = eqx.field(static=True)
    noise_function: Any = eqx.field(static=True)
    has_preequilibration: bool = eqx.field(static=True)
    integrator: Integrator
    sensitivity: AbstractSensitivity
    steady_state_tolerances: tuple[float, float] = eqx.field(static=True)

    # -- parameters ---------------------------------------------------------------------

    @property
    def n_measurements(self) -> int:
        return int(self.measurements.value.shape[0])

    @property
    def is_population(self) -> bool:
        """Whether the problem uses the population extension (an `individualId`)."""
        return bool(self.individual_ids)

    def nominal_x(self) -> Float[Array, " E"]:
        """The estimated parameters' nominal values on their scale."""
        return _to_scale(self.nominal[self.estimated_index], self.estimated_scale)

    def bounds_x(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of `x` (on the parameters' scales)."""
        return self.parameter_space.scaled_bounds()

    def theta(self, x: Float[Array, " E"]) -> Float[Array, " P"]:
        """All parameters on the linear scale from the estimated ones on their scales."""
        x = jnp.asarray(x, dtype=float)
        return self.nominal.at[self.estimated_index].set(
            _from_scale(x, self.estimated_scale)
        )

    # -- simulation -----------------------------------------------------------------------

    def _condition_params(self, theta, condition):
        values = self.condition_parameters.resolve(theta)[condition]
        return dict(zip(self.model_parameter_names, values, strict=True)), values

    def _initial_state(self, theta, condition, params, values, base=None):
        x0 = self.model.initial_state(params) if base is None else base
        override = self.condition_initial.resolve(theta)[condition]
        volume = jnp.where(self.initial_divide_by >= 0,
                           values[jnp.maximum(self.initial_divide_by, 0)], 1.0)
        return jnp.where(self.condition_initial_set[condition], override / volume, x0)

    def _steady_state(self, params, x0):
        rtol, atol = self.steady_state_tolerances
        return steady_state(self.model, params, initial_state=x0,
                            integrator=self.integrator, sensitivity=self.sensitivity,
                            rtol=rtol, atol=atol)

    def preequilibrate(self, theta):
        """Steady states (and results) of every pre-equilibration condition, each
        computed once however many simulation conditions start from it."""
        def one(pre):
            params, values = self._condition_params(theta, pre)
            return self._steady_state(params, self._initial_state(theta, pre, params, values))

        return jax.vmap(one)(self.preequilibration_conditions)

    def simulate_condition(self, theta, condition, preequilibrated=None):
        """States of one simulation condition at its measurement times, and the result;
        `preequilibrated` is `preequilibrate(theta)` when the caller has it."""
        params, values = self._condition_params(theta, condition)
        x0 = self._initial_state(theta, condition, params, values)
        result = RESULTS.successful
        if self.has_preequilibration:
            states, results = (self.preequilibrate(theta) if preequilibrated is None
                               else preequilibrated)
            slot = self.preequilibration_slot[condition]
            x_ss = states[jnp.maximum(slot, 0)]
            pre_result = jax.tree.map(lambda v: v[jnp.maximum(slot, 0)], results)
            # The simulation condition's own initial values override the steady state.
            after = self._initial_state(theta, condition, params, values, base=x_ss)
            x0 = jnp.where(slot >= 0, after, x0)
            result = RESULTS.where(slot >= 0, pre_result, result)
        trajectory = simulate(
            self.model, params, _row(self.times, condition), integrator=self.integrator,
            sensitivity=self.sensitivity, initial_state=x0,
        )
        result = RESULTS.where(result == RESULTS.successful, trajectory.result, result)
        states = trajectory.states
        if self.steady_state_measured is not None:
            # Measurements at time inf see the steady state reached from x0.
            x_inf, inf_result = self._steady_state(params, x0)
            needed = self.steady_state_measured[condition]
            result = RESULTS.where(needed & (result == RESULTS.successful), inf_result,
                                   result)
            states = jnp.concatenate([states, x_inf[None]])
        return states, params, result

    def predictions(self, x) -> tuple[Float[Array, " M"], Float[Array, " M"], RESULTS]:
        """Simulated observable $\\hat y_m$ and noise $\\sigma_m$ of every measurement
        (in the table's row order), and the worst solve result."""
        return self.predict(self.theta(x), self.measurements)

    def predict(self, theta, measurements: MeasurementSet):
        """`predictions` of a `MeasurementSet` at all parameters `theta` (linear scale)."""
        preequilibrated = self.preequilibrate(theta) if self.has_preequilibration else None
        states, params, results = jax.vmap(
            lambda c: self.simulate_condition(theta, c, preequilibrated)
        )(measurements.conditions)
        c = measurements.condition
        times = self.times[measurements.conditions]
        if self.steady_state_measured is not None:
            times = jnp.concatenate([times, jnp.full((times.shape[0], 1), jnp.inf)], axis=1)
        t = times[c, measurements.time]
        xs = states[c, measurements.time]
        p = jax.tree.map(lambda v: v[c], params)
        obs_slots = measurements.observable_slots.resolve(theta)
        noise_slots = measurements.noise_slots.resolve(theta)
        all_observables = jax.vmap(self.observe_function, in_axes=(0, 0, 0, None, 0))(
            t, xs, p, theta, obs_slots
        )
        all_sigma = jax.vmap(self.noise_function, in_axes=(0, 0, 0, None, 0, 0))(
            t, xs, p, theta, noise_slots, all_observables
        )
        pick = lambda a: jnp.take_along_axis(
            a, measurements.observable[:, None], axis=1
        )[:, 0]
        failed = results != RESULTS.successful
        first_failure = jax.tree.map(lambda v: v[jnp.argmax(failed)], results)
        worst = RESULTS.where(jnp.any(failed), first_failure, RESULTS.successful)
        return pick(all_observables), pick(all_sigma), worst

    # -- likelihood ----------------------------------------------------------------------

    def terms(self, theta, measurements: MeasurementSet):
        """Per measurement: residual $r_m$, $\\sigma_m$ and negative log-likelihood term
        (0 for padding), and the worst solve result."""
        y_pred, sigma, result = self.predict(theta, measurements)
        mask = measurements.mask
        # Padding gets harmless stand-ins so no NaN leaks into derivatives.
        y = jnp.where(mask, measurements.value, 1.0)
        y_pred = jnp.where(mask, y_pred, 1.0)
        sigma = jnp.where(mask, sigma, 1.0)
        code = measurements.transformation
        r = (_to_scale(y, code) - _to_scale(y_pred, code)) / sigma
        jacobian = jnp.where(
            code == 0, 0.0,
            jnp.log(jnp.where(code == 0, 1.0, y)) + jnp.where(code == 2, math.log(math.log(10)), 0.0),
        )
        laplace = measurements.distribution == 1
        terms = jnp.where(
            laplace,
            jnp.log(2 * sigma) + jnp.abs(r),
            0.5 * _LOG_2PI + jnp.log(sigma) + 0.5 * r**2,
        ) + jacobian
        return jnp.where(mask, r, 0.0), sigma, jnp.where(mask, terms, 0.0), result

    def evaluate(self, x) -> tuple[Float[Array, ""], RESULTS]:
        """Negative log-likelihood of the data (priors excluded) and the solve result;
        `inf` when a solve failed or a prediction is invalid for its noise model."""
        _, _, terms, result = self.terms(self.theta(x), self.measurements)
        value, _, result = _checked(jnp.sum(terms), jnp.zeros(0), result)
        return value, result

    def negative_log_likelihood(self, x) -> Float[Array, ""]:
        return self.evaluate(x)[0]

    def negative_log_prior(self, x) -> Float[Array, ""]:
        """$-\\log p(\\theta)$ of the objective priors (0 where none is given)."""
        x = jnp.asarray(x, dtype=float)
        linear = _from_scale(x, self.estimated_scale)
        a, b = self.prior_parameters[:, 0], self.prior_parameters[:, 1]
        kind = self.prior_type
        on_scale = kind >= PRIORS.index("parameterScaleUniform")
        value = jnp.where(on_scale, x, linear)
        log_value = jnp.log(jnp.where(value > 0, value, 1.0))
        densities = jnp.stack([
            jnp.log(b - a) + jnp.where((value >= a) & (value <= b), 0.0, jnp.inf),  # uniform
            0.5 * _LOG_2PI + jnp.log(b) + 0.5 * ((value - a) / b) ** 2,  # normal
            jnp.log(2 * b) + jnp.abs(value - a) / b,  # laplace
            log_value + 0.5 * _LOG_2PI + jnp.log(b) + 0.5 * ((log_value - a) / b) ** 2,
            log_value + jnp.log(2 * b) + jnp.abs(log_value - a) / b,  # logLaplace
        ])
        family = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])[jnp.maximum(kind, 0)]
        per_parameter = jnp.take_along_axis(densities, family[None, :], axis=0)[0]
        return jnp.sum(jnp.where(kind >= 0, per_parameter, 0.0))

    def objective(self, x) -> Float[Array, ""]:
        """What a fit minimises: negative log-likelihood plus negative log-prior."""
        return self.negative_log_likelihood(x) + self.negative_log_prior(x)

    def residuals(self, x) -> Float[Array, " R"]:
        r"""Residuals with $\tfrac12\lVert r\rVert^2 = $ objective + const (normal noise):
        $r_m$, then $\sqrt{2\log\sigma_m + C}$ for every measurement."""
        return self.residuals_of(self.theta(x), self.measurements)[0]

    def residuals_of(self, theta, measurements: MeasurementSet):
        """`residuals` (0 for padding), the negative log-likelihood and the solve
        result of a `MeasurementSet` at `theta`; on failure the residuals are a large
        constant without derivative and the likelihood is `inf`."""
        r, sigma, terms, result = self.terms(theta, measurements)
        extra = jnp.where(measurements.mask,
                          jnp.sqrt(2 * jnp.log(sigma) + SIGMA_RESIDUAL_SHIFT), 0.0)
        value, out, result = _checked(jnp.sum(terms), jnp.concatenate([r, extra]), result)
        return out, value, result

    def value_and_gradient(self, x, sensitivity: AbstractSensitivity | None = None):
        """Negative log-likelihood and its gradient w.r.t. `x` (parameter scale), by the
        problem's sensitivity (for the number of estimated parameters) unless another
        is given."""
        problem = self if sensitivity is None else eqx.tree_at(
            lambda p: p.sensitivity, self, sensitivity
        )
        problem = for_optimiser(problem, len(self.estimated_ids), gradients=True,
                                lanes=len(self.condition_ids))
        return problem.sensitivity.value_and_grad(
            lambda z: problem.negative_log_likelihood(z), jnp.asarray(x, dtype=float)
        )


def _row(table: Float[Array, "C T"], index: Int[Array, ""]) -> Float[Array, " T"]:
    """`table[index]` as a masked sum. Batched over individuals, the gather a plain
    index becomes (of a one-row table, the usual single condition) sent XLA's CPU
    algebraic simplifier round a rewrite cycle that it reports as an error, eleven
    times per compile of a population's solve; a masked sum compiles cleanly and costs
    C × T additions."""
    chosen = jnp.arange(table.shape[0]) == index
    return jnp.sum(jnp.where(chosen[:, None], table, 0.0), axis=0)


def _checked(value, residuals, result):
    """A likelihood and its residuals made safe for optimisers: where the solve failed
    or either is not finite, `inf`, a large constant without derivative and
    `nonfinite_likelihood` (unless the solve's own failure says more)."""
    solved = result == RESULTS.successful
    ok = solved & jnp.isfinite(value) & jnp.all(jnp.isfinite(residuals))
    result = RESULTS.where(solved & ~ok, RESULTS.nonfinite_likelihood, result)
    residuals = jnp.where(ok, residuals,
                          jax.lax.stop_gradient(jnp.full_like(residuals, 1e6)))
    return jnp.where(ok, value, jnp.inf), residuals, result


def _to_scale(values, scale):
    return jnp.where(scale == 0, values,
                     jnp.where(scale == 1, 1.0, 1.0 / math.log(10))
                     * jnp.log(jnp.where(scale == 0, 1.0, values)))


def _from_scale(values, scale):
    return jnp.where(scale == 0, values,
                     jnp.where(scale == 1, jnp.exp(values), 10.0 ** values))


# ---------------------------------------------------------------------------------------
# Loading


def load_petab(
    yaml_path: str | os.PathLike,
    *,
    integrator: Integrator = Integrator(),
    sensitivity: AbstractSensitivity = Automatic(),
    steady_state_tolerances: tuple[float, float] = (1e-10, 1e-12),
) -> PEtabProblem:
    """Read a PEtab v1 or v2 problem (its YAML file) into a `PEtabProblem`.

    Every problem found is reported at once in a `PEtabError` naming file, row and
    column; unsupported features are refused by name. The default `sensitivity`,
    `Automatic()`, takes gradients by the discrete adjoint for problems with many
    estimated parameters and forward sensitivities otherwise.
    """
    return _Loader(Path(yaml_path)).load(integrator, sensitivity, steady_state_tolerances)


def problem_files(path: str | os.PathLike) -> dict[str, list[Path]]:
    """The files a PEtab problem consists of, by role (checks the YAML file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise _yaml_error(path, "PEtab problem file not found")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        row = None if mark is None else mark.line + 1
        raise PEtabError([Issue(str(path), f"not valid YAML: {error}", row)]) from None
    if not isinstance(content, dict):
        raise _yaml_error(path, "expected a mapping with format_version, parameter_file "
                                "and problems")
    version = str(content.get("format_version", ""))
    if version.split(".")[0] == "2":
        from ._petab_v2 import problem_files_v2

        return problem_files_v2(path, content)
    if version not in ("1", "1.0", "1.0.0"):
        raise _yaml_error(path, f"format_version {version!r}: PEtab v1 and v2 are "
                                "supported", "format_version")
    problems = content.get("problems")
    if not isinstance(problems, list) or len(problems) != 1:
        raise _yaml_error(path, "expected exactly one entry in 'problems'", "problems")
    problem = problems[0]
    files = {}
    for key in ("sbml_files", "condition_files", "measurement_files", "observable_files"):
        if not problem.get(key):
            raise _yaml_error(path, f"problems[0].{key} is missing", f"problems[0].{key}")
        files[key] = _listed_files(path, problem[key])
    if len(files["sbml_files"]) != 1:
        raise _yaml_error(path, "exactly one SBML file is supported",
                          "problems[0].sbml_files")
    if not content.get("parameter_file"):
        raise _yaml_error(path, "parameter_file is missing", "parameter_file")
    files["parameter_file"] = _listed_files(path, content["parameter_file"])
    return files


def _yaml_error(path: Path, message: str, key: str | None = None) -> PEtabError:
    return PEtabError([Issue(str(path), message, key=key)])


def _listed_files(path: Path, value) -> list[Path]:
    """A YAML entry naming one file or a list of them, relative to the YAML file."""
    return [path.parent / v for v in (value if isinstance(value, list) else [value])]


def measurement_table(yaml_path: str | os.PathLike) -> pd.DataFrame:
    """The problem's measurement table(s) as read by `load_petab`, in the order a
    `PEtabProblem` holds them."""
    issues: list[Issue] = []
    tables = [_read_tsv(f, (), issues) for f in problem_files(yaml_path)["measurement_files"]]
    if issues:
        raise PEtabError(issues)
    return _concat(tables).frame


class _Loader:
    def __init__(self, path: Path):
        self.path = path
        self.issues: list[Issue] = []

    def fail_if_issues(self):
        if self.issues:
            raise PEtabError(self.issues)

    def read(self, files, required):
        tables = [_read_tsv(f, required, self.issues) for f in files]
        return None if any(t is None for t in tables) else _concat(tables)

    def load(self, integrator, sensitivity, steady_state_tolerances) -> PEtabProblem:
        files = problem_files(self.path)
        try:
            symbolic = read_sbml(files["sbml_files"][0])
        except SBMLError as error:
            location = error.location or str(files["sbml_files"][0])
            raise PEtabError([Issue(location, error.detail)]) from None
        if "experiment_files" in files:
            from ._petab_v2 import V2Reader

            tables = V2Reader(files, symbolic.states, self.issues).tables(self.read)
            self.fail_if_issues()
            parameters, conditions, observables, measurements = tables
        else:
            parameters = self.read(files["parameter_file"], (
                "parameterId", "parameterScale", "lowerBound", "upperBound", "nominalValue",
                "estimate"))
            conditions = self.read(files["condition_files"], ("conditionId",))
            observables = self.read(files["observable_files"], (
                "observableId", "observableFormula", "noiseFormula"))
            measurements = self.read(files["measurement_files"], (
                "observableId", "simulationConditionId", "measurement", "time"))
        self.fail_if_issues()
        table = self.parameter_table(parameters, symbolic)
        self.fail_if_issues()
        return self.assemble(symbolic, table, conditions, observables, measurements,
                             integrator, sensitivity, steady_state_tolerances)

    # -- parameter table ------------------------------------------------------------------

    def parameter_table(self, table: _Table, symbolic: SymbolicModel):
        self.parameters = table
        rows = []
        seen = set()
        for i, row in table.frame.iterrows():
            pid = row["parameterId"]
            if not pid.isidentifier():
                self.issues.append(table.issue(f"{pid!r} is not a valid identifier", i,
                                               "parameterId"))
                continue
            if pid in seen:
                self.issues.append(table.issue(f"duplicate parameterId {pid!r}", i,
                                               "parameterId"))
            seen.add(pid)
            if pid in symbolic.states or pid in symbolic.expressions:
                self.issues.append(table.issue(
                    f"{pid!r} is a state or derived quantity of the model, not a parameter",
                    i, "parameterId"))
            scale = row["parameterScale"]
            if scale not in TRANSFORMATIONS:
                self.issues.append(table.not_one_of(scale, TRANSFORMATIONS, i,
                                                    "parameterScale"))
            estimate = row["estimate"]
            if estimate not in ("0", "1"):
                self.issues.append(table.issue(f"estimate must be 0 or 1, got {estimate!r}",
                                               i, "estimate"))
            numbers = {}
            for column in ("lowerBound", "upperBound", "nominalValue"):
                text = row[column]
                value = -math.inf if column == "lowerBound" and text in ("", "-inf") else (
                    math.inf if column == "upperBound" and text in ("", "inf") else _float(text))
                if value is None or (column == "nominalValue" and not math.isfinite(value)
                                     and estimate == "0"):
                    self.issues.append(table.issue(f"{column} {text!r} is not a number", i,
                                                   column))
                    value = math.nan
                numbers[column] = value
            prior = self.prior(table, i, row)
            rows.append(dict(id=pid, scale=scale, estimate=estimate == "1", prior=prior,
                             row=i, population=self.population_role(table, i, row),
                             **numbers))
        for r in rows:
            lo, hi, nominal = r["lowerBound"], r["upperBound"], r["nominalValue"]
            if r["scale"] in ("log", "log10") and r["estimate"] and not lo > 0:
                self.issues.append(table.issue(
                    f"{r['scale']} scale needs a positive lowerBound, got {lo}", r["row"],
                    "lowerBound"))
            elif r["estimate"] and not lo < hi:
                self.issues.append(table.issue(
                    f"lowerBound {lo} is not below upperBound {hi}", r["row"], "upperBound"))
            elif r["estimate"] and math.isfinite(nominal) and not lo <= nominal <= hi:
                self.issues.append(table.issue(
                    f"nominalValue {nominal} lies outside [{lo}, {hi}]", r["row"],
                    "nominalValue"))
            elif r["estimate"] and not math.isfinite(nominal) and not (
                    math.isfinite(lo) and math.isfinite(hi)):
                self.issues.append(table.issue(
                    f"nominalValue is missing and the bounds [{lo}, {hi}] have no midpoint "
                    "to start from", r["row"], "nominalValue"))
        return rows

    def population_role(self, table, i, row) -> PopulationRole | None:
        """The population extension's columns `populationDistribution` and
        `populationSd` of one row (None when the row has neither)."""
        pid = row["parameterId"]
        kind = row.get("populationDistribution", "")
        sd_text = row.get("populationSd", "")
        if _is_missing(kind):
            if not _is_missing(sd_text):
                self.issues.append(table.issue(
                    "populationSd is given but populationDistribution is empty", i,
                    "populationSd"))
            return None if row["estimate"] != "1" else PopulationRole(pid, "fixed")
        if kind not in POPULATION_DISTRIBUTIONS:
            self.issues.append(table.not_one_of(kind, POPULATION_DISTRIBUTIONS, i,
                                                "populationDistribution"))
            return None
        if row["estimate"] != "1":
            self.issues.append(table.issue(
                f"populationDistribution {kind!r} needs estimate = 1", i, "estimate"))
            return None
        if kind in ("fixed", "individual"):
            if not _is_missing(sd_text):
                self.issues.append(table.issue(
                    f"populationSd applies to normal or logNormal parameters, not {kind}",
                    i, "populationSd"))
            return PopulationRole(pid, kind)
        sd = None
        if not _is_missing(sd_text):
            sd = _float(sd_text)
            if sd is None or not (math.isfinite(sd) and sd > 0):
                self.issues.append(table.issue(
                    f"populationSd {sd_text!r} is not a positive number", i, "populationSd"))
                sd = None
        nominal = _float(row["nominalValue"]) or 0.0
        if sd is None:
            sd = 0.3 if kind == "logNormal" or nominal == 0 else 0.3 * abs(nominal)
        if kind == "logNormal" and not nominal > 0:
            self.issues.append(table.issue(
                "a logNormal parameter needs a positive nominalValue (the start of its "
                "population median)", i, "nominalValue"))
        return PopulationRole(pid, "random", kind, sd)

    def prior(self, table, i, row):
        kind = row.get("objectivePriorType", "")
        if _is_missing(kind):
            return None
        if kind not in PRIORS:
            self.issues.append(table.not_one_of(kind, PRIORS, i, "objectivePriorType"))
            return None
        text = row.get("objectivePriorParameters", "")
        values = [_float(v) for v in text.split(";")] if text else []
        if len(values) != 2 or any(v is None for v in values):
            self.issues.append(table.issue(
                f"objectivePriorParameters {text!r}: expected two numbers 'a;b'", i,
                "objectivePriorParameters"))
            return None
        return PRIORS.index(kind), values

    # -- everything else ------------------------------------------------------------------

    def assemble(self, symbolic, parameter_rows, conditions, observables, measurements,
                 integrator, sensitivity, steady_state_tolerances) -> PEtabProblem:
        parameter_ids = [r["id"] for r in parameter_rows]
        theta_index = {pid: j for j, pid in enumerate(parameter_ids)}
        # An estimated parameter without a nominal value starts mid-range on its scale.
        nominal = np.array([r["nominalValue"] if math.isfinite(r["nominalValue"])
                            or not r["estimate"] else _midpoint(r)
                            for r in parameter_rows], float)
        estimated = [r for r in parameter_rows if r["estimate"]]
        model_parameters = list(symbolic.parameters)
        model_index = {n: k for k, n in enumerate(model_parameters)}

        def resolve(text, table, i, column, what):
            """A table cell that is a number or a parameter id -> (source, value)."""
            number = _float(text)
            if number is not None:
                return -1, number
            if text in theta_index:
                return theta_index[text], 0.0
            self.issues.append(table.issue(
                f"{what} {text!r} is neither a number nor a parameter of the parameter "
                f"table{did_you_mean(text, parameter_ids)}", i, column))
            return -1, math.nan

        # Conditions: which model entities each condition sets.
        condition_ids = list(conditions.frame["conditionId"])
        entity_columns = [c for c in conditions.frame.columns
                          if c not in ("conditionId", "conditionName")]
        for column in entity_columns:
            if column not in model_index and column not in symbolic.states:
                hint = (" (it is a derived quantity; set the parameters it depends on)"
                        if column in symbolic.expressions else
                        did_you_mean(column, [*model_parameters, *symbolic.states]))
                self.issues.append(conditions.issue(
                    f"column {column!r} names no parameter, species or compartment of "
                    f"the model{hint}", None, column))
        for i, cid in enumerate(condition_ids):
            if condition_ids.count(cid) > 1 and condition_ids.index(cid) != i:
                self.issues.append(conditions.issue(f"duplicate conditionId {cid!r}", i,
                                                    "conditionId"))
        self.fail_if_issues()

        used_simulation = list(dict.fromkeys(measurements.frame["simulationConditionId"]))
        pre_column = measurements.frame.get("preequilibrationConditionId")
        used_pre = [] if pre_column is None else [
            p for p in dict.fromkeys(pre_column) if not _is_missing(p)]
        # Every condition the problem simulates, pre-conditions included.
        simulated = list(dict.fromkeys([*used_simulation, *used_pre]))
        for i, cid in enumerate(measurements.frame["simulationConditionId"]):
            if cid not in condition_ids:
                self.issues.append(measurements.issue(
                    f"condition {cid!r} is not in the condition table"
                    f"{did_you_mean(cid, condition_ids)}", i, "simulationConditionId"))
        if pre_column is not None:
            for i, cid in enumerate(pre_column):
                if not _is_missing(cid) and cid not in condition_ids:
                    self.issues.append(measurements.issue(
                        f"condition {cid!r} is not in the condition table"
                        f"{did_you_mean(cid, condition_ids)}", i,
                        "preequilibrationConditionId"))
        self.fail_if_issues()

        C, K, S = len(simulated), len(model_parameters), len(symbolic.states)
        p_source = np.full((C, K), -1, int)
        p_value = np.array([[symbolic.parameters[n] if symbolic.parameters[n] is not None
                             else math.nan for n in model_parameters]] * C, float).reshape(C, K)
        for k, name in enumerate(model_parameters):
            if name in theta_index:
                p_source[:, k] = theta_index[name]
        x_source = np.full((C, S), -1, int)
        x_value = np.zeros((C, S))
        x_set = np.zeros((C, S), bool)
        rows_by_id = {cid: i for i, cid in enumerate(condition_ids)}
        for c, cid in enumerate(simulated):
            i = rows_by_id[cid]
            row = conditions.frame.iloc[i]
            for column in entity_columns:
                text = row[column]
                if _is_missing(text):
                    continue
                source, value = resolve(text, conditions, i, column, "value")
                if column in model_index:
                    p_source[c, model_index[column]] = source
                    p_value[c, model_index[column]] = value
                else:
                    s = symbolic.states.index(column)
                    x_source[c, s], x_value[c, s], x_set[c, s] = source, value, True
        for k, name in enumerate(model_parameters):
            unset = (p_source[:, k] < 0) & ~np.isfinite(p_value[:, k])
            if unset.any():
                self.issues.append(Issue(
                    symbolic.source, f"model parameter {name!r} has no value in the model, "
                    "the parameter table or the condition table"))
        divide_by = np.array([
            model_index[info.compartment]
            if (info := symbolic.species.get(s)) and info.initial_is_amount
            and not info.amount_units and info.compartment in model_index else -1
            for s in symbolic.states
        ], int)

        # Observables.
        obs = observables.frame
        observable_ids = list(obs["observableId"])
        local = self.formula_symbols(symbolic, parameter_ids, observable_ids)
        observable_exprs, noise_exprs, obs_slots, noise_slots = [], [], {}, {}
        transformation, distribution = {}, {}
        for i, row in obs.iterrows():
            oid = row["observableId"]
            if observable_ids.index(oid) != i:
                self.issues.append(observables.issue(f"duplicate observableId {oid!r}", i,
                                                     "observableId"))
            trans = row.get("observableTransformation", "") or "lin"
            dist = row.get("noiseDistribution", "") or "normal"
            if trans not in TRANSFORMATIONS:
                self.issues.append(observables.not_one_of(trans, TRANSFORMATIONS, i,
                                                          "observableTransformation"))
                trans = "lin"
            if dist not in DISTRIBUTIONS:
                self.issues.append(observables.not_one_of(dist, DISTRIBUTIONS, i,
                                                          "noiseDistribution"))
                dist = "normal"
            transformation[oid] = TRANSFORMATIONS.index(trans)
            distribution[oid] = DISTRIBUTIONS.index(dist)
            for column, kind, exprs, slots in (
                ("observableFormula", "observableParameter", observable_exprs, obs_slots),
                ("noiseFormula", "noiseParameter", noise_exprs, noise_slots),
            ):
                expression, placeholders = self.formula(
                    row[column], oid, kind, local, observables, i, column,
                    allow_observables=column == "noiseFormula")
                slots[oid] = placeholders
                exprs.append(expression)
        self.fail_if_issues()

        # Measurements.
        frame = measurements.frame
        M = len(frame)
        m_condition = np.zeros(M, int)
        m_observable = np.zeros(M, int)
        m_value = np.zeros(M)
        m_time = np.zeros(M)
        times_by_condition: dict[int, set] = {c: set() for c in range(C)}
        pre_of = np.full(C, -1, int)
        steady_measured = np.zeros(C, bool)
        sim_index = {cid: c for c, cid in enumerate(simulated)}
        # Plain dicts: a pandas Series per row costs 70 µs, 35 s for half a million rows.
        for i, row in zip(frame.index, frame.to_dict("records")):
            oid = row["observableId"]
            if oid not in observable_ids:
                self.issues.append(measurements.issue(
                    f"observable {oid!r} is not in the observable table"
                    f"{did_you_mean(oid, observable_ids)}", i, "observableId"))
                continue
            m_observable[i] = observable_ids.index(oid)
            c = sim_index[row["simulationConditionId"]]
            m_condition[i] = c
            value = _float(row["measurement"])
            if value is None or not math.isfinite(value):
                self.issues.append(measurements.issue(
                    f"measurement {row['measurement']!r} is not a finite number", i,
                    "measurement"))
            elif transformation[oid] > 0 and value <= 0:
                self.issues.append(measurements.issue(
                    f"measurement {value} must be positive for the "
                    f"{TRANSFORMATIONS[transformation[oid]]} transformation of {oid!r}",
                    i, "measurement"))
            m_value[i] = value if value is not None else math.nan
            t = _float(row["time"])
            if t is not None and t == math.inf:
                m_time[i] = t
                steady_measured[c] = True
            elif t is None or t < 0:
                self.issues.append(measurements.issue(
                    f"time {row['time']!r} is not a non-negative number", i, "time"))
            else:
                m_time[i] = t
                times_by_condition[c].add(t)
            pre = "" if pre_column is None else row["preequilibrationConditionId"]
            pre = -1 if _is_missing(pre) else sim_index[pre]
            if pre_of[c] == -1 or pre_of[c] == pre:
                pre_of[c] = pre
            else:
                self.issues.append(measurements.issue(
                    f"condition {row['simulationConditionId']!r} appears with two different "
                    "pre-equilibration conditions", i, "preequilibrationConditionId"))
        individual_rows = self.population(frame, measurements, parameter_rows, obs,
                                          observables, distribution)
        self.fail_if_issues()
        obs_slot_values = self.placeholder_values(
            frame, "observableParameters", observable_ids, obs_slots, m_observable,
            measurements, resolve)
        noise_slot_values = self.placeholder_values(
            frame, "noiseParameters", observable_ids, noise_slots, m_observable,
            measurements, resolve)
        self.fail_if_issues()

        T = max(1, max(len(v) for v in times_by_condition.values()))
        times = np.zeros((C, T))
        for c, values in times_by_condition.items():
            ordered = sorted(values) or [0.0]
            times[c] = ordered + [ordered[-1]] * (T - len(ordered))
        # Time-inf measurements index the steady state, stored after the T times.
        m_time_index = np.array([
            T if m_time[i] == math.inf else
            int(np.searchsorted(times[m_condition[i]], m_time[i])) for i in range(M)
        ], int)

        # Code generation.
        model = build_model(symbolic, values={
            n: (v if v is not None else 0.0) for n, v in symbolic.parameters.items()})
        extra_ids = [pid for pid in parameter_ids if pid not in model_index]
        theta_symbols = [local[pid] if pid in extra_ids else sp.Dummy(pid)
                         for pid in parameter_ids]
        base = [*model_arguments(symbolic, symbolic.parameter_symbols),
                _codegen.vector("theta", theta_symbols)]
        slot_symbols_obs = [s for oid in observable_ids for s in obs_slots[oid]]
        slot_symbols_noise = [s for oid in observable_ids for s in noise_slots[oid]]
        observe_function = _codegen.compile_function(
            "observe_petab", [*base, _codegen.vector("slots", slot_symbols_obs)],
            [symbolic.substitute(e) for e in observable_exprs])
        noise_function = _codegen.compile_function(
            "noise_petab", [*base, _codegen.vector("slots", slot_symbols_noise),
                            _codegen.vector("observables", [local[o] for o in observable_ids])],
            [symbolic.substitute(e) for e in noise_exprs])

        prior_type = np.array([r["prior"][0] if r["prior"] else -1 for r in estimated], int)
        prior_parameters = np.array(
            [r["prior"][1] if r["prior"] else [0.0, 1.0] for r in estimated], float
        ).reshape(len(estimated), 2)
        space = ParameterSpace([
            Parameter(r["id"], float(nominal[theta_index[r["id"]]]), r["lowerBound"],
                      r["upperBound"], r["scale"])
            for r in estimated
        ])
        transformation_codes = np.array([transformation[observable_ids[o]]
                                         for o in m_observable], int)
        distribution_codes = np.array([distribution[observable_ids[o]]
                                       for o in m_observable], int)

        def measurement_set(rows, n_conditions, n_rows) -> MeasurementSet:
            """The measurements in `rows`, padded to `n_rows` rows and (by repeating a
            condition) `n_conditions` conditions."""
            rows = np.asarray(rows, int)
            used = list(dict.fromkeys(m_condition[rows]))
            local = {c: j for j, c in enumerate(used)}
            pad = n_rows - len(rows)
            padded = lambda a, fill: np.concatenate([a, np.full((pad, *a.shape[1:]), fill,
                                                                dtype=a.dtype)])
            slots = lambda m: _Mapping(
                np.asarray(padded(np.asarray(m.source)[rows], -1), dtype=np.int32),
                np.asarray(padded(np.asarray(m.value)[rows], _UNUSED_SLOT)))
            return MeasurementSet(
                conditions=as_int(used + [used[0]] * (n_conditions - len(used))),
                condition=as_int(padded(np.array([local[c] for c in m_condition[rows]],
                                                 int), 0)),
                time=as_int(padded(m_time_index[rows], 0)),
                observable=as_int(padded(m_observable[rows], 0)),
                value=np.asarray(padded(m_value[rows], 1.0), dtype=float),
                transformation=as_int(padded(transformation_codes[rows], 0)),
                distribution=as_int(padded(distribution_codes[rows], 0)),
                observable_slots=slots(obs_slot_values),
                noise_slots=slots(noise_slot_values),
                mask=padded(np.ones(len(rows), bool), False),
                row=as_int(padded(rows, -1)),
            )

        # Built in numpy and moved to JAX once: stacking thousands of individuals'
        # device arrays with jnp.stack compiles a concatenation of thousands of operands.
        as_int = lambda a: np.asarray(a, dtype=np.int32)
        distinct_pre = [int(q) for q in dict.fromkeys(pre_of) if q >= 0]
        everything = jax.tree.map(jnp.asarray,
                                  measurement_set(np.arange(M), len(used_simulation), M))
        individual_ids, per_individual = [], None
        if individual_rows:
            individual_ids = list(individual_rows)
            groups = [individual_rows[i] for i in individual_ids]
            n_rows = max(len(g) for g in groups)
            n_conditions = max(len(set(m_condition[g])) for g in groups)
            sets = [measurement_set(g, n_conditions, n_rows) for g in groups]
            per_individual = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *sets)
        roles = ([r["population"] for r in estimated] if individual_rows else [])
        return PEtabProblem(
            model=model,
            parameter_ids=tuple(parameter_ids),
            estimated_ids=tuple(r["id"] for r in estimated),
            parameter_space=space,
            condition_ids=tuple(simulated),
            observable_ids=tuple(observable_ids),
            source=str(self.path),
            nominal=jnp.asarray(np.where(np.isfinite(nominal), nominal, 1.0)),
            estimated_index=as_int([theta_index[r["id"]] for r in estimated]),
            estimated_scale=as_int([TRANSFORMATIONS.index(r["scale"]) for r in estimated]),
            condition_parameters=_Mapping(as_int(p_source), jnp.asarray(p_value)),
            condition_initial=_Mapping(as_int(x_source), jnp.asarray(x_value)),
            condition_initial_set=jnp.asarray(x_set),
            initial_divide_by=as_int(divide_by),
            preequilibration_conditions=as_int(distinct_pre or [0]),
            preequilibration_slot=as_int([distinct_pre.index(q) if q >= 0 else -1
                                          for q in pre_of]),
            times=jnp.asarray(times),
            steady_state_measured=(jnp.asarray(steady_measured) if steady_measured.any()
                                   else None),
            measurements=everything,
            individual_ids=tuple(individual_ids),
            individual_measurements=per_individual,
            population_roles=tuple(roles),
            prior_type=as_int(prior_type),
            prior_parameters=jnp.asarray(prior_parameters),
            model_parameter_names=tuple(model_parameters),
            observe_function=observe_function,
            noise_function=noise_function,
            has_preequilibration=bool((pre_of >= 0).any()),
            integrator=integrator,
            sensitivity=sensitivity,
            steady_state_tolerances=tuple(steady_state_tolerances),
        )

    def population(self, frame, measurements, parameter_rows, obs, observables,
                   distribution) -> dict[str, list[int]]:
        """The population extension: measurement rows by `individualId` (empty without
        the extension), after checking that the tables use it consistently."""
        column = frame.get("individualId")
        distributions = "populationDistribution" in self.parameters.frame.columns
        if column is None:
            if distributions:
                self.issues.append(measurements.issue(
                    "the parameter table has a populationDistribution column, so each "
                    "measurement needs an individualId column naming its individual"))
            return {}
        if not distributions:
            self.issues.append(self.parameters.issue(
                "the measurement table names individuals (individualId), so the parameter "
                "table needs a populationDistribution column (normal, logNormal, "
                "individual or fixed per estimated parameter)"))
            return {}
        rows: dict[str, list[int]] = {}
        for i, individual in enumerate(column):
            if _is_missing(individual):
                self.issues.append(measurements.issue(
                    "individualId is empty; every measurement belongs to an individual", i,
                    "individualId"))
            else:
                rows.setdefault(individual, []).append(i)
        estimated = [r for r in parameter_rows if r["estimate"]]
        if not any(r["population"] and r["population"].role in ("random", "individual")
                   for r in estimated):
            self.issues.append(self.parameters.issue(
                "no estimated parameter is normal, logNormal or individual: the population "
                "extension needs at least one", None, "populationDistribution"))
        for r in estimated:
            if r["prior"] is not None:
                self.issues.append(self.parameters.issue(
                    "objective priors are not supported with the population extension (the "
                    "population distribution is the prior of individual parameters)",
                    r["row"], "objectivePriorType"))
        used = set(frame["observableId"])
        for i, oid in enumerate(obs["observableId"]):
            if oid in used and distribution[oid] == DISTRIBUTIONS.index("laplace"):
                self.issues.append(observables.issue(
                    "Laplace noise is not supported with the population extension (its "
                    "inner fits are least squares); use normal noise", i,
                    "noiseDistribution"))
        return rows

    def formula_symbols(self, symbolic, parameter_ids, observable_ids):
        local: dict[str, Any] = dict(symbolic.symbols)
        for pid in [*parameter_ids, *observable_ids]:
            local.setdefault(pid, sp.Symbol(pid, real=True))
        local.update(time=TIME, t=TIME)
        return local

    def formula(self, text, oid, kind, local, table, i, column, allow_observables):
        if _is_missing(text):
            self.issues.append(table.issue(f"{column} is empty", i, column))
            return sp.Integer(0), []
        try:
            expression = _codegen.parse_formula(text, local)
        except Exception as error:
            self.issues.append(table.issue(f"cannot parse {text!r}: {error}", i, column))
            return sp.Integer(0), []
        placeholders = {}
        for s in expression.free_symbols:
            name = str(s)
            if name.startswith(kind) and name.endswith(f"_{oid}"):
                number = name[len(kind):-len(oid) - 1]
                if number.isdigit() and int(number) >= 1:
                    placeholders[int(number)] = s
        count = max(placeholders, default=0)
        missing = [k for k in range(1, count + 1) if k not in placeholders]
        if missing:
            self.issues.append(table.issue(
                f"placeholders {kind}{missing[0]}_{oid} ... are missing while "
                f"{kind}{count}_{oid} is used", i, column))
        slots = [sp.Symbol(f"{kind}{k}_{oid}", real=True) for k in range(1, count + 1)]
        expression = expression.xreplace({placeholders[k]: slots[k - 1]
                                          for k in placeholders})
        known = set(local.values()) | set(slots)
        unknown = sorted(str(s) for s in expression.free_symbols - known)
        if not allow_observables:
            observable_ids = set(table.frame["observableId"])
            unknown += [str(s) for s in expression.free_symbols if str(s) in observable_ids]
        if unknown:
            self.issues.append(table.issue(
                f"unknown identifier(s) {', '.join(unknown)} in {text!r}", i, column))
        return expression, slots

    def placeholder_values(self, frame, column, observable_ids, slots, m_observable,
                           table, resolve) -> _Mapping:
        offsets, J = {}, 0
        for oid in observable_ids:
            offsets[oid] = J
            J += len(slots[oid])
        M = len(frame)
        source = np.full((M, J), -1, int)
        value = np.full((M, J), _UNUSED_SLOT)
        texts = frame[column] if column in frame.columns else [""] * M
        for i, text in enumerate(texts):
            oid = observable_ids[m_observable[i]]
            expected = len(slots[oid])
            entries = [] if _is_missing(text) else text.split(";")
            if len(entries) != expected:
                self.issues.append(table.issue(
                    f"{len(entries)} value(s) given, observable {oid!r} has {expected} "
                    f"{column[:-1]} placeholder(s)", i, column))
                continue
            for k, entry in enumerate(entries):
                s, v = resolve(entry.strip(), table, i, column, "placeholder value")
                source[i, offsets[oid] + k], value[i, offsets[oid] + k] = s, v
        return _Mapping(jnp.asarray(source, dtype=jnp.int32), jnp.asarray(value))


def _midpoint(row):
    lo, hi = row["lowerBound"], row["upperBound"]
    if row["scale"] == "lin":
        return 0.5 * (lo + hi)
    return math.sqrt(lo * hi)
