r"""Stopping a Gauss–Newton-type fit once it is stationary enough to differentiate.

A trust-region solver (Levenberg–Marquardt, dogleg) started at its own optimum rejects
nearly every step, because the loss only changes by round-off there; its Cauchy test on
accepted steps then never fires and the fit runs to `max_steps`. Warm-started inner fits
of a bilevel problem start at or near their optimum, so this wastes most of their time.
`NewtonStepTermination` adds the test the implicit hypergradient needs instead: stop
once the Gauss–Newton step from the last accepted point,

$$ \delta = \arg\min_\delta \lVert J\delta - r\rVert, \qquad
   \lVert\delta\rVert \le \text{tol}\cdot\max(1, \lVert y\rVert), $$

is short (a distance in $y$, so it does not depend on how the loss is scaled). An ODE
solve's error makes the loss piecewise smooth at the level of its tolerance, which may
keep $\delta$ above a tight `tol`; the solver then rejects step after step, and a looser
`stalled_tol` applies once `stalled_steps` steps in a row were rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float


class NewtonStepTermination(optx.AbstractLeastSquaresSolver):
    """Wraps a Gauss–Newton-type optimistix solver (`LevenbergMarquardt`, `Dogleg`,
    `GaussNewton`) and also stops it once its Gauss–Newton step is shorter than
    `tol * max(1, ||y||)`, or than `stalled_tol * max(1, ||y||)` after `stalled_steps`
    rejected steps in a row; the solver's own tolerances still apply."""

    solver: optx.AbstractGaussNewton
    tol: float = 1e-6
    stalled_tol: float | None = None
    stalled_steps: int = 2

    def __check_init__(self):
        if not isinstance(self.solver, optx.AbstractGaussNewton):
            raise TypeError(
                "NewtonStepTermination wraps a Gauss-Newton-type optimistix solver "
                f"(LevenbergMarquardt, Dogleg, GaussNewton), got {type(self.solver).__name__}"
            )

    @property
    def rtol(self) -> float:
        return self.solver.rtol

    @property
    def atol(self) -> float:
        return self.solver.atol

    @property
    def norm(self) -> Callable:
        return self.solver.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self.solver.step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        done, result = self.solver.terminate(fn, y, args, options, state, tags)
        # `state.f_info` holds the residuals and Jacobian at the last accepted point,
        # which is `y`; before the first step it is a placeholder of zeros.
        step_length = jnp.linalg.norm(_minimum_norm_step(
            state.f_info.jac.as_matrix(), ravel_pytree(state.f_info.residual)[0]))
        y_size = jnp.linalg.norm(ravel_pytree(y)[0])
        scale = jnp.maximum(1.0, y_size)
        short = step_length <= self.tol * scale
        if self.stalled_tol is not None:
            stalled = state.num_steps_since_acceptance >= self.stalled_steps
            short = short | (stalled & (step_length <= self.stalled_tol * scale))
        return done | (~state.first_step & short), result

    def postprocess(self, fn, y, aux, args, options, state, tags, result) -> tuple[Any, Any, dict]:
        return self.solver.postprocess(fn, y, aux, args, options, state, tags, result)


def _minimum_norm_step(jacobian: Float[Array, "m n"], residual: Float[Array, " m"]
                       ) -> Float[Array, " n"]:
    r"""The least-squares step $J^+ r$ from the eigendecomposition of the small Gram
    matrix $J^\top J = V \Lambda V^\top$: $V \Lambda^+ V^\top J^\top r$, dropping
    eigenvalues below $n\,\epsilon \max\Lambda$ (directions the data do not
    determine). A batched SVD of $J$ would give the same step but, on CPU, jaxlib
    splits a large batch of SVDs over the thread pool that the per-device loops of a
    split population already occupy, and waits for the pieces forever; the
    $n\times n$ eigendecompositions stay far below its threshold."""
    gram = jacobian.T @ jacobian
    values, vectors = jnp.linalg.eigh(gram)
    keep = values > gram.shape[0] * jnp.finfo(gram.dtype).eps * jnp.max(values)
    coefficients = vectors.T @ (jacobian.T @ residual)
    return vectors @ jnp.where(keep, coefficients / jnp.where(keep, values, 1.0), 0.0)


def with_newton_step_termination(solver, tol: float, stalled_tol: float | None = None):
    """`solver` stopped by the Newton-step test where it is Gauss–Newton-type (a solver
    already so wrapped keeps its own tolerances); any other solver unchanged."""
    if isinstance(solver, optx.AbstractGaussNewton):
        return NewtonStepTermination(solver, tol, stalled_tol)
    return solver

