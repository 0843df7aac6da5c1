r"""Hypergradients: derivatives of an outer objective through an inner optimum.

A bilevel problem has inner parameters $p$ and outer (hyper)parameters $\theta$:

$$ p^*(\theta) = \arg\min_p L_{\text{in}}(p, \theta), \qquad
   F(\theta) = L_{\text{out}}(p^*(\theta), \theta). $$

Three strategies give $dF/d\theta$:

- `Implicit`: the implicit function theorem on $\nabla_p L_{\text{in}}(p^*, \theta) = 0$,
  $$ \frac{dF}{d\theta} = \partial_\theta L_{\text{out}} - (\nabla^2_{p\theta} L_{\text{in}})^\top z,
     \qquad H z = \nabla_p L_{\text{out}}, \quad H = \nabla^2_{pp} L_{\text{in}}(p^*, \theta), $$
  with $H$ and the mixed term from a curvature strategy (`ExactHessian`,
  `ForwardHessian`, `GaussNewton`) and $H z = b$ solved by `DirectSolve`,
  `ConjugateGradient` or `NeumannSeries`.
- `Unrolled`: reverse- or forward-mode differentiation through $K$ steps of an inner
  optimiser (`GradientDescent`, `Momentum`, `Adam`), which also differentiates with
  respect to the optimiser's own hyperparameters.
- `FiniteDifferences`: central differences of $F$ with the inner problem re-solved.

The implicit formula holds only at a stationary, smooth, non-degenerate inner optimum.
Each implicit hypergradient therefore reports the inner stationarity
$\lVert\nabla_p L_{\text{in}}\rVert$, the linear-solve residual, for Neumann the spectral
radius of $I - \alpha H$ (power iteration), and whether a smoothed non-smooth penalty
sits at a kink; `hypergradient` warns or raises (user's choice) when one fails.

Second derivatives through an ODE solve are only available for some sensitivity
methods (`AbstractSensitivity.second_order`); each strategy states what it needs and
`check_supported` refuses an unsupported combination before anything is traced.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._fit import solve_optimum
from ._termination import with_newton_step_termination
from ._results import RESULTS, result_message, result_name
from ._sensitivity import (
    FORWARD_OVER_FORWARD,
    FORWARD_OVER_REVERSE,
    REVERSE_OVER_REVERSE,
    AbstractSensitivity,
    DirectDifferentiation,
    nested_mode,
)


Theta = PyTree[Float[Array, "..."]]
InnerLoss = Callable[[Float[Array, " n"], Theta, Any], Float[Array, ""]]
InnerResiduals = Callable[[Float[Array, " n"], Theta, Any], Float[Array, " m"]]


class HypergradientError(RuntimeError):
    """An implicit hypergradient whose assumptions fail (raised with `throw=True`)."""


class HypergradientWarning(UserWarning):
    """An implicit hypergradient whose assumptions fail (default: warned)."""


class BilevelProblem(eqx.Module):
    r"""Inner and outer objectives of a bilevel problem.

    **Arguments:**

    - `outer_loss`: $L_{\text{out}}(p, \theta, \text{args})$, a scalar.
    - `inner_loss`: $L_{\text{in}}(p, \theta, \text{args})$, a scalar; or
    - `inner_residuals`: $r(p, \theta, \text{args})$ with $L_{\text{in}} = \tfrac12\lVert r\rVert^2$
      (needed by `GaussNewton`; solved by a least-squares solver).
    - `inner_solver`: optimistix minimiser (for `inner_loss`) or least-squares solver.
    - `inner_max_steps`: step limit of the inner solve.
    - `sensitivity`: how the losses are differentiated; for an ODE inner loss it must
      be the strategy the loss's own solve uses. The default supports every order
      (right for plain JAX functions).
    - `kink_curvature`: optional $(p, \theta, \text{args}) \mapsto$ the Hessian-diagonal
      curvature contributed by smoothed non-smooth terms
      (`AbstractPenalty.kink_curvature`), used to detect kinks.
    - `kink_tolerance`: a component whose share of curvature from those terms lies in
      `(kink_tolerance, 1 - kink_tolerance)` is reported as at a kink.
    - `local_model`: optional $(p, \theta, \text{args}, \text{second\_order}) \mapsto
      \text{args}'$: arguments with which both losses evaluate a polynomial model of
      themselves around $(p, \theta)$, exact there in value and first derivatives and,
      with `second_order`, in $\nabla^2_{pp}$ and $\nabla^2_{p\theta}$. `Implicit`
      differentiates that model instead of the losses, so that one pass through their
      expensive part (an ODE solve carrying every tangent at once) supplies all the
      derivatives it takes, instead of one pass per derivative. The model is built
      from values, not traced: the hypergradient is then not itself differentiable.
    """

    outer_loss: InnerLoss
    inner_loss: InnerLoss | None = None
    inner_residuals: InnerResiduals | None = None
    inner_solver: optx.AbstractMinimiser | optx.AbstractLeastSquaresSolver | None = None
    inner_max_steps: int = eqx.field(static=True, default=1024)
    sensitivity: AbstractSensitivity = DirectDifferentiation()
    kink_curvature: InnerLoss | None = None
    kink_tolerance: float = eqx.field(static=True, default=0.01)
    local_model: Callable[..., Any] | None = None

    def __check_init__(self):
        if (self.inner_loss is None) == (self.inner_residuals is None):
            raise ValueError("give exactly one of `inner_loss` and `inner_residuals`")

    def inner(self, p, theta, args) -> Float[Array, ""]:
        """$L_{\\text{in}}(p, \\theta)$."""
        if self.inner_residuals is not None:
            r = self.inner_residuals(p, theta, args)
            return 0.5 * jnp.sum(r**2)
        return self.inner_loss(p, theta, args)

    def solver(self):
        if self.inner_solver is not None:
            return self.inner_solver
        if self.inner_residuals is not None:
            return optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)
        return optx.BFGS(rtol=1e-10, atol=1e-10)


def solve_inner(problem: BilevelProblem, theta, args, start, *, stationarity_tol=None
                ) -> tuple[Array, Array, Array]:
    """$p^*(\\theta)$ from `start`: `(p*, optimistix result code, steps)`. Never raises.
    With `stationarity_tol`, a Gauss–Newton-type solver also stops once its Newton step
    is 1% of it, or within it when the solver stalls (`NewtonStepTermination`): a fit
    whose steps are rejected is at the floor the ODE solve's error sets, and further
    steps only cost time (every lane of a batch waits for the slowest)."""
    solver = problem.solver()
    if stationarity_tol is not None:
        solver = with_newton_step_termination(solver, 0.01 * stationarity_tol,
                                              stationarity_tol)
    residuals = problem.inner_residuals
    # θ travels with the arguments (not in a closure) so the minimiser's custom VJP
    # never closes over a traced value.
    return solve_optimum(
        solver, start, (theta, args), sensitivity=problem.sensitivity,
        max_steps=problem.inner_max_steps, what="inner_solver",
        residuals=None if residuals is None else (lambda p, a: residuals(p, *a)),
        loss=lambda p, a: problem.inner(p, *a),
    )


# ---------------------------------------------------------------------------------
# Curvature of the inner loss at the optimum


class Linearisation(NamedTuple):
    """The inner loss to second order at $(p^*, \\theta)$."""

    gradient: Float[Array, " n"]  # ∇_p L_in
    hvp: Callable[[Float[Array, " n"]], Float[Array, " n"]]  # v ↦ H v
    mixed_vjp: Callable[[Float[Array, " n"]], Theta]  # z ↦ (∇²_pθ L_in)ᵀ z
    hessian: Float[Array, "n n"] | None  # dense H, when formed anyway


class AbstractCurvature(eqx.Module):
    """Where $H = \\nabla^2_{pp} L_{\\text{in}}$ and $\\nabla^2_{p\\theta} L_{\\text{in}}$ come from."""

    needs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def linearise(self, problem: BilevelProblem, p, theta, args) -> Linearisation:
        ...

    def missing(self, problem_or_sensitivity) -> str | None:
        """Why the sensitivity cannot supply this curvature (None if it can)."""
        sensitivity = getattr(problem_or_sensitivity, "sensitivity", problem_or_sensitivity)
        lacking = [n for n in self.needs if n not in sensitivity.second_order]
        if lacking:
            return (
                f"{type(self).__name__} needs {' and '.join(lacking)} derivatives through "
                f"the inner loss, which {type(sensitivity).__name__} does not support"
            )
        return None


class ExactHessian(AbstractCurvature):
    """Exact $H v$ by forward-over-reverse and $(\\nabla^2_{p\\theta}L)^\\top z$ by
    reverse-over-reverse; $H$ is never formed (except by `DirectSolve`). Through an ODE
    solve this needs `DirectDifferentiation`."""

    needs: ClassVar[tuple[str, ...]] = (FORWARD_OVER_REVERSE, REVERSE_OVER_REVERSE)

    def linearise(self, problem, p, theta, args):
        grad_p = jax.grad(problem.inner, 0)
        gradient, hvp = jax.linearize(lambda q: grad_p(q, theta, args), p)
        _, vjp = jax.vjp(lambda th: grad_p(p, th, args), theta)
        return Linearisation(gradient, hvp, lambda z: vjp(z)[0], None)


class ForwardHessian(AbstractCurvature):
    """Dense $H$ and $\\nabla^2_{p\\theta}L$ by forward-over-forward differentiation:
    $n_p(n_p + n_\\theta)$ second-order tangents, cheap for the few parameters of one
    individual, and the only exact second order that `ForwardMode` supports."""

    needs: ClassVar[tuple[str, ...]] = (FORWARD_OVER_FORWARD,)

    def linearise(self, problem, p, theta, args):
        grad_p = jax.jacfwd(problem.inner, 0)
        # One pass gives the gradient too (as aux), instead of tracing the loss again.
        (hessian, mixed), gradient = jax.jacfwd(
            lambda q, th: (grad_p(q, th, args),) * 2, (0, 1), has_aux=True
        )(p, theta)
        mixed_vjp = lambda z: jax.tree.map(lambda m: jnp.tensordot(z, m, axes=1), mixed)
        return Linearisation(gradient, lambda v: hessian @ v, mixed_vjp, hessian)


class GaussNewton(AbstractCurvature):
    r"""For $L_{\text{in}} = \tfrac12\lVert r\rVert^2$: $H \approx J_p^\top J_p$ and
    $\nabla^2_{p\theta}L \approx J_\theta^\top J_p$, dropping the terms with second
    derivatives of $r$ (small when the residuals are small at the optimum). Needs only
    first derivatives, so works with every sensitivity method."""

    def linearise(self, problem, p, theta, args):
        if problem.inner_residuals is None:
            raise ValueError("GaussNewton needs a problem with `inner_residuals`")
        residuals = lambda q, th: problem.inner_residuals(q, th, args)
        r = residuals(p, theta)
        jac_p, jac_theta = problem.sensitivity.jacobian_fn(residuals, (0, 1))(p, theta)
        hessian = jac_p.T @ jac_p
        mixed_vjp = lambda z: jax.tree.map(
            lambda j: jnp.tensordot(jac_p @ z, j, axes=1), jac_theta
        )
        return Linearisation(jac_p.T @ r, lambda v: hessian @ v, mixed_vjp, hessian)


# ---------------------------------------------------------------------------------
# Linear solves with the inner Hessian


class LinearSolveInfo(NamedTuple):
    residual: Float[Array, ""]  # ‖H z − b‖ / ‖b‖
    spectral_radius: Float[Array, ""]  # of I − αH (Neumann), NaN otherwise
    failed: Bool[Array, ""]
    divergent: Bool[Array, ""]


def _relative_residual(hvp, z, b):
    return jnp.linalg.norm(hvp(z) - b) / jnp.maximum(jnp.linalg.norm(b), 1e-300)


class AbstractLinearSolve(eqx.Module):
    """Solves $H z = b$ given $v \\mapsto Hv$."""

    @abc.abstractmethod
    def solve(self, lin: Linearisation, b) -> tuple[Float[Array, " n"], LinearSolveInfo]:
        ...


class DirectSolve(AbstractLinearSolve):
    """Forms $H$ (from $n$ Hessian-vector products unless the curvature strategy has it)
    and solves by LU. For small $p$, e.g. one individual's parameters."""

    rtol: float = 1e-6

    def solve(self, lin, b):
        hessian = lin.hessian
        if hessian is None:
            hessian = jax.vmap(lin.hvp, out_axes=1)(jnp.eye(b.size, dtype=b.dtype))
        operator = lx.MatrixLinearOperator(hessian, lx.symmetric_tag)
        solution = lx.linear_solve(operator, b, lx.LU(), throw=False)
        z = solution.value
        residual = _relative_residual(lin.hvp, z, b)
        failed = (solution.result != lx.RESULTS.successful) | ~(residual <= self.rtol)
        return z, LinearSolveInfo(residual, jnp.array(jnp.nan), failed, jnp.array(False))


class ConjugateGradient(AbstractLinearSolve):
    """Conjugate gradients (lineax) on $v \\mapsto Hv$: never forms $H$. Needs $H$
    positive definite, i.e. a strict local minimum of the inner loss."""

    rtol: float = 1e-10
    atol: float = 1e-12
    max_steps: int | None = eqx.field(static=True, default=None)
    # Accepted relative residual ‖Hz − b‖/‖b‖ (looser than the CG stopping rule,
    # which uses the max norm).
    accept_rtol: float = 1e-6

    def solve(self, lin, b):
        operator = lx.FunctionLinearOperator(
            lin.hvp, jax.ShapeDtypeStruct(b.shape, b.dtype), lx.positive_semidefinite_tag
        )
        solver = lx.CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        solution = lx.linear_solve(operator, b, solver, throw=False)
        z = solution.value
        residual = _relative_residual(lin.hvp, z, b)
        failed = (solution.result != lx.RESULTS.successful) | ~(residual <= self.accept_rtol)
        return z, LinearSolveInfo(residual, jnp.array(jnp.nan), failed, jnp.array(False))


class NeumannSeries(AbstractLinearSolve):
    r"""Truncated Neumann series $z = \alpha\sum_{t<T}(I-\alpha H)^t b$.

    Converges iff the spectral radius $\rho(I-\alpha H) < 1$, i.e.
    $0 < \alpha < 2/\lambda_{\max}(H)$ for positive definite $H$; the truncation error
    is $\le \rho^T$ relative. $\rho$ is estimated by `power_iterations` steps of the
    power method (with the Rayleigh quotient) and the series is reported divergent when
    $\rho \ge 1$.
    """

    step_size: float = 1.0
    terms: int = 100
    power_iterations: int = 50

    def solve(self, lin, b):
        step = lambda v: v - self.step_size * lin.hvp(v)

        def term(_, carry):
            total, power = carry
            return total + power, step(power)

        total, _ = jax.lax.fori_loop(0, self.terms, term, (jnp.zeros_like(b), b))
        z = self.step_size * total
        rho = _spectral_radius(step, b, self.power_iterations)
        residual = _relative_residual(lin.hvp, z, b)
        divergent = ~(rho < 1)
        return z, LinearSolveInfo(residual, rho, divergent, divergent)


def _spectral_radius(operator, like, iterations):
    """$|\\lambda|_{\\max}$ of a symmetric operator by the power method."""
    n = like.size
    # A fixed, generic start vector: not orthogonal to any eigenvector in practice.
    v = jnp.cos(1.0 + jnp.arange(n, dtype=like.dtype) * 0.7548776662466927)
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        w = operator(v)
        return w / jnp.maximum(jnp.linalg.norm(w), 1e-300)

    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.abs(jnp.vdot(v, operator(v)))


# ---------------------------------------------------------------------------------
# Results


class Hypergradient(eqx.Module):
    """A hypergradient $dF/d\\theta$ with what is needed to trust it.

    - `value`: $dF/d\\theta$ (same structure as $\\theta$).
    - `outer_loss`: $F(\\theta)$; `inner_solution`: $p^*$ (for `Unrolled`: $p_K$).
    - `result`: a `RESULTS` code (`successful`, `inner_not_stationary`,
      `neumann_divergent`, `hessian_solve_inaccurate`, `near_kink`, or the inner solver's).
    - `stationarity`: length of the Newton step $\\lVert H^{-1}\\nabla_p L_{\\text{in}}\\rVert$
      from $p^*$ to the stationary point, and `stationarity_bound`, the tolerance it
      was held to; `gradient_norm`: $\\lVert\\nabla_p L_{\\text{in}}(p^*, \\theta)\\rVert$.
    - `linear_residual`: $\\lVert Hz - b\\rVert/\\lVert b\\rVert$; `spectral_radius` of
      $I - \\alpha H$ (Neumann only, else NaN); `kinks`: components at a kink.
    - `inner_steps`: steps of the inner solve (for `Unrolled`: $K$).
    - `optimiser_gradient`: for `Unrolled`, $dF/d$(optimiser hyperparameters), shaped
      like the optimiser; else None.
    - `solution_jacobian`: for `Implicit(solution_jacobian=True)`, how the inner
      solution moves with $\theta$, $dp^*/d\theta = -H^{-1}\nabla^2_{p\theta}L_{\text{in}}$:
      shaped like $\theta$ with a leading axis of length $n$; else None.
    """

    value: Theta
    outer_loss: Float[Array, ""]
    inner_solution: Float[Array, " n"]
    result: Int[Array, ""]
    stationarity: Float[Array, ""]
    stationarity_bound: Float[Array, ""]
    gradient_norm: Float[Array, ""]
    linear_residual: Float[Array, ""]
    spectral_radius: Float[Array, ""]
    kinks: Bool[Array, " n"]
    inner_steps: Int[Array, ""]
    optimiser_gradient: Any = None
    solution_jacobian: Any = None

    @property
    def successful(self) -> bool:
        return bool(np.all(np.asarray(self.result) == RESULTS.successful._value))

    @property
    def stationary(self) -> Array:
        """Whether the inner fit is stationary enough for the implicit formula."""
        return self.stationarity <= self.stationarity_bound

    def describe(self) -> str:
        """One line per problem found (empty when successful)."""
        lines = []
        codes = np.atleast_1d(np.asarray(self.result))
        for i, code in enumerate(codes):
            if code == RESULTS.successful._value:
                continue
            where = f"[{i}] " if codes.size > 1 else ""
            detail = _detail(self, result_name(code), i if codes.size > 1 else None)
            lines.append(f"{where}{result_name(code)}: {detail}{result_message(code)}")
        return "\n".join(lines)


def _detail(h: Hypergradient, name: str, i) -> str:
    pick = (lambda a: np.asarray(a)) if i is None else (lambda a: np.asarray(a)[i])
    if name == "inner_not_stationary":
        return (
            f"Newton step |H^-1 grad_p L_in| = {float(pick(h.stationarity)):.3g} > "
            f"{float(pick(h.stationarity_bound)):.3g}. "
        )
    if name == "neumann_divergent":
        return f"spectral radius of I - aH = {float(pick(h.spectral_radius)):.4g}. "
    if name == "hessian_solve_inaccurate":
        return f"relative residual |Hz - b|/|b| = {float(pick(h.linear_residual)):.3g}. "
    if name == "near_kink":
        return f"components {np.flatnonzero(pick(h.kinks)).tolist()}. "
    return ""


def _first_failure(*flags_and_codes):
    """The first `(flag, RESULTS item)` whose flag is set, else success."""
    result = RESULTS.successful._value
    for flag, item in reversed(flags_and_codes):
        result = jnp.where(flag, item._value, result)
    return result


# ---------------------------------------------------------------------------------
# Strategies


class AbstractHypergradient(eqx.Module):
    """A way of computing $dF/d\\theta$."""

    @abc.abstractmethod
    def missing(self, sensitivity: AbstractSensitivity) -> str | None:
        """Why this strategy cannot run with `sensitivity` (None if it can)."""

    @abc.abstractmethod
    def compute(self, problem: BilevelProblem, theta, args, start) -> Hypergradient:
        """The hypergradient at `theta`, the inner problem started from `start`."""


def check_supported(method: AbstractHypergradient, sensitivity: AbstractSensitivity):
    """Raise a `ValueError` naming the problem if `method` cannot use `sensitivity`."""
    reason = method.missing(sensitivity)
    if reason is not None:
        raise ValueError(
            f"{reason}. Use an inner sensitivity that supports it (DirectDifferentiation "
            f"supports every order; ForwardMode supports forward-over-forward, e.g. "
            f"Implicit(curvature=ForwardHessian()) or Unrolled), or "
            f"Implicit(curvature=GaussNewton()), which needs first derivatives only."
        )


def _kinks(problem: BilevelProblem, lin: Linearisation, p, theta, args):
    if problem.kink_curvature is None:
        return jnp.zeros(p.shape, bool)
    kink = problem.kink_curvature(p, theta, args)
    if lin.hessian is not None:
        diagonal = jnp.diag(lin.hessian)
    else:
        diagonal = jax.vmap(lambda e: jnp.vdot(e, lin.hvp(e)))(jnp.eye(p.size, dtype=p.dtype))
    share = kink / jnp.where(diagonal > 0, diagonal, jnp.inf)
    tol = problem.kink_tolerance
    return (share > tol) & (share < 1 - tol)


class Implicit(AbstractHypergradient):
    r"""Implicit differentiation of the inner optimality condition.

    $$ \frac{dF}{d\theta} = \partial_\theta L_{\text{out}} - (\nabla^2_{p\theta}L_{\text{in}})^\top z,
       \qquad \nabla^2_{pp}L_{\text{in}}\, z = \nabla_p L_{\text{out}} $$

    **Arguments:**

    - `curvature`: `ExactHessian()` (default), `ForwardHessian()` or `GaussNewton()`.
    - `linear_solver`: `DirectSolve()` (default), `ConjugateGradient()` or `NeumannSeries()`.
    - `stationarity_tol`: the inner optimum counts as stationary when the Newton step
      to the stationary point is short, $\lVert H^{-1}\nabla_p L_{\text{in}}\rVert \le$
      `stationarity_tol` $\cdot\max(1, \lVert p^*\rVert)$: a distance in $p$ that, unlike
      $\lVert\nabla_p L_{\text{in}}\rVert$, does not depend on how the loss is scaled.
      An adaptive ODE solve makes the loss piecewise smooth at the level of its
      tolerance, which bounds how stationary a fit can be (about 1e-6 in $p$ at
      `rtol=1e-8`): hence the default 1e-5. A Gauss–Newton-type inner solver stops
      once its own Gauss–Newton step is 1% of this, or within it after two rejected
      steps in a row (`NewtonStepTermination`), so a warm-started fit that is already
      stationary takes one to three steps, not the solver's step limit, and one that
      has reached the floor the ODE error sets stops there.
    - `solution_jacobian`: also return $dp^*/d\theta = -H^{-1}\nabla^2_{p\theta}L_{\text{in}}$
      ($n$ more linear solves with the same $H$), from which the next inner fit at
      $\theta'$ can start at $p^* + (dp^*/d\theta)(\theta' - \theta)$ instead of $p^*$.
      Population fits switch it on.
    """

    curvature: AbstractCurvature = ExactHessian()
    linear_solver: AbstractLinearSolve = DirectSolve()
    stationarity_tol: float = 1e-5
    solution_jacobian: bool = eqx.field(static=True, default=False)

    def missing(self, sensitivity):
        return self.curvature.missing(sensitivity)

    def compute(self, problem, theta, args, start):
        p, inner_result, steps = solve_inner(problem, theta, args, start,
                                             stationarity_tol=self.stationarity_tol)
        return self.at_optimum(problem, jax.lax.stop_gradient(p), theta, args,
                               inner_result=inner_result, inner_steps=steps)

    def at_optimum(self, problem, p, theta, args, *, inner_result=None, inner_steps=None):
        """The hypergradient given the inner optimum $p^*$ (no inner solve)."""
        sensitivity = problem.sensitivity
        if problem.local_model is not None:
            args = problem.local_model(p, theta, args, bool(self.curvature.needs))
        outer = lambda q, th: problem.outer_loss(q, th, args)
        outer_value, (grad_p_outer, grad_theta_outer) = sensitivity.value_and_grad_fn(
            outer, (0, 1)
        )(p, theta)
        lin = self.curvature.linearise(problem, p, theta, args)
        z, info = self.linear_solver.solve(lin, grad_p_outer)
        mixed = lin.mixed_vjp(z)
        value = jax.tree.map(lambda a, b: a - b, grad_theta_outer, mixed)
        solution_jacobian = None
        if self.solution_jacobian:
            # Row i of dp*/dθ = −H⁻¹ ∇²_pθ L is −(∇²_pθ L)ᵀ H⁻¹ eᵢ, H being symmetric.
            row = lambda e: jax.tree.map(
                jnp.negative, lin.mixed_vjp(self.linear_solver.solve(lin, e)[0]))
            solution_jacobian = jax.vmap(row)(jnp.eye(p.size, dtype=p.dtype))

        newton_step, _ = self.linear_solver.solve(lin, lin.gradient)
        stationarity = jnp.linalg.norm(newton_step)
        bound = self.stationarity_tol * jnp.maximum(1.0, jnp.linalg.norm(p))
        kinks = _kinks(problem, lin, p, theta, args)
        result = _first_failure(
            (info.divergent, RESULTS.neumann_divergent),
            (~(stationarity <= bound), RESULTS.inner_not_stationary),
            (info.failed, RESULTS.hessian_solve_inaccurate),
            (jnp.any(kinks), RESULTS.near_kink),
        )
        if inner_result is not None:
            # A breakdown of the inner solver (not merely running out of steps, which
            # the stationarity test judges) is reported as itself.
            judged = [RESULTS.successful, RESULTS.nonlinear_max_steps_reached]
            broke = ~jnp.isin(inner_result, jnp.array([r._value for r in judged]))
            result = jnp.where(broke, inner_result, result)
        return Hypergradient(
            value=value,
            outer_loss=outer_value,
            inner_solution=p,
            result=jnp.asarray(result),
            stationarity=stationarity,
            stationarity_bound=bound,
            gradient_norm=jnp.linalg.norm(lin.gradient),
            linear_residual=info.residual,
            spectral_radius=info.spectral_radius,
            kinks=kinks,
            inner_steps=jnp.asarray(0 if inner_steps is None else inner_steps),
            solution_jacobian=solution_jacobian,
        )


# ---- unrolled optimisers ----------------------------------------------------------


class AbstractSchedule(eqx.Module):
    """A learning-rate schedule $\\eta_t$ with differentiable parameters."""

    @abc.abstractmethod
    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        ...


class ExponentialDecay(AbstractSchedule):
    """$\\eta_t = \\eta_0\\, \\gamma^t$."""

    initial: float
    decay: float

    def __call__(self, step):
        return self.initial * self.decay ** jnp.asarray(step, float)


class InverseTimeDecay(AbstractSchedule):
    """$\\eta_t = \\eta_0 / (1 + c\\,t)$."""

    initial: float
    rate: float

    def __call__(self, step):
        return self.initial / (1.0 + self.rate * jnp.asarray(step, float))


LearningRate = float | AbstractSchedule


def _learning_rate(rate):
    return rate if isinstance(rate, AbstractSchedule) else jnp.asarray(rate)


class AbstractUnrolledOptimiser(eqx.Module):
    """An inner optimiser whose float fields are differentiable hyperparameters."""

    @abc.abstractmethod
    def transformation(self) -> optax.GradientTransformation:
        ...


class GradientDescent(AbstractUnrolledOptimiser):
    """$p_{t+1} = p_t - \\eta_t \\nabla L_{\\text{in}}(p_t)$."""

    learning_rate: LearningRate = 1e-2

    def transformation(self):
        return optax.sgd(_learning_rate(self.learning_rate))


class Momentum(AbstractUnrolledOptimiser):
    """Heavy ball: $v_{t+1} = \\beta v_t + \\nabla L(p_t)$, $p_{t+1} = p_t - \\eta_t v_{t+1}$."""

    learning_rate: LearningRate = 1e-2
    momentum: float = 0.9
    nesterov: bool = eqx.field(static=True, default=False)

    def transformation(self):
        return optax.sgd(_learning_rate(self.learning_rate), momentum=self.momentum,
                         nesterov=self.nesterov)


class Adam(AbstractUnrolledOptimiser):
    """Adam with moment decay rates $\\beta_1$, $\\beta_2$."""

    learning_rate: LearningRate = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def transformation(self):
        return optax.adam(_learning_rate(self.learning_rate), b1=self.b1, b2=self.b2,
                          eps=self.eps)


class Unrolled(AbstractHypergradient):
    r"""Differentiate $L_{\text{out}}(p_K, \theta)$ through $K$ optimiser steps from the
    start point. Exact for the truncated procedure; approaches the implicit
    hypergradient as $p_K \to p^*$ (at the optimiser's convergence rate). Also returns
    the gradient with respect to the optimiser's hyperparameters.

    Reverse mode (backpropagation through the steps) needs reverse-over-reverse
    derivatives of the inner loss; with a forward sensitivity everything runs in
    forward mode (one tangent per hyperparameter).
    """

    optimiser: AbstractUnrolledOptimiser = GradientDescent()
    steps: int = eqx.field(static=True, default=100)

    def missing(self, sensitivity):
        need = nested_mode(sensitivity)
        if need not in sensitivity.second_order:
            return (
                f"Unrolled needs {need} derivatives through the inner loss, which "
                f"{type(sensitivity).__name__} does not support"
            )
        return None

    def compute(self, problem, theta, args, start):
        sensitivity = problem.sensitivity

        def final_loss(theta, optimiser):
            transformation = optimiser.transformation()
            grad_p = sensitivity.grad_fn(problem.inner)

            def step(carry, _):
                p, state = carry
                updates, state = transformation.update(grad_p(p, theta, args), state, p)
                return (optax.apply_updates(p, updates), state), None

            init = (start, transformation.init(start))
            (p, _), _ = jax.lax.scan(step, init, None, length=self.steps)
            value = problem.outer_loss(p, theta, args)
            return value, (value, p)

        differentiate = jax.jacfwd if sensitivity.mode == "forward" else jax.grad
        (grad_theta, grad_optimiser), (value, p) = differentiate(
            final_loss, (0, 1), has_aux=True
        )(theta, self.optimiser)
        gradient_norm = jnp.linalg.norm(sensitivity.grad_fn(problem.inner)(p, theta, args))
        return Hypergradient(
            value=grad_theta,
            outer_loss=value,
            inner_solution=p,
            result=jnp.asarray(RESULTS.successful._value),
            stationarity=jnp.array(jnp.nan),
            stationarity_bound=jnp.array(jnp.inf),
            gradient_norm=gradient_norm,
            linear_residual=jnp.array(jnp.nan),
            spectral_radius=jnp.array(jnp.nan),
            kinks=jnp.zeros(p.shape, bool),
            inner_steps=jnp.asarray(self.steps),
            optimiser_gradient=grad_optimiser,
        )


class FiniteDifferences(AbstractHypergradient):
    r"""Central differences of $F(\theta) = L_{\text{out}}(p^*(\theta), \theta)$, the inner
    problem re-solved (warm-started) at each $\theta \pm h_j e_j$,
    $h_j = $ `step` $\cdot\max(1, |\theta_j|)$. A check on the other strategies: its
    error is $O(h^2)$ plus the inner solve's error divided by $h$."""

    step: float = 1e-5

    def missing(self, sensitivity):
        return None

    def compute(self, problem, theta, args, start):
        p, inner_result, steps = solve_inner(problem, theta, args, start)
        flat, unravel = ravel_pytree(theta)
        h = self.step * jnp.maximum(1.0, jnp.abs(flat))
        shifts = jnp.concatenate([jnp.diag(h), -jnp.diag(h)])

        def outer_at(shift):
            th = unravel(flat + shift)
            q, result, _ = solve_inner(problem, th, args, p)
            return problem.outer_loss(q, th, args), result

        values, results = jax.vmap(outer_at)(shifts)
        n = flat.size
        grad = (values[:n] - values[n:]) / (2 * h)
        solved = jnp.all(results == RESULTS.successful._value) & (
            inner_result == RESULTS.successful._value
        )
        return Hypergradient(
            value=unravel(grad),
            outer_loss=problem.outer_loss(p, theta, args),
            inner_solution=p,
            result=jnp.where(solved, RESULTS.successful._value,
                             RESULTS.inner_not_stationary._value),
            stationarity=jnp.array(jnp.nan),
            stationarity_bound=jnp.array(jnp.nan),
            gradient_norm=jnp.array(jnp.nan),
            linear_residual=jnp.array(jnp.nan),
            spectral_radius=jnp.array(jnp.nan),
            kinks=jnp.zeros(p.shape, bool),
            inner_steps=jnp.asarray(steps),
        )


def numbers_as_arrays(tree):
    """Python numbers in `tree` as arrays, so that `filter_jit` traces them and a new
    hyperparameter value does not recompile."""
    return jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, float | int) and not isinstance(x, bool)
        else x,
        tree,
    )


@eqx.filter_jit
def _compute(method, problem, theta, args, start):
    return method.compute(problem, theta, args, start)


def hypergradient(
    problem: BilevelProblem,
    theta: Theta,
    args: Any = None,
    *,
    start: Float[Array, " n"],
    method: AbstractHypergradient = Implicit(),
    throw: bool = False,
) -> Hypergradient:
    """$dF/d\\theta$ for `problem` at `theta`, the inner problem started from `start`.

    When the result is not trustworthy (inner not stationary, Neumann series
    divergent, inaccurate Hessian solve, a penalty at a kink) this warns with a
    `HypergradientWarning`, or raises `HypergradientError` with `throw=True`; the
    returned `Hypergradient` carries the diagnostics either way.
    """
    check_supported(method, problem.sensitivity)
    method = numbers_as_arrays(method)
    theta = jax.tree.map(jnp.asarray, theta)
    start = jnp.asarray(start, float)
    if start.ndim != 1:
        raise ValueError(f"`start` must be a 1-D parameter vector, got shape {start.shape}")
    result = _compute(method, problem, theta, args, start)
    if not result.successful:
        message = f"{type(method).__name__} hypergradient is unreliable: {result.describe()}"
        if throw:
            raise HypergradientError(message)
        warnings.warn(message, HypergradientWarning, stacklevel=2)
    return result
