r"""Multistart maximum-likelihood fits of PEtab problems, all starts batched.

Each start minimises the problem's objective over the estimated parameters on their
PEtab scales, folded into the bounds by reflection (`reflect`). The default
optimiser is BFGS on the objective; a least-squares solver (e.g.
`optimistix.LevenbergMarquardt`) works on the residuals when every observable has
normal noise and no priors are set. On Boehm_JProteomeRes2014 BFGS reached the
optimum from random starts where Levenberg–Marquardt crawled to `max_steps` along the
noise parameters' valleys (benchmarks/RESULTS.md). Starts are drawn uniformly on the
parameters' scales inside their bounds and batched with `vmap` into one compiled
function (chunked on CPU, see `_batching`).
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pandas as pd
from jaxtyping import Array, Float, Int

from ._batching import (
    default_chunk_size,
    fit_kernel_flops,
    lanes_per_map,
    map_individuals,
)
from ._compilation import compilation
from ._fit import AbstractStarts, SobolStarts, solve_optimum
from ._petab import PEtabProblem
from ._results import RESULTS, result_name
from ._sensitivity import for_optimiser


class PEtabFitResult(eqx.Module):
    """Outcome of a multistart fit, starts sorted by objective (best first).

    `x` holds the estimated parameters on their PEtab scales (`estimated_ids` order),
    `objective` the negative log-likelihood plus negative log-prior at each end point,
    `result` a `RESULTS` code per start, `wall_seconds` the whole batched run
    (compilation included, `compile_seconds` of it: zero when a problem of the same
    shapes was fitted before in this process), `sensitivity` the strategy the
    optimiser's derivatives were taken by.
    """

    estimated_ids: tuple[str, ...] = eqx.field(static=True)
    x: Float[Array, "S E"]
    objective: Float[Array, " S"]
    steps: Int[Array, " S"]
    result: Int[Array, " S"]
    start_index: Int[Array, " S"]
    wall_seconds: float = eqx.field(static=True)
    compile_seconds: float = eqx.field(static=True)
    sensitivity: str = eqx.field(static=True, default="")

    @property
    def best_x(self) -> Float[Array, " E"]:
        return self.x[0]

    @property
    def best_objective(self) -> float:
        return float(self.objective[0])

    def n_within(self, tolerance: float, reference: float | None = None) -> int:
        """How many starts ended within `tolerance` of `reference` (default: the best)."""
        reference = self.best_objective if reference is None else reference
        return int(np.sum(np.asarray(self.objective) <= reference + tolerance))

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"start": np.asarray(self.start_index),
                              "objective": np.asarray(self.objective)})
        x = np.asarray(self.x)
        for j, name in enumerate(self.estimated_ids):
            frame[name] = x[:, j]
        frame["steps"] = np.asarray(self.steps)
        frame["status"] = [result_name(c) for c in np.asarray(self.result)]
        return frame


def reflect(u, lower, upper):
    r"""Fold $u \in \mathbb{R}$ into $[\ell, h]$ by reflection at the bounds (a
    triangle wave of slope ±1): the optimiser moves freely, a parameter can sit on a
    bound and leave it again, and derivatives keep their size (a logistic map would
    flatten them near a bound, where optima of wide log-scale ranges often lie)."""
    width = upper - lower
    phase = jnp.mod(u - lower, 2 * width)
    return lower + jnp.where(phase <= width, phase, 2 * width - phase)


def _least_squares_applies(problem: PEtabProblem) -> bool:
    return bool(np.all(np.asarray(problem.measurements.distribution) == 0)
                and np.all(np.asarray(problem.prior_type) < 0))


@eqx.filter_jit
def _fit_starts(problem: PEtabProblem, solver, z0s, max_steps: int, chunk_size):
    lower, upper = (jnp.asarray(b) for b in problem.bounds_x())

    def x_of(u):
        return reflect(u, lower, upper)

    def one_start(z0):
        z, solver_result, steps = solve_optimum(
            solver, z0, None, sensitivity=problem.sensitivity, max_steps=max_steps,
            residuals=lambda z, _: problem.residuals(x_of(z)),
            loss=lambda z, _: problem.objective(x_of(z)),
        )
        x = x_of(z)
        value, ode_result = problem.evaluate(x)
        value = value + problem.negative_log_prior(x)
        success = RESULTS.successful._value
        result = jnp.where(
            ode_result._value != success, ode_result._value,
            jnp.where(solver_result == success, success, RESULTS.fit_not_converged._value),
        )
        return x, value, steps, result

    return map_individuals(one_start, (z0s,), (0,), chunk_size)


def fit_petab(
    problem: PEtabProblem,
    *,
    starts: AbstractStarts = SobolStarts(16),
    solver: optx.AbstractLeastSquaresSolver | optx.AbstractMinimiser | None = None,
    max_steps: int = 500,
    seed: int = 0,
) -> PEtabFitResult:
    """Fit `problem` from `starts` (default 16 Sobol points inside the bounds).

    **Arguments:** `solver` (default `optimistix.BFGS(rtol=1e-10, atol=1e-10)`);
    `max_steps` per start; `seed` of the points.
    Never raises on failed solves or fits: see `PEtabFitResult.result`.
    """
    space = problem.parameter_space
    if not space.estimated:
        raise ValueError(f"{problem.source}: no parameter is estimated")
    if solver is None:
        solver = optx.BFGS(rtol=1e-10, atol=1e-10)
    if isinstance(solver, optx.AbstractLeastSquaresSolver) and not _least_squares_applies(
            problem):
        raise ValueError(
            f"{problem.source}: a least-squares solver needs normal noise everywhere and "
            "no priors; use a minimiser such as optimistix.BFGS"
        )
    lower, upper = problem.bounds_x()
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise ValueError(f"{problem.source}: multistart fits need finite bounds")
    z0s = jnp.asarray(starts.points(space, seed))
    n_starts, n_p = z0s.shape
    minimiser = isinstance(solver, optx.AbstractMinimiser)
    chunk_size = default_chunk_size(
        n_starts,
        *fit_kernel_flops(len(problem.model.states), 2 * problem.n_measurements, n_p,
                          problem.integrator.tangent_solves(),
                          least_squares=not minimiser),
        lanes_per_individual=len(problem.condition_ids),
    )
    problem = for_optimiser(problem, n_p,
                            lanes=lanes_per_map(n_starts, chunk_size,
                                                len(problem.condition_ids)),
                            gradients=minimiser)
    started = time.perf_counter()
    # One compiled function per problem shape, reused by later calls.
    with compilation() as compiling:
        x, value, steps, result = jax.block_until_ready(
            _fit_starts(problem, solver, z0s, max_steps, chunk_size))
    wall = time.perf_counter() - started
    compile_seconds = compiling.seconds
    value = jnp.where(jnp.isnan(value), jnp.inf, value)
    order = jnp.argsort(value)
    return PEtabFitResult(
        estimated_ids=problem.estimated_ids,
        x=x[order], objective=value[order], steps=steps[order], result=result[order],
        start_index=order, wall_seconds=wall, compile_seconds=compile_seconds,
        sensitivity=type(problem.sensitivity).__name__,
    )
