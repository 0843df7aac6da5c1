r"""Hierarchical (population) calibration by hypergradients.

$N$ individuals share one ODE model. Each model parameter plays one role:

- **random** (population-distributed): on the parameter's scale $s$ (log for a
  log-scale parameter), $s_i = \mu + \eta_i$, $\eta_i \sim N(0, \Omega)$, $\Omega$
  diagonal or full; initial conditions are parameters, so they can be random too;
- **fixed** (fixed effect): one value shared by all individuals;
- **individual**: fitted per individual with no population model;
- everything else is a constant.

The inner problem, for each individual and all at once (one `vmap`ped optimistix
solve, warm-started from the previous outer step), is the MAP fit

$$ u_i^*(\theta) = \arg\min_{u_i = (\eta_i, z_i)}\;
   \tfrac12\lVert r_i(u_i, \theta)\rVert^2 + \tfrac12\eta_i^\top\Omega^{-1}\eta_i
   + R_\lambda(\eta_i), $$

and the outer problem chooses $\theta = (\text{fixed effects}, \mu, \Omega, \log\lambda)$
by minimising either

- `Laplace()`: the Laplace approximation of the marginal likelihood (first-order
  conditional estimation with interaction, FOCE-I),
  $-\log L(\theta) \approx \sum_i \mathrm{NLL}_i(u_i^*) + \tfrac12\eta_i^{*\top}\Omega^{-1}\eta_i^*
  + \tfrac12\log\det\Omega + \tfrac12\log\det(J_{\eta,i}^\top J_{\eta,i} + \Omega^{-1})$,
  or
- `ValidationLoss(fraction)`: the likelihood of held-out measurements.

Both depend on $\theta$ through $u^*(\theta)$; their gradient is the hypergradient
(`calibrate.Implicit` by default), summed over individuals.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pandas as pd
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ._batching import (
    default_chunk_size,
    fit_kernel_flops,
    map_individuals,
    on_individual_devices,
    with_individual_devices,
)
from ._checkpoint import Checkpoint
from ._data import Dataset, Measurements
from ._hypergrad import (
    AbstractHypergradient,
    BilevelProblem,
    ForwardHessian,
    Hypergradient,
    Implicit,
    check_supported,
    numbers_as_arrays,
)
from ._model import AbstractODEModel
from ._objective import Objective
from ._parameters import ParameterError, ParameterSpace
from ._penalty import L2, AbstractPenalty
from ._petab import PEtabProblem
from ._petab_population import (
    PEtabLikelihood,
    population_roles,
    population_space,
    population_start_sd,
    require_population,
)
from ._results import RESULTS, result_name
from ._sensitivity import (
    FORWARD_OVER_FORWARD,
    AbstractSensitivity,
    ForwardMode,
    nested_mode,
)
from ._simulate import Integrator


# ---------------------------------------------------------------------------------
# Covariance structures


class AbstractCovariance(eqx.Module):
    """How $\\Omega = LL^\\top$ is parametrised by an unconstrained vector."""

    @abc.abstractmethod
    def cholesky(self, vector: Float[Array, " m"], k: int) -> Float[Array, "k k"]:
        ...

    @abc.abstractmethod
    def initial(self, sd: np.ndarray) -> np.ndarray:
        """The vector of a diagonal $\\Omega$ with standard deviations `sd`."""


class DiagonalCovariance(AbstractCovariance):
    """$\\Omega = \\mathrm{diag}(\\omega^2)$, parametrised by $\\log\\omega$."""

    def cholesky(self, vector, k):
        return jnp.diag(jnp.exp(vector))

    def initial(self, sd):
        return np.log(sd)


class FullCovariance(AbstractCovariance):
    """Full $\\Omega = LL^\\top$: $L$ lower triangular with $\\log$ of its diagonal and its
    strictly lower entries (row by row) as parameters."""

    def cholesky(self, vector, k):
        rows, cols = np.tril_indices(k, -1)
        lower = jnp.zeros((k, k)).at[rows, cols].set(vector[k:])
        return lower + jnp.diag(jnp.exp(vector[:k]))

    def initial(self, sd):
        return np.concatenate([np.log(sd), np.zeros(len(sd) * (len(sd) - 1) // 2)])


class Hierarchy(eqx.Module):
    """Roles of the model parameters in the population model.

    **Arguments:**

    - `random`: population-distributed parameters ($s_i = \\mu + \\eta_i$ on their scale).
    - `fixed`: fixed effects, one shared value estimated for all individuals.
    - `individual`: fitted per individual without a population model.
    - `covariance`: `DiagonalCovariance()` (default) or `FullCovariance()` for $\\Omega$.
    - `penalty`: optional penalty $R_\\lambda(\\eta_i)$ (e.g. `L2()`, `ElasticNet()`) whose
      strength $\\lambda$ is learned (use with `ValidationLoss`).
    """

    random: tuple[str, ...] = eqx.field(static=True, default=(), converter=tuple)
    fixed: tuple[str, ...] = eqx.field(static=True, default=(), converter=tuple)
    individual: tuple[str, ...] = eqx.field(static=True, default=(), converter=tuple)
    covariance: AbstractCovariance = DiagonalCovariance()
    penalty: AbstractPenalty | None = None

    def __check_init__(self):
        names = [*self.random, *self.fixed, *self.individual]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ParameterError(f"parameter(s) given more than one role: {', '.join(twice)}")
        if not self.random and not self.individual:
            raise ParameterError("the hierarchy has no random or individual parameters")


# ---------------------------------------------------------------------------------
# Outer objectives


class AbstractPopulationObjective(eqx.Module):
    """What the outer problem minimises, per individual, as a function of $(u_i, \\theta)$."""

    needs_second_order: bool = eqx.field(static=True, default=False)

    def missing(self, sensitivity: AbstractSensitivity) -> str | None:
        if not self.needs_second_order:
            return None
        need = nested_mode(sensitivity)
        if need not in sensitivity.second_order:
            return (
                f"{type(self).__name__} differentiates the Jacobian of the residuals, which "
                f"needs {need} derivatives; {type(sensitivity).__name__} does not support them"
            )
        return None


class Laplace(AbstractPopulationObjective):
    """Laplace approximation of $-\\log L(\\theta)$ with the Gauss–Newton (FOCE-I)
    Hessian of the random effects."""

    needs_second_order: bool = eqx.field(static=True, default=True)


class ValidationLoss(AbstractPopulationObjective):
    """Negative log-likelihood of held-out measurements: a random `fraction` of each
    individual's measurements (drawn with `seed`) is removed from the inner fits."""

    fraction: float = eqx.field(static=True, default=0.2)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"ValidationLoss needs 0 < fraction < 1, got {self.fraction}")


def holdout_split(
    measurements: Measurements, fraction: float, seed: int
) -> tuple[Measurements, Measurements]:
    """Split each individual's measurements into training and held-out masks.

    At least one measurement per individual stays in each part (when it has two).
    """
    mask = np.asarray(measurements.mask)
    rng = np.random.default_rng(seed)
    held = np.zeros_like(mask)
    for i in range(mask.shape[0]):
        where = np.flatnonzero(mask[i].ravel())
        if where.size < 2:
            continue
        count = min(max(1, round(fraction * where.size)), where.size - 1)
        chosen = rng.choice(where, size=count, replace=False)
        flat = held[i].ravel()
        flat[chosen] = True
        held[i] = flat.reshape(mask[i].shape)
    train = eqx.tree_at(lambda m: m.mask, measurements, jnp.asarray(mask & ~held))
    validation = eqx.tree_at(lambda m: m.mask, measurements, jnp.asarray(held))
    return train, validation


# ---------------------------------------------------------------------------------
# The per-individual bilevel problem


class PopulationProblem(eqx.Module):
    """Maps $(u_i, \\theta)$ to an individual's parameters, inner loss and outer loss."""

    objective: Objective | PEtabLikelihood
    space: ParameterSpace = eqx.field(static=True)
    hierarchy: Hierarchy
    outer: AbstractPopulationObjective
    constants: dict[str, Float[Array, ""]]

    @property
    def n_random(self) -> int:
        return len(self.hierarchy.random)

    def cholesky(self, theta) -> Float[Array, "k k"]:
        return self.hierarchy.covariance.cholesky(theta["omega"], self.n_random)

    def params(self, u, theta):
        """Natural-scale parameters of one individual."""
        h = self.hierarchy
        space = self.space
        values = dict(self.constants)
        for j, name in enumerate(h.fixed):
            values[name] = space[name].from_unconstrained(theta["fixed"][j])
        for j, name in enumerate(h.random):
            values[name] = space[name].from_scaled(theta["mean"][j] + u[j])
        for j, name in enumerate(h.individual):
            values[name] = space[name].from_unconstrained(u[self.n_random + j])
        return values

    def _prior_residuals(self, u, theta):
        eta = u[: self.n_random]
        if self.n_random == 0:
            return eta
        return jax.scipy.linalg.solve_triangular(self.cholesky(theta), eta, lower=True)

    def _penalty_residuals(self, u, theta):
        # An L2 penalty is a residual; other penalties enter `inner_loss` only.
        penalty = self.hierarchy.penalty
        if isinstance(penalty, L2):
            return jnp.exp(0.5 * theta["strength"]) * u[: self.n_random]
        return jnp.zeros((0,))

    def has_residual_form(self) -> bool:
        return self.hierarchy.penalty is None or isinstance(self.hierarchy.penalty, L2)

    def bounded(self, theta) -> np.ndarray:
        """Which entries of the flattened θ are logit coordinates of a parameter with
        two finite bounds (the fixed effects' `to_unconstrained`)."""
        masks = {key: np.zeros(np.shape(value), bool) for key, value in theta.items()}
        if "fixed" in masks:
            masks["fixed"] = np.array([
                all(math.isfinite(b) for b in self.space[name].scaled_bounds)
                for name in self.hierarchy.fixed])
        return np.asarray(ravel_pytree(masks)[0], bool)

    @property
    def varied_names(self) -> tuple[str, ...]:
        """The model parameters that vary with $(u, \\theta)$, those that vary with
        $u$ first."""
        h = self.hierarchy
        return (*h.random, *h.individual, *h.fixed)

    def varied(self, u, theta) -> Float[Array, " n_v"]:
        """Natural-scale values of `varied_names`."""
        values = self.params(u, theta)
        return jnp.stack([jnp.asarray(values[n], float) for n in self.varied_names])

    def data_terms(self, u, theta, data, inputs):
        if isinstance(data, LocalExpansion):
            return data(self.varied(u, theta))
        return self.objective.evaluate_params(self.params(u, theta), data, inputs)

    def expand(self, u, theta, data, inputs, second_order: bool) -> "LocalExpansion":
        """`data`'s terms expanded around the individual's parameters at $(u, \\theta)$:
        one solve carrying $n_v$ tangents, or with `second_order` $(1 + n_v)(1 + n_u)$
        lanes (value and tangents of the $u$-Jacobian)."""
        names = self.varied_names
        n_u = u.size

        def terms(v):
            values = {**self.constants, **dict(zip(names, v))}
            r, nll, result = self.objective.evaluate_params(values, data, inputs)
            return (r, nll), (r, nll, result)

        v0 = jax.lax.stop_gradient(self.varied(u, theta))
        if not second_order:
            (jacobian, nll_gradient), (r, nll, result) = jax.jacfwd(terms, has_aux=True)(v0)
            return LocalExpansion(v0, r, jacobian, None, nll, nll_gradient, result)

        def with_u_jacobian(v):
            def residuals_of_u(w):
                r, nll, result = terms(jnp.concatenate([w, v[n_u:]]))[1]
                return r, (r, nll, result)

            jacobian_u, (r, nll, result) = jax.jacfwd(residuals_of_u, has_aux=True)(v[:n_u])
            return (r, nll, jacobian_u), (r, nll, result)

        (jacobian, nll_gradient, second), (r, nll, result) = jax.jacfwd(
            with_u_jacobian, has_aux=True)(v0)
        return LocalExpansion(v0, r, jacobian, second, nll, nll_gradient, result)

    def local_model(self, u, theta, args, second_order: bool):
        """`BilevelProblem.local_model`: the data replaced by their expansions. The
        Laplace objective differentiates $J_\\eta$, so needs the second order anyway."""
        train, held_out, inputs = args
        u, theta = jax.lax.stop_gradient((u, theta))
        second_order = second_order or isinstance(self.outer, Laplace)
        train = self.expand(u, theta, train, inputs, second_order)
        if held_out is not None:
            held_out = self.expand(u, theta, held_out, inputs, False)
        return train, held_out, inputs

    def inner_residuals(self, u, theta, args):
        train, _, inputs = args
        r, _, _ = self.data_terms(u, theta, train, inputs)
        return jnp.concatenate(
            [r, self._prior_residuals(u, theta), self._penalty_residuals(u, theta)]
        )

    def inner_loss(self, u, theta, args):
        value = 0.5 * jnp.sum(self.inner_residuals(u, theta, args) ** 2)
        penalty = self.hierarchy.penalty
        if penalty is not None and not isinstance(penalty, L2):
            value = value + penalty(u[: self.n_random], jnp.exp(theta["strength"]))
        return value

    def kink_curvature(self, u, theta, args):
        penalty = self.hierarchy.penalty
        curvature = jnp.zeros_like(u)
        if penalty is None:
            return curvature
        eta = u[: self.n_random]
        return curvature.at[: self.n_random].set(
            penalty.kink_curvature(eta, jnp.exp(theta["strength"]))
        )

    def laplace(self, u, theta, args):
        """$-\\log$ of the Laplace-approximated marginal likelihood of one individual."""
        train, _, inputs = args
        k = self.n_random
        if k == 0:
            return self.data_terms(u, theta, train, inputs)[1]

        def residuals_and_nll(eta):
            r, nll, _ = self.data_terms(u.at[:k].set(eta), theta, train, inputs)
            return r, nll

        # One solve gives the NLL and (as its Jacobian) J_η.
        jac, nll = self.objective.sensitivity.jacobian(residuals_and_nll, u[:k], has_aux=True)
        prior = self._prior_residuals(u, theta)
        chol = self.cholesky(theta)
        omega_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(k))
        hessian = jac.T @ jac + omega_inv
        log_det_hessian = 2 * jnp.sum(jnp.log(jnp.diag(jnp.linalg.cholesky(hessian))))
        log_det_omega = 2 * jnp.sum(jnp.log(jnp.abs(jnp.diag(chol))))
        return nll + 0.5 * jnp.sum(prior**2) + 0.5 * log_det_omega + 0.5 * log_det_hessian

    def validation(self, u, theta, args):
        _, held_out, inputs = args
        _, nll, _ = self.data_terms(u, theta, held_out, inputs)
        return nll

    def outer_loss(self, u, theta, args):
        if isinstance(self.outer, Laplace):
            return self.laplace(u, theta, args)
        return self.validation(u, theta, args)

    def bilevel(self, inner_solver, inner_max_steps: int) -> BilevelProblem:
        """Where the sensitivity takes forward-over-forward derivatives, implicit
        hypergradients differentiate `expand`ed data terms (`local_model`)."""
        sensitivity = self.objective.sensitivity
        local_model = FORWARD_OVER_FORWARD in sensitivity.second_order
        residual_form = self.has_residual_form() and isinstance(
            inner_solver, optx.AbstractLeastSquaresSolver
        )
        return BilevelProblem(
            self.outer_loss,
            inner_loss=None if residual_form else self.inner_loss,
            inner_residuals=self.inner_residuals if residual_form else None,
            inner_solver=inner_solver,
            inner_max_steps=inner_max_steps,
            sensitivity=sensitivity,
            kink_curvature=None if self.hierarchy.penalty is None else self.kink_curvature,
            local_model=self.local_model if local_model else None,
        )


class LocalExpansion(eqx.Module):
    r"""One individual's data terms as polynomials in its varied parameters $v$
    (`PopulationProblem.varied_names`, the first $n_u$ varying with $u$) around $v_0$:

    $$ r(v) = r_0 + J\delta + \tfrac12\delta_u^\top T_{uu}\delta_u
       + \delta_u^\top T_{u\theta}\delta_\theta, \qquad
       \mathrm{NLL}(v) = \mathrm{NLL}_0 + g^\top\delta, \qquad \delta = v - v_0, $$

    with $T = \partial^2 r/\partial v_u\,\partial v$ (`second`, omitted for a
    first-order expansion). Differentiated at $v_0$ it gives the exact value, gradient,
    Jacobian, and every second derivative of $r$ that involves $v_u$: all the
    implicit hypergradient and the Laplace objective take."""

    v0: Float[Array, " n_v"]
    residuals: Float[Array, " m"]
    jacobian: Float[Array, "m n_v"]
    second: Float[Array, "m n_u n_v"] | None
    nll: Float[Array, ""]
    nll_gradient: Float[Array, " n_v"]
    result: Any

    def __call__(self, v):
        delta = v - self.v0
        r = self.residuals + self.jacobian @ delta
        if self.second is not None:
            n_u = self.second.shape[1]
            d_u = delta[:n_u]
            r = (r + 0.5 * jnp.einsum("mij,i,j->m", self.second[:, :, :n_u], d_u, d_u)
                 + jnp.einsum("mij,i,j->m", self.second[:, :, n_u:], d_u, delta[n_u:]))
        return r, self.nll + self.nll_gradient @ delta, self.result


# ---------------------------------------------------------------------------------
# Batched hypergradient over individuals


@jax.custom_vjp
def _precomputed(theta, evaluation):
    """`evaluation = (value, gradient, aux)` computed outside at `theta`, presented as
    a function of `theta` whose reverse-mode gradient is `gradient`: optimistix's
    step then compiles without the inner fits, which run in one shared compiled
    evaluation."""
    value, _, aux = evaluation
    return value, aux


def _precomputed_forward(theta, evaluation):
    value, gradient, aux = evaluation
    return (value, aux), (gradient, evaluation)


def _precomputed_backward(residuals, cotangent):
    gradient, evaluation = residuals
    cot_value, _ = cotangent
    return (
        jax.tree.map(lambda g: cot_value * g, gradient),
        jax.tree.map(jnp.zeros_like, evaluation),
    )


_precomputed.defvjp(_precomputed_forward, _precomputed_backward)


def population_hypergradient(
    method: AbstractHypergradient, bilevel: BilevelProblem, theta, starts, data,
    chunk_size: int | None = None,
) -> Hypergradient:
    """Every individual's hypergradient (leading axis N), from `starts` (N, n_u);
    `chunk_size` individuals at a time if given (see `calibrate._batching`)."""
    train, held_out, inputs = data
    in_axes = (0, 0 if held_out is not None else None, 0 if inputs is not None else None)

    def one(start, train, held_out, inputs):
        return method.compute(bilevel, theta, (train, held_out, inputs), start)

    return map_individuals(one, (starts, train, held_out, inputs), (0, *in_axes),
                           chunk_size)


def _accepted_starts(h: Hypergradient, starts):
    """Inner solutions to warm-start from; non-finite ones would poison the next fit."""
    solved = jnp.all(jnp.isfinite(h.inner_solution), axis=-1)
    return jnp.where(solved[:, None], h.inner_solution, starts)


@with_individual_devices
@eqx.filter_jit
def _first_order_starts(starts, recorded, jacobian, usable, delta):
    r"""$u_i^* + (du_i^*/d\theta)\,\Delta\theta$ for the individuals whose start is the
    recorded solution $u_i^*$ and whose Jacobian is `usable`; the start elsewhere."""
    step = sum(
        jnp.reshape(j, (*j.shape[:2], -1)) @ jnp.reshape(d, (-1,))
        for j, d in zip(jax.tree.leaves(jacobian), jax.tree.leaves(delta))
    )
    predicted = starts + step
    same = jnp.all(starts == recorded, axis=-1) & usable
    keep = same & jnp.all(jnp.isfinite(predicted), axis=-1)
    return jnp.where(keep[:, None], predicted, starts)


class _WarmStarts:
    r"""Inner fits at $\theta'$ started from the inner solutions at $\theta$ moved to
    first order, $u^* + (du^*/d\theta)(\theta' - \theta)$ (the implicit function
    theorem, from `Implicit(solution_jacobian=True)`), instead of from $u^*$: a
    warm-started Levenberg–Marquardt fit then starts within the quadratic model's
    reach and takes fewer steps, and every lane waits for the slowest.

    Wraps `evaluate(theta, starts)`; the optimisers keep passing plain starts. An
    individual's start is moved only when it equals that individual's accepted
    solution in one of the last few evaluations (the one whose Jacobian applies)."""

    def __init__(self, evaluate, remember: int = 4):
        self._evaluate = evaluate
        self._remember = remember
        self.records: list[tuple[Any, Array, Any, Array]] = []

    @staticmethod
    def record_template(theta, starts):
        """Shapes of one record, for reading records back from a checkpoint."""
        n, k = starts.shape
        return (theta, starts,
                jax.tree.map(lambda a: jnp.zeros((n, k, *jnp.shape(a)), starts.dtype), theta),
                jnp.zeros(n, bool))

    def __call__(self, theta, starts):
        started = starts
        for recorded_theta, solutions, jacobian, usable in reversed(self.records):
            if bool(jnp.any(jnp.all(starts == solutions, axis=-1))):
                delta = jax.tree.map(lambda a, b: a - b, theta, recorded_theta)
                started = _first_order_starts(starts, solutions, jacobian, usable, delta)
                break
        e = self._evaluate(theta, started)
        h = e.hypergradients
        if h.solution_jacobian is not None:
            # Recorded as the optimisers derive their next starts, from the caller's.
            usable = jnp.asarray(h.result) == RESULTS.successful._value
            self.records.append((theta, _accepted_starts(h, starts),
                                 h.solution_jacobian, usable))
            del self.records[:-self._remember]
        return e


class _Evaluation(eqx.Module):
    value: Float[Array, ""]
    gradient: Any
    hypergradients: Hypergradient


@eqx.filter_jit
def _evaluate(method, bilevel, theta, starts, data, chunk_size) -> _Evaluation:
    h = population_hypergradient(method, bilevel, theta, starts, data, chunk_size)
    total = jnp.sum(h.outer_loss)
    gradient = jax.tree.map(lambda g: jnp.sum(g, axis=0), h.value)
    return _Evaluation(total, gradient, h)


# ---------------------------------------------------------------------------------
# Outer optimisers


class AbstractOuterOptimiser(eqx.Module):
    """Drives $\\theta$ with a host-side loop (one compiled evaluation per step, inner
    fits warm-started from the last accepted step)."""

    @abc.abstractmethod
    def run(self, evaluate, theta, starts, callback, checkpoint: Checkpoint | None = None,
            resume: bool = False, bounded: np.ndarray | None = None
            ) -> tuple[Any, Any, int, bool]:
        """Minimise; returns `(theta, starts, steps, converged)`, calling
        `callback(step, theta, objective, hypergradients)` after each step. With `checkpoint`,
        saves position and optimiser state when due; with `resume`, `theta` and
        `starts` are the checkpoint's and the optimiser continues from its state.
        `bounded` marks the entries of the flattened $\\theta$ that are logit
        coordinates of a parameter between two bounds (`Parameter.to_unconstrained`)."""


# Module-level, so that every run (new data of the same shapes, a resumed fit) reuses
# the compiled BFGS step instead of tracing a fresh closure.
@with_individual_devices
@eqx.filter_jit
def _bfgs_step(solver, theta, state, evaluation):
    return solver.step(_precomputed, theta, evaluation, {}, state, frozenset())


@with_individual_devices
@eqx.filter_jit
def _bfgs_terminate(solver, theta, state, evaluation):
    return solver.terminate(_precomputed, theta, evaluation, {}, state, frozenset())


@with_individual_devices
@eqx.filter_jit
def _bfgs_decrement(state):
    gradient = ravel_pytree(state.f_info.grad)[0]
    return 0.5 * jnp.vdot(gradient,
                          ravel_pytree(state.f_info.hessian_inv.mv(state.f_info.grad))[0])


class QuasiNewton(AbstractOuterOptimiser):
    r"""optimistix BFGS (with its backtracking line search) on the outer objective.

    Besides BFGS's own test on successive accepted steps (`rtol`, `atol`), it stops
    once the predicted decrease to the optimum, $\tfrac12 g^\top B^{-1} g$ with BFGS's
    inverse-Hessian estimate $B^{-1}$, is below `decrement_tol` (in units of the
    objective, a negative log-likelihood): the estimate is then about
    $\sqrt{2\,\text{decrement\_tol}}$ standard errors from the optimum. Near the
    optimum the objective only changes by the inner fits' noise, where line searches
    stall, so this is the test that fires. It is trusted once BFGS has taken as many
    accepted steps as $\theta$ has entries.
    """

    rtol: float = 1e-6
    atol: float = 1e-6
    decrement_tol: float = 1e-4
    max_steps: int = eqx.field(static=True, default=100)

    def run(self, evaluate, theta, starts, callback, checkpoint=None, resume=False,
            bounded=None):
        solver = optx.BFGS(rtol=self.rtol, atol=self.atol)
        if resume:
            meta = checkpoint.meta()
            scale, done = float(meta["scale"]), int(meta["step"])
            first = None
        else:
            first = evaluate(theta, starts)
            # Scaled so that the first (steepest-descent) step has unit length in θ.
            scale = 1.0 / max(1.0, float(jnp.linalg.norm(ravel_pytree(first.gradient)[0])))
            done = 0

        def packed(e, starts):
            gradient = jax.tree.map(lambda g: scale * g, e.gradient)
            return (scale * e.value, gradient, _accepted_starts(e.hypergradients, starts))

        # Resuming needs only the evaluation's structure to restore BFGS's state.
        evaluation = (packed(first, starts) if first is not None else
                      (jnp.zeros(()), jax.tree.map(jnp.zeros_like, theta), starts))
        f_struct, aux_struct = jax.eval_shape(_precomputed, theta, evaluation)
        state = solver.init(_precomputed, theta, evaluation, {}, f_struct, aux_struct,
                            frozenset())
        if resume:
            state = checkpoint.optimiser_state(state)
        size = ravel_pytree(theta)[0].size
        converged = False
        steps = done
        for steps in range(done + 1, self.max_steps + 1):
            # optimistix evaluates the objective at `state.y_eval`; do it here.
            e = first if steps == 1 else evaluate(state.y_eval, starts)
            evaluation = packed(e, starts)
            theta, state, starts = _bfgs_step(solver, theta, state, evaluation)
            callback(steps, theta, float(state.f_info.f) / scale, e.hypergradients)
            finished, result = _bfgs_terminate(solver, theta, state, evaluation)
            if bool(finished):
                converged = bool(result == optx.RESULTS.successful)
            # Scaled objective and gradient: gᵀB⁻¹g carries one factor of `scale`.
            elif (int(state.num_accepted_steps) >= size
                    and float(_bfgs_decrement(state)) / scale < self.decrement_tol):
                finished = converged = True
            if checkpoint is not None and (checkpoint.due(steps) or finished):
                checkpoint.save(steps, {"theta": theta, "starts": starts}, state,
                                {"scale": scale})
            if finished:
                break
        return theta, starts, steps, converged


def _trust_region_step(curvature: np.ndarray, gradient: np.ndarray,
                       radius: float) -> tuple[np.ndarray, float]:
    r"""The minimiser $d$ of the model $g^\top d + \tfrac12 d^\top B d$ over the ball
    $\lVert d\rVert \le \Delta$ ($B$ positive semidefinite), and the decrease the model
    predicts. Outside the ball's interior $d = -(B + \lambda I)^{-1} g$ with
    $\lVert d\rVert = \Delta$; in $B$'s eigenbasis $\lVert d(\lambda)\rVert$ decreases in
    $\lambda$, which bisection pins down."""
    if not np.any(gradient):
        return np.zeros_like(gradient), 0.0
    eigenvalues, vectors = np.linalg.eigh(curvature)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    rotated = vectors.T @ gradient
    # A singular B (a direction no individual's score varies along) leaves the model
    # unbounded there; the ball bounds it, and this floor keeps d(0) finite.
    top = float(eigenvalues.max())
    floor = 1e-12 * top
    step = lambda damping: -vectors @ (rotated / (eigenvalues + floor + damping))
    d = step(0.0) if top > 0.0 else None
    if d is None or np.linalg.norm(d) > radius:
        low, high = 0.0, float(np.linalg.norm(gradient)) / radius
        for _ in range(200):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if np.linalg.norm(step(middle)) > radius else (low, middle)
            if high - low <= 1e-12 * high:
                break
        d = step(high)
    return d, float(-(gradient @ d + 0.5 * d @ curvature @ d))


# Within this fraction of its range from a bound, a logit entry of θ counts as there.
_BOUND_TOL = 1e-6


def _scores(evaluation) -> dict:
    r"""The objective, its gradient $g$ and the curvature
    $B = \sum_i (g_i - \bar g)(g_i - \bar g)^\top$ of the individuals' hypergradients
    (non-finite entries count as zero) of an evaluation."""
    scores = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(evaluation.hypergradients.value))
    scores = np.where(np.isfinite(scores), scores, 0.0)
    centred = scores - scores.mean(axis=0)
    return {"value": jnp.asarray(float(evaluation.value)),
            "gradient": jnp.asarray(np.asarray(ravel_pytree(evaluation.gradient)[0])),
            "curvature": jnp.asarray(centred.T @ centred)}


def _score_decrement(scores: dict, flat, bounded, bound_tol: float
                     ) -> tuple[float, np.ndarray]:
    r"""$\tfrac12 g^\top B^{+} g$ over the free entries of θ (the decrease of the
    objective that $B$ still predicts), and which entries are free: a `bounded`
    (logit) entry within `bound_tol` of its range's end, whose gradient points out of
    the range, is pinned there."""
    gradient, curvature = np.asarray(scores["gradient"]), np.asarray(scores["curvature"])
    free = np.ones(gradient.size, bool)
    if bounded is not None:
        fraction = np.asarray(jax.nn.sigmoid(flat))
        free = ~(np.asarray(bounded) & (((fraction < bound_tol) & (gradient > 0))
                                        | ((fraction > 1 - bound_tol) & (gradient < 0))))
    if not (np.isfinite(float(scores["value"])) and np.all(np.isfinite(gradient))):
        return np.inf, free
    g, b = gradient[free], curvature[np.ix_(free, free)]
    decrement = float(0.5 * g @ np.linalg.lstsq(b, g, rcond=None)[0]) if g.size else 0.0
    return decrement, free


class BHHH(AbstractOuterOptimiser):
    r"""Trust-region steps with the Berndt–Hall–Hall–Hausman curvature: the spread of
    the individuals' hypergradients $g_i = dF_i/d\theta$,

    $$ B = \sum_i (g_i - \bar g)(g_i - \bar g)^\top . $$

    For `Laplace()` the outer objective $F = \sum_i F_i$ is a sum of independent
    individuals' negative log-likelihoods, and the variance of their scores estimates
    the Fisher information, the expected Hessian. So every evaluation yields a
    Newton-like curvature from the per-individual hypergradients it computes anyway,
    where BFGS must learn its Hessian from many steps (and with few steps, mistakes
    its own estimate for convergence). Centring on $\bar g$ keeps a common bias of
    the scores, away from the optimum, from posing as curvature.

    Each step minimises $g^\top d + \tfrac12 d^\top B d$ within $\lVert d\rVert \le
    \Delta$ ($\theta$'s unconstrained coordinates: a unit is an e-fold or a decade of
    a log-scale parameter) and costs one evaluation. It is accepted when the objective
    falls by more than `accept` times the predicted decrease; $\Delta$ shrinks to
    $\lVert d\rVert/4$ when the model predicted badly (ratio below 1/4) and doubles
    when it predicted well (above 3/4) at the boundary. It stops, converged, once the
    predicted decrease to the optimum, $\tfrac12 g^\top B^{+} g$, is below
    `decrement_tol` (units of the objective); or, not converged, when $\Delta$ falls
    below `min_radius`. $\Delta$ never exceeds `max_radius`.

    A fixed effect whose estimate lies at one of its bounds sits at $\pm\infty$ in
    its logit coordinate, where the objective is flat but still falls: no step gets
    there and the decrement never vanishes. Such an entry (`bounded`, within
    `bound_tol` of the bound as a fraction of its range, its gradient pointing out)
    is held where it is, and steps and the decrement use the other entries.

    Meant for `Laplace()`; for other objectives $B$ is only some positive
    semidefinite matrix, and the steps still descend. It reaches lower objectives
    than `QuasiNewton` where BFGS stops on its own inaccurate Hessian estimate, and
    in fewer steps on the populations of the tests (18 instead of 30 for 100 Boehm
    individuals), but along a practically non-identifiable parameter it keeps
    walking while the objective falls by little, into regions of parameter space
    whose solves can cost several times more (1,000 Boehm individuals,
    `benchmarks/RESULTS.md`); so it is not the default.
    """

    decrement_tol: float = 1e-4
    radius: float = 1.0
    max_radius: float = 2.0
    min_radius: float = 1e-10
    accept: float = 1e-4
    bound_tol: float = _BOUND_TOL
    max_steps: int = eqx.field(static=True, default=100)

    def run(self, evaluate, theta, starts, callback, checkpoint=None, resume=False,
            bounded=None):
        flat, unravel = ravel_pytree(theta)
        size = flat.size

        def save(step, state, finished):
            if checkpoint is not None and (checkpoint.due(step) or finished):
                checkpoint.save(step, {"theta": theta, "starts": starts}, state, {})

        if resume:
            template = {"value": jnp.zeros(()), "gradient": jnp.zeros(size),
                        "curvature": jnp.zeros((size, size)), "radius": jnp.zeros(())}
            state = checkpoint.optimiser_state(template)
            step = int(checkpoint.meta()["step"])
        else:
            e = evaluate(theta, starts)
            starts = _accepted_starts(e.hypergradients, starts)
            state, step = {**_scores(e), "radius": jnp.asarray(self.radius)}, 1
            callback(step, theta, float(state["value"]), e.hypergradients)
        decrement, free = _score_decrement(state, flat, bounded, self.bound_tol)
        converged = decrement < self.decrement_tol
        stalled = not np.isfinite(decrement)
        if not resume:
            save(step, state, converged or stalled)
        while not (converged or stalled) and step < self.max_steps:
            step += 1
            radius = float(state["radius"])
            d = np.zeros(size)
            d[free], predicted = _trust_region_step(
                np.asarray(state["curvature"])[np.ix_(free, free)],
                np.asarray(state["gradient"])[free], radius)
            trial = unravel(flat + d)
            e = evaluate(trial, starts)
            value = float(e.value)
            ratio = ((float(state["value"]) - value) / predicted
                     if np.isfinite(value) and predicted > 0 else -np.inf)
            length = float(np.linalg.norm(d))
            if ratio < 0.25:
                radius = 0.25 * length
            elif ratio > 0.75 and length > 0.99 * radius:
                radius = min(2.0 * radius, self.max_radius)
            if ratio > self.accept:
                flat, theta = flat + d, trial
                starts = _accepted_starts(e.hypergradients, starts)
                state = {**_scores(e), "radius": jnp.asarray(radius)}
                decrement, free = _score_decrement(state, flat, bounded, self.bound_tol)
                converged = decrement < self.decrement_tol
            else:
                state = {**state, "radius": jnp.asarray(radius)}
            stalled = radius < self.min_radius
            callback(step, theta, float(state["value"]), e.hypergradients)
            save(step, state, converged or stalled or step == self.max_steps)
        return theta, starts, step, converged


class FirstOrder(AbstractOuterOptimiser):
    """An optax gradient transformation (e.g. `optax.adam(0.05)`) for `steps` steps."""

    transformation: Any = None
    steps: int = eqx.field(static=True, default=200)
    gtol: float = 1e-6

    def run(self, evaluate, theta, starts, callback, checkpoint=None, resume=False,
            bounded=None):
        transformation = self.transformation or optax.adam(0.05)
        state = transformation.init(theta)
        done = 0
        if resume:
            state = checkpoint.optimiser_state(state)
            done = int(checkpoint.meta()["step"])
        update = with_individual_devices(eqx.filter_jit(
            lambda g, state, theta: transformation.update(g, state, theta)
        ))
        for step in range(done + 1, self.steps + 1):
            e = evaluate(theta, starts)
            starts = _accepted_starts(e.hypergradients, starts)
            callback(step, theta, float(e.value), e.hypergradients)
            flat, _ = ravel_pytree(e.gradient)
            if float(jnp.linalg.norm(flat)) < self.gtol:
                if checkpoint is not None:
                    checkpoint.save(step, {"theta": theta, "starts": starts}, state, {})
                return theta, starts, step, True
            updates, state = update(e.gradient, state, theta)
            theta = optax.apply_updates(theta, updates)
            if checkpoint is not None and (checkpoint.due(step) or step == self.steps):
                checkpoint.save(step, {"theta": theta, "starts": starts}, state, {})
        return theta, starts, self.steps, False


# ---------------------------------------------------------------------------------
# Results


class PopulationResult(eqx.Module):
    """Population and individual estimates of a hierarchical calibration.

    - `theta`: the outer parameters (`fixed`: unconstrained fixed effects, `mean`:
      $\\mu$ on the parameters' scales, `omega`: covariance parameters, `strength`:
      $\\log\\lambda$); `covariance_theta`: their covariance (inverse outer Hessian).
    - `population`: table of population estimates with standard errors.
    - `individual`: table of individual estimates (natural scale), convergence and
      stationarity; `eta`: random effects $\\eta_i^*$; `shrinkage`: per random effect,
      $1 - \\mathrm{sd}(\\eta^*)/\\omega$.
    - `omega`: $\\Omega$ on the parameters' scales; `history`: the outer trace.
    - `objective`: the final outer objective; for `Laplace` also `minus_two_log_likelihood`,
      `aic`, `bic`.
    - `hypergradients`: per-individual diagnostics at the estimate.
    - `score_decrement`: for `Laplace`, $\\tfrac12 g^\\top B^{+} g$ at the estimate with
      $B$ the spread of the individuals' hypergradients (as in `BHHH`; fixed effects
      pinned at a bound left out): the decrease of the objective their scores still
      predict. Far above the outer optimiser's `decrement_tol`, the optimiser stopped
      short (or a poorly determined direction is still falling). NaN otherwise.
    """

    theta: Any
    covariance_theta: np.ndarray
    population: pd.DataFrame
    individual: pd.DataFrame
    eta: np.ndarray
    shrinkage: dict[str, float]
    omega: np.ndarray
    history: pd.DataFrame
    objective: float
    minus_two_log_likelihood: float | None
    aic: float | None
    bic: float | None
    converged: bool
    outer_steps: int
    hypergradients: Hypergradient
    inner_solutions: np.ndarray
    score_decrement: float

    def estimate(self, name: str, kind: str = "mean") -> float:
        rows = self.population[(self.population.parameter == name)
                               & (self.population.kind == kind)]
        if rows.empty:
            raise KeyError(f"no population estimate {kind!r} of {name!r}")
        return float(rows.estimate.iloc[0])


# ---------------------------------------------------------------------------------
# The verb


class PopulationSetup(eqx.Module):
    """A population problem ready to evaluate: the per-individual bilevel problem,
    the batched data, the start point of $\\theta$ and of the inner fits."""

    problem: PopulationProblem
    bilevel: BilevelProblem
    batch: tuple
    theta: dict
    starts: Float[Array, "N n_u"]
    n_observations: int = eqx.field(static=True)
    individuals: tuple[str, ...] = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True, default=None)

    def evaluate(self, method: AbstractHypergradient, theta, starts) -> _Evaluation:
        """Outer objective, its gradient and every individual's hypergradient."""
        theta, starts = on_individual_devices((theta, starts))
        return _evaluate(numbers_as_arrays(method), self.bilevel, theta, starts, self.batch,
                         self.chunk_size)

    def converge_inner(self, method: AbstractHypergradient, theta, starts, rounds: int = 4):
        """Re-run the inner fits from their own solutions (up to `rounds` times) until
        every individual is stationary; returns the inner solutions."""
        for _ in range(rounds):
            h = self.evaluate(method, theta, starts).hypergradients
            starts = _accepted_starts(h, starts)
            if bool(jnp.all(h.stationary)):
                break
        return starts


def population_setup(
    model: AbstractODEModel | PEtabProblem,
    data: Dataset | None = None,
    *,
    hierarchy: Hierarchy | None = None,
    objective: AbstractPopulationObjective = Laplace(),
    start: Mapping[str, float] | None = None,
    start_sd: float | Mapping[str, float] | None = None,
    start_strength: float = 1.0,
    constants: Mapping[str, float] | None = None,
    sensitivity: AbstractSensitivity = ForwardMode(),
    integrator: Integrator | None = None,
    inner_solver: optx.AbstractLeastSquaresSolver | optx.AbstractMinimiser = (
        optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)
    ),
    inner_max_steps: int = 64,
    chunk_size: int | None = None,
) -> PopulationSetup:
    """Check the specification and build a `PopulationSetup` (arguments as for
    `calibrate_population`)."""
    reason = objective.missing(sensitivity)
    if reason is not None:
        raise ValueError(f"{reason}. Use ForwardMode or DirectDifferentiation.")
    if isinstance(model, PEtabProblem):
        require_population(model)
        if data is not None:
            raise ValueError("a PEtab problem carries its own data; pass data=None")
        petab = eqx.tree_at(lambda p: p.sensitivity, model, sensitivity)
        if integrator is not None:
            petab = eqx.tree_at(lambda p: p.integrator, petab, integrator)
        likelihood = PEtabLikelihood(petab)
        space = population_space(model)
        if hierarchy is None:
            hierarchy = Hierarchy(**population_roles(model))
        start_sd = population_start_sd(model) if start_sd is None else start_sd
        measurements, inputs = model.individual_measurements, None
        n_states, n = len(model.model.states), len(model.individual_ids)
    else:
        if data is None or hierarchy is None:
            raise TypeError("calibrate_population(model, data, hierarchy=...) needs the "
                            "data and the hierarchy of an ODE model")
        likelihood = Objective(model, integrator=integrator or Integrator(),
                               sensitivity=sensitivity)
        space = model.parameter_space
        measurements, inputs = data.measurements, data.batched_inputs(model)
        n_states, n = len(model.states), len(data)
    start_sd = 0.3 if start_sd is None else start_sd
    roles = [*hierarchy.random, *hierarchy.fixed, *hierarchy.individual]
    for name in roles:
        space[name]  # raises ParameterError naming an unknown parameter
    if hierarchy.penalty is not None and isinstance(objective, Laplace):
        raise ValueError(
            "a learned penalty strength needs held-out data: use ValidationLoss, not Laplace"
        )
    start_values = space.complete({**(constants or {}), **(start or {})})
    constant_values = {n: v for n, v in start_values.items() if n not in roles}
    problem = PopulationProblem(likelihood, space, hierarchy, objective, constant_values)

    k = len(hierarchy.random)
    sd = np.array([
        float(start_sd[n]) if isinstance(start_sd, Mapping) else float(start_sd)
        for n in hierarchy.random
    ])
    theta: dict[str, Array] = {}
    if hierarchy.fixed:
        theta["fixed"] = jnp.stack([space[n].to_unconstrained(start_values[n])
                                    for n in hierarchy.fixed])
    if k:
        theta["mean"] = jnp.stack([space[n].to_scaled(start_values[n])
                                   for n in hierarchy.random])
        theta["omega"] = jnp.asarray(hierarchy.covariance.initial(sd))
    if hierarchy.penalty is not None:
        theta["strength"] = jnp.asarray(math.log(start_strength))

    if isinstance(objective, ValidationLoss):
        train, held_out = holdout_split(measurements, objective.fraction, objective.seed)
    else:
        train, held_out = measurements, None
    individual_start = (
        jnp.stack([space[name].to_unconstrained(start_values[name])
                   for name in hierarchy.individual])
        if hierarchy.individual else jnp.zeros(0)
    )
    u0 = jnp.concatenate([jnp.zeros(k), individual_start])
    if chunk_size is None:
        n_u = int(u0.size)
        rows = int(np.prod(train.mask.shape[1:])) * 2 + n_u
        # The hypergradient's solves carry (1 + n_v)(1 + n_u) tangents (`expand`): with
        # an implicit solver each is a right-hand side of its triangular solves.
        n_v = len(problem.varied_names)
        solves = (petab.integrator if isinstance(model, PEtabProblem)
                  else likelihood.integrator).tangent_solves()
        tangents = (n_states**2 * (1 + n_v) * (1 + n_u),) if solves else ()
        chunk_size = default_chunk_size(n, *fit_kernel_flops(n_states, rows, n_u, solves),
                                        *tangents)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    return PopulationSetup(
        problem=problem,
        bilevel=problem.bilevel(inner_solver, inner_max_steps),
        batch=(train, held_out, inputs),
        theta=theta,
        starts=jnp.broadcast_to(u0, (n, u0.size)),
        n_observations=int(np.sum(np.asarray(train.mask))),
        individuals=tuple(model.individual_ids if data is None else data.individuals),
        chunk_size=chunk_size,
    )


def calibrate_population(
    model: AbstractODEModel | PEtabProblem,
    data: Dataset | None = None,
    *,
    hierarchy: Hierarchy | None = None,
    objective: AbstractPopulationObjective = Laplace(),
    start: Mapping[str, float] | None = None,
    start_sd: float | Mapping[str, float] | None = None,
    start_strength: float = 1.0,
    constants: Mapping[str, float] | None = None,
    hypergradient: AbstractHypergradient = Implicit(curvature=ForwardHessian()),
    sensitivity: AbstractSensitivity = ForwardMode(),
    integrator: Integrator | None = None,
    inner_solver: optx.AbstractLeastSquaresSolver | optx.AbstractMinimiser = (
        optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)
    ),
    inner_max_steps: int = 64,
    chunk_size: int | None = None,
    outer: AbstractOuterOptimiser = QuasiNewton(),
    standard_errors: bool = True,
    cold_start_rounds: int = 4,
    callback=None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
) -> PopulationResult:
    """Calibrate a population model to `data` (see the module docstring for the maths).

    **Arguments:**

    - `model`, `data`: the ODE model and a `Dataset` of N individuals; or a
      `PEtabProblem` with the population extension (`calibrate._petab_population`)
      and no `data`: its tables give the individuals, the hierarchy and the starts.
    - `hierarchy`: the role of each parameter (`Hierarchy(random=..., fixed=..., ...)`).
    - `objective`: `Laplace()` (default) or `ValidationLoss(fraction)`.
    - `start`: natural-scale start values of fixed effects and population means
      (default: parameter defaults); `start_sd`: start standard deviation(s) of the
      random effects on their scale (default 0.3); `start_strength`: start penalty strength.
    - `constants`: values of the parameters with no role (default: their defaults).
    - `hypergradient`: outer-gradient strategy, checked against `sensitivity` now.
      `Implicit` runs with `solution_jacobian=True`: each inner fit starts at its last
      solution moved to first order in the change of θ.
    - `sensitivity`, `integrator`: derivatives and ODE solves of the inner problem
      (`integrator=None`: `Integrator()`, or the PEtab problem's own).
    - `inner_solver`, `inner_max_steps`: the per-individual MAP fit. Warm-started fits
      need few steps; a trust-region solver started at its own optimum rejects every
      step (the loss only changes by round-off) and runs to `max_steps`, so this limit
      is kept small and stationarity is judged by the hypergradient's Newton-step test.
      The first fits, from a cold start, are repeated up to `cold_start_rounds` times
      until every individual is stationary.
    - `chunk_size`: individuals per `vmap`ped chunk (`None`: all at once on GPU; on
      CPU, chunks small enough that jaxlib's batched LAPACK kernels stay on one thread,
      see `calibrate._batching`).
    - `outer`: `QuasiNewton()` (optimistix BFGS, default), `BHHH()` (trust-region
      steps with the individuals' score spread as curvature, for `Laplace()`) or
      `FirstOrder(optax...)`.
    - `standard_errors`: compute the outer Hessian by forward differences of the
      hypergradient (dim θ extra evaluations).
    - `callback(step, theta, objective, hypergradients)`: called after every outer step
      with the per-individual diagnostics (`Hypergradient`: stationarity, result, ...)
      of the step's evaluation.
    - `checkpoint`: a `Checkpoint(path, every)`: the outer loop saves θ, the inner
      solutions, the optimiser's state and the history when due; with `resume=True` it
      continues from that file and reaches the result the uninterrupted run reaches.
    """
    check_supported(hypergradient, sensitivity)
    setup = population_setup(
        model, data, hierarchy=hierarchy, objective=objective, start=start,
        start_sd=start_sd, start_strength=start_strength, constants=constants,
        sensitivity=sensitivity, integrator=integrator, inner_solver=inner_solver,
        inner_max_steps=inner_max_steps, chunk_size=chunk_size,
    )
    if isinstance(hypergradient, Implicit):
        hypergradient = dataclasses.replace(hypergradient, solution_jacobian=True)
    evaluate = _WarmStarts(lambda theta, starts: setup.evaluate(hypergradient, theta, starts))
    history = []

    def record(step, theta, value, hypergradients):
        history.append({"step": step, "objective": value})
        if callback is not None:
            callback(step, theta, value, hypergradients)

    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs a `checkpoint`")
        position = checkpoint.position({"theta": setup.theta, "starts": setup.starts})
        theta, starts = position["theta"], position["starts"]
        meta = checkpoint.meta()
        history.extend(meta.get("history", []))
        template = evaluate.record_template(setup.theta, setup.starts)
        records = checkpoint.attachment((template,) * int(meta.get("warm_starts", 0)))
        evaluate.records = list(records or ())
    else:
        theta = setup.theta
        starts = setup.converge_inner(hypergradient, theta, setup.starts, cold_start_rounds)
    if checkpoint is not None:
        # The optimisers save position and state; the history and the warm-start
        # records ride along, so a resumed run starts its inner fits where the
        # uninterrupted one would.
        checkpoint = checkpoint.with_meta(
            lambda: {"history": history, "warm_starts": len(evaluate.records)}
        ).with_attachment(lambda: tuple(evaluate.records))
    bounded = setup.problem.bounded(theta)
    theta, starts, steps, converged = outer.run(evaluate, theta, starts, record,
                                                checkpoint=checkpoint, resume=resume,
                                                bounded=bounded)
    final = evaluate(theta, starts)
    h = final.hypergradients
    flat_theta, _ = ravel_pytree(theta)
    score_decrement = (_score_decrement(_scores(final), flat_theta, bounded, _BOUND_TOL)[0]
                       if isinstance(objective, Laplace) else np.nan)
    covariance = np.full((flat_theta.size, flat_theta.size), np.nan)
    if standard_errors:
        covariance = _outer_covariance(evaluate, theta, h.inner_solution, final.gradient)
    return _result(setup.problem, setup.individuals, theta, covariance, final, h,
                   history, steps, converged, setup.n_observations, score_decrement)


def _outer_covariance(evaluate, theta, starts, gradient) -> np.ndarray:
    """Inverse of the outer Hessian, by forward differences of the hypergradient
    from its value `gradient` at `theta`: their O(h) error, at a relative step of
    1e-4, is far below what a standard error's few digits need, at half the
    evaluations of central differences."""
    flat, unravel = ravel_pytree(theta)
    m = flat.size
    base = np.asarray(ravel_pytree(gradient)[0])
    hessian = np.zeros((m, m))
    for j in range(m):
        h = 1e-4 * max(1.0, abs(float(flat[j])))
        e = evaluate(unravel(flat.at[j].add(h)), starts)
        hessian[:, j] = (np.asarray(ravel_pytree(e.gradient)[0]) - base) / h
    hessian = 0.5 * (hessian + hessian.T)
    try:
        return np.linalg.inv(hessian)
    except np.linalg.LinAlgError:
        return np.full((m, m), np.nan)


def _delta_se(fn, value, se):
    """Standard error of fn(x) at x = value by the delta method."""
    derivative = float(jax.grad(fn)(jnp.asarray(value, float)))
    return abs(derivative) * se


def _result(problem, individuals, theta, covariance, final, h, history, steps, converged,
            n_observations, score_decrement) -> PopulationResult:
    hierarchy = problem.hierarchy
    space = problem.space
    flat, _ = ravel_pytree(theta)
    se_flat = np.sqrt(np.clip(np.diag(covariance), 0, None))
    # Offsets of each block of theta in the flat vector (ravel_pytree sorts dict keys).
    offsets, position = {}, 0
    for key in sorted(theta):
        offsets[key] = position
        position += int(np.size(theta[key]))
    rows = []
    for j, name in enumerate(hierarchy.fixed):
        p = space[name]
        z = float(theta["fixed"][j])
        se = se_flat[offsets["fixed"] + j]
        rows.append({"parameter": name, "kind": "fixed",
                     "estimate": float(p.from_unconstrained(z)),
                     "se": _delta_se(p.from_unconstrained, z, se), "scale": p.scale})
    k = problem.n_random
    chol = np.asarray(problem.cholesky(theta)) if k else np.zeros((0, 0))
    omega = chol @ chol.T
    for j, name in enumerate(hierarchy.random):
        p = space[name]
        mu = float(theta["mean"][j])
        se = se_flat[offsets["mean"] + j]
        rows.append({"parameter": name, "kind": "mean", "estimate": float(p.from_scaled(mu)),
                     "se": _delta_se(p.from_scaled, mu, se), "scale": p.scale})
        rows.append({"parameter": name, "kind": "mean_scaled", "estimate": mu, "se": se,
                     "scale": p.scale})
    if k:
        sd = np.sqrt(np.diag(omega))
        for j, name in enumerate(hierarchy.random):
            log_sd = float(theta["omega"][j])
            se = se_flat[offsets["omega"] + j]
            # For a full Ω the sd also depends on the off-diagonal entries of L.
            rows.append({"parameter": name, "kind": "sd", "estimate": float(sd[j]),
                         "se": _delta_se(jnp.exp, log_sd, se)
                         if isinstance(hierarchy.covariance, DiagonalCovariance) else np.nan,
                         "scale": space[name].scale})
    if "strength" in theta:
        log_strength = float(theta["strength"])
        se = se_flat[offsets["strength"]]
        rows.append({"parameter": "penalty", "kind": "strength",
                     "estimate": math.exp(log_strength),
                     "se": _delta_se(jnp.exp, log_strength, se), "scale": "log"})
    population = pd.DataFrame(rows, columns=["parameter", "kind", "estimate", "se", "scale"])

    u = np.asarray(h.inner_solution)
    params = jax.vmap(problem.params, in_axes=(0, None))(jnp.asarray(u), theta)
    individual = pd.DataFrame({"individual": list(individuals)})
    for name in [*hierarchy.random, *hierarchy.fixed, *hierarchy.individual]:
        individual[name] = np.asarray(params[name])
    individual["stationarity"] = np.asarray(h.stationarity)
    individual["status"] = [result_name(c) for c in np.asarray(h.result)]
    individual["outer_loss"] = np.asarray(h.outer_loss)
    eta = u[:, :k]
    shrinkage = {}
    if k:
        sd = np.sqrt(np.diag(omega))
        for j, name in enumerate(hierarchy.random):
            shrinkage[name] = float(1 - np.std(eta[:, j], ddof=1) / sd[j]) if len(u) > 1 \
                else math.nan
    value = float(final.value)
    laplace = isinstance(problem.outer, Laplace)
    m = flat.size
    return PopulationResult(
        theta=theta,
        covariance_theta=covariance,
        population=population,
        individual=individual,
        eta=eta,
        shrinkage=shrinkage,
        omega=omega,
        history=pd.DataFrame(history),
        objective=value,
        minus_two_log_likelihood=2 * value if laplace else None,
        aic=2 * value + 2 * m if laplace else None,
        bic=2 * value + m * math.log(n_observations) if laplace else None,
        converged=converged,
        outer_steps=steps,
        hypergradients=h,
        inner_solutions=u,
        score_decrement=score_decrement,
    )
