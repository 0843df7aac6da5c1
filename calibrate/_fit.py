r"""Individual fits: maximum-likelihood parameters of each individual, batched.

For each individual, minimise $L(p(z))$ over the unconstrained vector $z$ with an
optimistix solver: a least-squares solver (Levenberg–Marquardt by default) on the
residuals, or a minimiser (e.g. BFGS) on $L$ itself. Multistart draws start points
inside the bounds (Sobol or Latin hypercube on each parameter's scale) and keeps the
best. Individuals and starts are batched with `vmap` into one compiled function.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pandas as pd
from jaxtyping import Array, Bool, Float, Int
from scipy.stats import qmc

from ._batching import (
    default_chunk_size,
    fit_kernel_flops,
    lanes_per_map,
    map_individuals,
)
from ._data import Dataset, Measurements
from ._model import AbstractODEModel
from ._objective import Objective
from ._parameters import ParameterSpace
from ._results import RESULTS, result_message, result_name
from ._sensitivity import (
    AbstractSensitivity,
    Automatic,
    for_optimiser,
    with_materialised_jacobian,
)
from ._simulate import Integrator


# Start points for one-sided or unbounded parameters are drawn this far (on the
# parameter's scale) around the default.
_UNBOUNDED_HALF_WIDTH = 3.0


class AbstractStarts(eqx.Module):
    """Where a multistart fit starts, as scaled-parameter points inside the bounds."""

    n_starts: eqx.AbstractVar[int]

    @abc.abstractmethod
    def unit_points(self, n: int, dim: int, seed: int) -> np.ndarray:
        """`n` points in the unit cube [0, 1]^dim."""

    def points(self, space: ParameterSpace, seed: int) -> np.ndarray:
        lo, hi = space.scaled_bounds()
        defaults = np.array(
            [float(space[n].to_scaled(space[n].default)) for n in space.estimated]
        )
        lo = np.where(np.isfinite(lo), lo, defaults - _UNBOUNDED_HALF_WIDTH)
        hi = np.where(np.isfinite(hi), hi, defaults + _UNBOUNDED_HALF_WIDTH)
        unit = self.unit_points(self.n_starts, len(space.estimated), seed)
        # Keep away from the bounds themselves, where the unconstrained map is singular.
        unit = 1e-3 + (1 - 2e-3) * unit
        return lo + (hi - lo) * unit


class SobolStarts(AbstractStarts):
    """Scrambled Sobol points (low discrepancy)."""

    n_starts: int = eqx.field(static=True, default=16)

    def unit_points(self, n, dim, seed):
        return qmc.Sobol(dim, scramble=True, seed=seed).random(n)


class LatinHypercubeStarts(AbstractStarts):
    """Latin-hypercube points: each parameter's range split into `n_starts` strata."""

    n_starts: int = eqx.field(static=True, default=16)

    def unit_points(self, n, dim, seed):
        return qmc.LatinHypercube(dim, seed=seed).random(n)


class FitResult(eqx.Module):
    """Outcome of individual fits (leading axis: individuals).

    **Attributes:**

    - `individuals`, `estimated`: names along the two axes of `estimates`.
    - `estimates`: natural-scale values of the estimated parameters, shape (N, n_p).
    - `parameters`: all parameters (fixed included) by name, each shape (N,).
    - `z`: the optimum in unconstrained coordinates.
    - `loss`: negative log-likelihood at the optimum (`inf` if the solve failed).
    - `grad_norm`: $\\lVert\\nabla_z L\\rVert_2$ at the optimum (stationarity).
    - `standard_errors`: on each parameter's scale, from the Gauss–Newton Fisher
      information $(J^\\top J)^{-1}$ of the residuals (inf where not identifiable).
    - `steps`: optimiser steps of the best start; `result`: a `RESULTS` code.
    - `start_losses`: final loss of every start, shape (N, n_starts).
    - `sensitivity`: the strategy the optimiser's derivatives were taken by.
    """

    individuals: tuple[str, ...] = eqx.field(static=True)
    estimated: tuple[str, ...] = eqx.field(static=True)
    estimates: Float[Array, "N n_p"]
    parameters: dict[str, Float[Array, " N"]]
    z: Float[Array, "N n_p"]
    loss: Float[Array, " N"]
    grad_norm: Float[Array, " N"]
    standard_errors: Float[Array, "N n_p"]
    steps: Int[Array, " N"]
    result: Int[Array, " N"]
    start_losses: Float[Array, "N n_starts"]
    sensitivity: str = eqx.field(static=True, default="")

    @property
    def converged(self) -> Bool[Array, " N"]:
        return self.result == RESULTS.successful._value

    def __getitem__(self, name: str) -> Float[Array, " N"]:
        return self.parameters[name]

    def to_frame(self) -> pd.DataFrame:
        """One row per individual: estimates, standard errors and diagnostics."""
        frame = pd.DataFrame({"individual": list(self.individuals)})
        est = np.asarray(self.estimates)
        se = np.asarray(self.standard_errors)
        for j, name in enumerate(self.estimated):
            frame[name] = est[:, j]
        for j, name in enumerate(self.estimated):
            frame[f"se_{name}"] = se[:, j]
        frame["loss"] = np.asarray(self.loss)
        frame["grad_norm"] = np.asarray(self.grad_norm)
        frame["steps"] = np.asarray(self.steps)
        frame["status"] = [result_name(c) for c in np.asarray(self.result)]
        return frame

    def messages(self) -> dict[str, str]:
        """Explanations for individuals whose fit did not succeed."""
        return {
            ind: result_message(code)
            for ind, code in zip(self.individuals, np.asarray(self.result))
            if code != RESULTS.successful._value
        }


def solve_optimum(solver, x0, args, *, sensitivity: AbstractSensitivity, max_steps: int,
                  residuals=None, loss=None, what: str = "solver"):
    """Minimise with optimistix, never raising: a least-squares `solver` on
    `residuals(x, args)`, or a minimiser on the scalar `loss(x, args)` with its gradient
    taken in the sensitivity's mode. Returns `(x*, result code, steps)`."""
    if isinstance(solver, optx.AbstractLeastSquaresSolver):
        if residuals is None:
            raise ValueError(f"a least-squares {what} needs residuals")
        if sensitivity.mode == "forward":
            residuals = with_materialised_jacobian(residuals)
        solution = optx.least_squares(
            residuals, solver, x0, args=args, max_steps=max_steps, throw=False,
            options={"jac": "fwd" if sensitivity.mode == "forward" else "bwd"},
        )
    elif isinstance(solver, optx.AbstractMinimiser):
        solution = optx.minimise(
            sensitivity.reverse_differentiable(loss), solver, x0, args=args,
            max_steps=max_steps, throw=False,
        )
    else:
        raise TypeError(
            f"{what} must be an optimistix least-squares solver or minimiser, got "
            f"{type(solver).__name__}"
        )
    return solution.value, solution.result._value, solution.stats["num_steps"]


def _optimised(objective: Objective, solver, lanes: int) -> Objective:
    """`objective` with the sensitivity `solver`'s derivatives are taken by, in fits of
    which `lanes` run together in one `vmap`."""
    return for_optimiser(objective, objective.n_parameters,
                         gradients=isinstance(solver, optx.AbstractMinimiser), lanes=lanes)


def _solve_one(objective: Objective, solver, z0, data: Measurements, inputs, max_steps):
    return solve_optimum(
        solver, z0, (data, inputs), sensitivity=objective.sensitivity, max_steps=max_steps,
        residuals=lambda z, args: objective.residuals(z, *args)[0],
        loss=lambda z, args: objective.negative_log_likelihood(z, *args)[0],
    )


def _diagnose(objective: Objective, z, data, inputs, solver_result):
    """Loss, stationarity, standard errors and result code at an optimum `z`.

    All from one Jacobian of the residuals: $L = \\tfrac12\\lVert r\\rVert^2 +$ const
    gives $\\nabla_z L = J_z^\\top r$, and the Gauss–Newton Fisher information on the
    parameters' own scales $s$ is $J_s^\\top J_s$ with $J_s = J_z\\,\\mathrm{diag}(dz/ds)$.
    """
    def residuals_with_aux(z):
        r, nll, ode_result = objective.evaluate(z, data, inputs)
        return r, (r, nll, ode_result)

    jac_z, (r, loss, ode_result) = objective.sensitivity.jacobian(
        residuals_with_aux, z, has_aux=True
    )
    grad_norm = jnp.where(jnp.isfinite(loss), jnp.linalg.norm(jac_z.T @ r), jnp.inf)
    success = RESULTS.successful._value
    result = jnp.where(
        ode_result._value != success,
        ode_result._value,
        jnp.where(solver_result == success, success, RESULTS.fit_not_converged._value),
    )
    space = objective.space
    params = objective.params(z)
    dz_ds = jnp.stack(
        [
            jax.grad(lambda s, p=space[n]: p.to_unconstrained(p.from_scaled(s)))(
                space[n].to_scaled(params[n])
            )
            for n in space.estimated
        ]
    )
    jac_s = jac_z * dz_ds[None, :]
    fisher = jac_s.T @ jac_s
    eigval, eigvec = jnp.linalg.eigh(fisher)
    tiny = 1e-12 * jnp.max(jnp.abs(eigval))
    inv = (eigvec / jnp.where(eigval > tiny, eigval, jnp.inf)) @ eigvec.T
    # A direction with no information gives an infinite standard error.
    unidentified = jnp.any((eigval[None, :] <= tiny) & (jnp.abs(eigvec) > 1e-8), axis=1)
    se = jnp.where(unidentified, jnp.inf, jnp.sqrt(jnp.clip(jnp.diag(inv), 0.0)))
    return loss, grad_norm, se, result


@eqx.filter_jit
def _fit_batch(objective: Objective, optimised: Objective, solver, z0s, data: Measurements,
               inputs, max_steps, chunk_size=None):
    """vmap over individuals (axis 0 of data, inputs, z0s; `chunk_size` at a time if
    given) and starts (axis 1 of z0s). The optimiser differentiates `optimised`, the
    diagnostics `objective`."""

    def one_individual(z0s, data, inputs):
        def one_start(z0):
            z, solver_result, steps = _solve_one(optimised, solver, z0, data, inputs,
                                                 max_steps)
            loss, _ = objective.negative_log_likelihood(z, data, inputs)
            return z, solver_result, steps, loss

        zs, solver_results, steps, losses = jax.vmap(one_start)(z0s)
        best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
        z = zs[best]
        loss, grad_norm, se, result = _diagnose(
            objective, z, data, inputs, solver_results[best]
        )
        return z, loss, grad_norm, se, steps[best], result, losses

    in_axes = (0, 0, None if inputs is None else 0)
    return map_individuals(one_individual, (z0s, data, inputs), in_axes, chunk_size)


def fit(
    model: AbstractODEModel,
    data: Dataset,
    *,
    estimate: Sequence[str] | None = None,
    fixed: Mapping[str, float] | None = None,
    start: Mapping[str, float] | None = None,
    starts: AbstractStarts | None = None,
    solver: optx.AbstractLeastSquaresSolver | optx.AbstractMinimiser = (
        optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8)
    ),
    integrator: Integrator = Integrator(),
    sensitivity: AbstractSensitivity = Automatic(),
    max_steps: int = 256,
    seed: int = 0,
) -> FitResult:
    """Fit each individual's parameters to its measurements (maximum likelihood).

    **Arguments:**

    - `model`, `data`: the model and a `Dataset` of one or more individuals.
    - `estimate`: names of the parameters to fit (default: those marked `estimate`).
    - `fixed`: values for parameters that are not estimated (default: defaults).
    - `start`: start point (natural scale) of the first start; default: defaults.
    - `starts`: `SobolStarts(n)` / `LatinHypercubeStarts(n)` adds n start points.
    - `solver`: optimistix least-squares solver (on residuals) or minimiser (on $L$).
    - `integrator`, `sensitivity`: ODE solver settings and derivative method. The
      default, `Automatic()`, takes least-squares Jacobians and standard errors in
      forward mode, and a minimiser's gradients by the discrete adjoint when there
      are many parameters.
    - `max_steps`: optimiser step limit per start; `seed`: for the start points.

    **Returns:** a `FitResult` with one row per individual. Never raises on a failed
    solve or fit: see `FitResult.result` and `FitResult.messages()`.
    """
    objective = Objective(
        model, estimate=estimate, fixed=fixed, integrator=integrator, sensitivity=sensitivity
    )
    space = objective.space
    if not space.estimated:
        raise ValueError("nothing to estimate: `estimate` is empty")
    first = model.parameter_space.complete({**(fixed or {}), **(start or {})})
    z_first = np.asarray(space.to_vector(first))[None, :]
    if starts is not None:
        scaled = starts.points(space, seed)
        z_more = np.stack(
            [np.asarray(space.to_vector(space.from_scaled_vector(s))) for s in scaled]
        )
        z0 = np.concatenate([z_first, z_more])
    else:
        z0 = z_first
    n = len(data)
    z0s = jnp.broadcast_to(jnp.asarray(z0), (n, *z0.shape))
    inputs = data.batched_inputs(model)
    rows = 2 * int(np.prod(data.measurements.values.shape[1:]))
    chunk_size = default_chunk_size(
        n, *fit_kernel_flops(len(model.states), rows, len(space.estimated),
                             objective.integrator.tangent_solves(),
                             least_squares=not isinstance(solver, optx.AbstractMinimiser)),
        lanes_per_individual=z0.shape[0])
    optimised = _optimised(objective, solver,
                           lanes=lanes_per_map(n, chunk_size, z0.shape[0]))
    z, loss, grad_norm, se, steps, result, losses = _fit_batch(
        objective, optimised, solver, z0s, data.measurements, inputs, max_steps, chunk_size
    )
    params = jax.vmap(objective.params)(z)
    return FitResult(
        individuals=data.individuals,
        estimated=space.estimated,
        estimates=jnp.stack([params[n] for n in space.estimated], axis=-1),
        parameters=params,
        z=z,
        loss=loss,
        grad_norm=grad_norm,
        standard_errors=se,
        steps=steps,
        result=result,
        start_losses=losses,
        sensitivity=type(optimised.sensitivity).__name__,
    )
