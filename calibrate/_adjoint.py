r"""The continuous adjoint of an ODE solve, integrated against the stored forward solution.

For $\dot x = f(t, x, \theta)$ and a loss $L$ of the states saved at
$t_0 \le t_1 \le \dots \le t_N$, the gradient is carried by the adjoint ODE

$$ \dot\lambda = -(\partial f/\partial x)^\top \lambda, \qquad
   \dot\mu = -(\partial f/\partial \theta)^\top \lambda, $$

integrated from $t_N$ back to $t_0$ from $\lambda = \mu = 0$, with $\lambda$ jumping by
$\partial L/\partial x(t_i)$ at each save time; then $\nabla_{x_0} L = \lambda(t_0)$ and
$\nabla_\theta L = \mu(t_0)$.

`diffrax.BacksolveAdjoint` integrates $x$ backwards alongside $(\lambda, \mu)$. For a
dissipative stiff system that is unstable: modes that decay fast forwards grow fast
backwards, and the backward solve runs out of steps. Here, as in CVODES, $x(t)$ is read
from a dense forward solve (recomputed in the backward pass) and only the linear
$(\lambda, \mu)$ system is integrated backwards, which is as stable as the forward solve.
"""

from __future__ import annotations

import functools as ft
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from diffrax._adjoint import _nondiff_solver_controller_state, _only_transpose_ys
from diffrax._saveat import save_y
from jax.flatten_util import ravel_pytree


class AdjointStageRoot(optx.AbstractRootFinder):
    r"""Exact solve of an implicit Runge–Kutta stage of the adjoint system, in one step.

    The stage equation $F(k_\lambda, k_\mu) = 0$ is affine, because the adjoint system is
    linear, and $k_\mu$ enters only as $\pm k_\mu$, because $\mu$ does not feed back. So
    one Newton step on the $\lambda$ block (an $n_x \times n_x$ Jacobian from `jacfwd`)
    followed by one on the $\mu$ block (diagonal Jacobian, from one `jvp`) solves it
    exactly, at a cost independent of the number of parameters. The chord methods of the
    forward solver either take minutes to compile here (`optimistix.Chord`) or reject
    about half the steps (diffrax's `VeryChord`).

    Only valid for the adjoint state `(λ, μ_args, μ_terms)` of `InterpolatedAdjoint`.
    """

    # Unused: the step is exact, there is nothing to converge.
    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable = optx.max_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return jnp.array(0)

    def step(self, fn, y, args, options, state, tags):
        lam, mu = y[0], y[1:]
        flat_lam, unravel = ravel_pytree(lam)

        def lam_residual(flat):
            out, _ = fn((unravel(flat), *mu), args)
            return ravel_pytree(out[0])[0]

        jac = jax.jacfwd(lam_residual)(flat_lam)
        lam = unravel(flat_lam - jnp.linalg.solve(jac, lam_residual(flat_lam)))

        def mu_residual(mu):
            out, aux = fn((lam, *mu), args)
            return out[1:], aux

        ones = jtu.tree_map(jnp.ones_like, mu)
        residual, diagonal, aux = jax.jvp(mu_residual, (mu,), (ones,), has_aux=True)
        mu = jtu.tree_map(lambda m, r, d: m - r / d, mu, residual, diagonal)
        return (lam, *mu), state + 1, aux

    def terminate(self, fn, y, args, options, state, tags):
        finite = jnp.all(jnp.isfinite(ravel_pytree(y)[0]))
        result = optx.RESULTS.where(
            finite, optx.RESULTS.successful, optx.RESULTS.nonlinear_divergence
        )
        return state > 0, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


def _adjoint_vector_field(t, adjoint, context):
    r"""$(-(\partial f/\partial x)^\top\lambda, -(\partial f/\partial\theta)^\top\lambda)$
    at the forward state $x(t)$; $\theta$: the inexact arrays of `args` and `terms`."""
    forward, args, terms, unit = context
    # ESDIRK stages can lie past the end of a step (Kvaerno5: c = 1.23), so the last
    # backward step samples slightly before t0, outside the dense output: extend linearly.
    inside = jnp.clip(t, forward.t0, forward.t1)
    x = jtu.tree_map(
        lambda y, dy: y + (t - inside) * dy,
        forward.evaluate(inside),
        forward.derivative(inside),
    )
    diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
    diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)

    def f(x, diff_args, diff_terms):
        term = eqx.combine(diff_terms, static_terms)
        # `unit` = ±1: diffrax's time-reversal wrapper puts the sign in the control.
        return term.vf_prod(t, x, eqx.combine(diff_args, static_args), unit)

    _, vjp = jax.vjp(f, x, diff_args, diff_terms)
    return jtu.tree_map(jnp.negative, vjp(adjoint[0]))


def _materialise(y, grad):
    return jnp.zeros_like(y) if grad is None else grad


@eqx.filter_custom_vjp
def _loop(y__args__terms, *, self, throw, init_state, **kwargs):
    del throw
    y, args, terms = y__args__terms
    init_state = eqx.tree_at(lambda s: s.y, init_state, y)
    return self._loop(
        args=args,
        terms=terms,
        init_state=init_state,
        inner_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        outer_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        **kwargs,
    )


@_loop.def_fwd
def _loop_fwd(perturbed, y__args__terms, **kwargs):
    del perturbed
    final_state, aux_stats = _loop(y__args__terms, **kwargs)
    save_state = final_state.save_state
    return (final_state, aux_stats), (save_state.ts, save_state.ys)


@_loop.def_bwd
def _loop_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__args__terms,
    *,
    self,
    solver,
    stepsize_controller,
    event,
    saveat,
    t0,
    t1,
    dt0,
    max_steps,
    throw,
    init_state,
    progress_meter,
):
    del perturbed, event, saveat, throw, init_state, progress_meter
    ts, ys = residuals
    grad_ys = grad_final_state__aux_stats[0].save_state.ys
    # Save slots a failed solve never reached hold constants (inf): no gradient flows
    # through them, whatever their cotangent (often NaN = 0 * inf).
    reached = jnp.isfinite(ts)
    grad_ys = jtu.tree_map(
        lambda y, g: jnp.where(
            reached.reshape(reached.shape + (1,) * (y.ndim - 1)), _materialise(y, g), 0.0
        ),
        ys,
        grad_ys,
    )
    y0, args, terms = y__args__terms
    # Nothing below is differentiated: plain `lax` loops (`ForwardMode`) are the
    # cheapest to compile.
    common = dict(
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        throw=False,
        adjoint=dfx.ForwardMode(),
    )
    forward = self._diffeqsolve(
        terms, solver, t0, t1, dt0, y0, args, saveat=dfx.SaveAt(dense=True), **common
    )
    # `terms` is diffrax's time-reversal wrapper; its control over a unit interval is the
    # sign that turns its vector field into the one in (normalised) time.
    context = (forward.interpolation, args, terms, terms.contr(0.0, 1.0))
    adjoint_term = dfx.ODETerm(_adjoint_vector_field)

    def zeros(tree):
        return jtu.tree_map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))

    # Backward solves only where they can succeed: after a failed forward solve, or from
    # a non-finite cotangent, they would run to `max_steps` on NaN. A zero cotangent
    # has a zero gradient.
    leaves = jtu.tree_leaves(grad_ys)
    nonzero = jnp.any(jnp.stack([jnp.any(g != 0) for g in leaves]))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
    run = nonzero & finite & (forward.result == dfx.RESULTS.successful)

    def backward(carry, segment):
        (lam, *mu), ok = carry
        start, end, grad_y = segment
        adjoint = (jtu.tree_map(jnp.add, lam, grad_y), *mu)
        solution = self._diffeqsolve(
            adjoint_term,
            self.solver,
            end,
            start,
            None if dt0 is None else -dt0,
            adjoint,
            context,
            saveat=dfx.SaveAt(t1=True),
            **common,
        )
        adjoint = jtu.tree_map(lambda a: a[0], solution.ys)
        return (adjoint, ok & (solution.result == dfx.RESULTS.successful)), None

    # One backward solve per interval between save times (the last one from the first
    # save time back to t0), restarted after each jump of λ.
    t0 = jnp.asarray(t0, ts.dtype)
    starts = jnp.where(run, jnp.concatenate([t0[None], ts[:-1]]), t0)
    ends = jnp.where(run, ts, t0)
    (adjoint, ok), _ = jax.lax.scan(
        backward,
        ((zeros(y0), zeros(args), zeros(terms)), jnp.asarray(True)),
        (starts, ends, grad_ys),
        reverse=True,
    )
    # A failed solve never gives a silently wrong gradient, but NaN. Per lane: under
    # `vmap`, `eqx.error_if` would turn every lane into NaN.
    failed = nonzero & ~(run & ok)
    return jtu.tree_map(lambda a: jnp.where(failed, jnp.nan, a), adjoint)


class InterpolatedAdjoint(dfx.AbstractAdjoint):
    """Reverse-mode derivatives of `diffrax.diffeqsolve` from the continuous adjoint ODE,
    integrated backwards by `solver` against a dense forward solve (see the module
    docstring). Supports ODEs saved with `SaveAt(t0=, t1=, ts=)`; memory is that of the
    dense forward solution (O(max_steps)). Inputs with jumps are respected through the
    step-size controller's `jump_ts`, which the backward solves share.
    """

    solver: dfx.AbstractSolver = dfx.Kvaerno5(root_finder=AdjointStageRoot())

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        saveat,
        init_state,
        passed_solver_state,
        passed_controller_state,
        event,
        **kwargs,
    ):
        subs = saveat.subs
        if (
            not isinstance(subs, dfx.SubSaveAt)
            or saveat.dense
            or subs.steps
            or subs.fn is not save_y
        ):
            raise NotImplementedError(
                "`InterpolatedAdjoint` supports only `SaveAt(t0=, t1=, ts=)` of the state."
            )
        if event is not None:
            raise NotImplementedError("`InterpolatedAdjoint` does not support events.")
        if not isinstance(getattr(terms, "term", None), dfx.ODETerm):
            raise NotImplementedError("`InterpolatedAdjoint` supports only `ODETerm`s.")
        y = init_state.y
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        init_state = _nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        final_state, aux_stats = _loop(
            (y, args, terms),
            self=self,
            saveat=saveat,
            init_state=init_state,
            solver=solver,
            event=event,
            **kwargs,
        )
        return _only_transpose_ys(final_state), aux_stats
