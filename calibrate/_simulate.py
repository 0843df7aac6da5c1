r"""Simulation: solve $\dot x = f(t, x, p, u(t))$ and evaluate observables at given times."""

from __future__ import annotations

from collections.abc import Mapping

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int

from ._inputs import AbstractInput
from ._model import AbstractODEModel, check_state_shape
from ._parameters import Params
from ._results import RESULTS
from ._rosenbrock import Rodas5
from ._sensitivity import AbstractSensitivity, ForwardMode


class _FiniteChord(optx.Chord):
    """Chord-Newton whose failed solves return a finite value.

    A diverged Newton solve inside a trial step returns inf; diffrax then rejects the
    step, but forward-mode sensitivities still differentiate that root (implicit
    function theorem, a linear solve that raises on non-finite input even with
    `throw=False`). Returning zeros keeps the rejected step harmless.
    """

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        y, aux, stats = super().postprocess(fn, y, aux, args, options, state, tags, result)
        y = jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), y)
        return y, aux, stats


def kvaerno5_chord(rtol: float, atol: float) -> dfx.AbstractSolver:
    """Kvaerno5 whose Newton iterations stop at 1% of the step tolerances.

    The ESDIRK alternative to the default `Rodas5` (`Integrator(solver=kvaerno5_chord(
    rtol, atol))`, `[ode] solver = "kvaerno5"`): it evaluates the Jacobian of the vector
    field only inside the chord iterations, so its forward-mode gradients take no
    second derivatives of the vector field.

    diffrax's default root finder (`VeryChord` at the controller's own tolerances)
    declares divergence on about half the steps of our zoo models and rejects them:
    on the MAPK cascade at rtol=1e-8 that is ~4,500 steps against ~490 with this chord
    method. The rejections make diffrax's default more accurate than asked (error
    2e-9 against our 8e-8 at rtol 1e-8); asking this solver for 100x tighter
    tolerances still costs 2.9–5.6x less time (benchmarks/RESULTS.md).
    Below ~1e-13 relative, Newton corrections drown in round-off and never "converge",
    so the Newton tolerances have floors.
    """
    root_finder = _FiniteChord(rtol=max(rtol * 1e-2, 1e-12), atol=max(atol * 1e-2, 1e-14))
    return dfx.Kvaerno5(root_finder=root_finder)


class Integrator(eqx.Module):
    """How to solve the ODE: solver, tolerances and step limits.

    The default (`solver=None`) is `Rodas5`, an L-stable Rosenbrock method of order 5
    with one exact Jacobian and no Newton iterations per step, under a PID controller;
    it handles stiff biochemical kinetics. On the zoo and PEtab benchmark models it
    computes likelihoods 1.6–17x and forward-mode gradients up to 4x faster than
    Kvaerno5 with chord Newton iterations (`kvaerno5_chord`), as accurately or more
    (`benchmarks/RESULTS_solvers.md`). Explicit solvers (`diffrax.Tsit5()`) are faster
    on non-stiff models but can stall where a fit visits stiff regions.
    """

    solver: dfx.AbstractSolver | None = None
    rtol: float = eqx.field(static=True, default=1e-8)
    atol: float = eqx.field(static=True, default=1e-10)
    max_steps: int = eqx.field(static=True, default=20_000)
    dt0: float | None = eqx.field(static=True, default=None)
    dtmin: float | None = eqx.field(static=True, default=None)

    def ode_solver(self) -> dfx.AbstractSolver:
        if self.solver is None:
            return Rodas5()
        return self.solver

    def tangent_solves(self) -> bool:
        """Whether forward tangents are right-hand sides of the solver's batched LAPACK
        solves (an implicit solver's Newton iterations), which `calibrate._batching`
        must count when it sizes CPU chunks; `Rodas5` applies an explicit inverse."""
        return not isinstance(self.ode_solver(), Rodas5)

    def settings(self) -> dict:
        """The solver's name, tolerances and step limit, for run records and reports."""
        solver = self.ode_solver()
        name = type(solver).__name__
        if isinstance(getattr(solver, "root_finder", None), _FiniteChord):
            name += " (chord Newton)"
        return {"solver": name, "rtol": self.rtol, "atol": self.atol,
                "max_steps": self.max_steps}

    def controller(self, jump_ts) -> dfx.AbstractStepSizeController:
        pid = dfx.PIDController(
            rtol=self.rtol,
            atol=self.atol,
            dtmin=self.dtmin,
            force_dtmin=self.dtmin is None,
        )
        if jump_ts is None or jump_ts.shape[0] == 0:
            return pid
        return dfx.ClipStepSizeController(pid, jump_ts=jump_ts)


class Trajectory(eqx.Module):
    """States and observables at the requested times, and whether the solve succeeded.

    On failure `result` says why (max steps, step size collapse, non-finite state) and
    the arrays hold what diffrax returned (inf past the failure point).
    """

    times: Float[Array, " T"]
    states: Float[Array, "T n_states"]
    observables: Float[Array, "T n_observables"]
    result: RESULTS
    num_steps: Int[Array, ""]

    @property
    def ok(self):
        return self.result == RESULTS.successful


def _jump_times(model: AbstractODEModel, params: Params, inputs: Mapping[str, AbstractInput]):
    jumps = [inp.discontinuities for inp in inputs.values()]
    jumps.append(jnp.asarray(model.discontinuities(params), dtype=float))
    jumps = [j for j in jumps if j.shape[0] > 0]
    if not jumps:
        return None
    # Where the solver steps carries no derivative (and adjoints cannot take one).
    return jax.lax.stop_gradient(jnp.sort(jnp.concatenate(jumps)))


def _solve(model, params, initial_state, inputs, integrator, sensitivity, *, t1, saveat,
           event=None):
    """`diffeqsolve` of the model from `model.t0` to `t1`, never raising."""
    if inputs is None:
        inputs = model.default_inputs()
    x0 = model.initial_state(params) if initial_state is None else initial_state
    check_state_shape(model, x0)
    return dfx.diffeqsolve(
        dfx.ODETerm(model.vector_field),
        integrator.ode_solver(),
        t0=model.t0,
        t1=t1,
        dt0=integrator.dt0,
        y0=x0,
        args=(params, dict(inputs)),
        saveat=saveat,
        stepsize_controller=integrator.controller(_jump_times(model, params, inputs)),
        adjoint=sensitivity.adjoint(),
        event=event,
        max_steps=integrator.max_steps,
        throw=False,
    )


def simulate(
    model: AbstractODEModel,
    params: Params,
    times: Float[Array, " T"],
    *,
    inputs: Mapping[str, AbstractInput] | None = None,
    integrator: Integrator = Integrator(),
    sensitivity: AbstractSensitivity = ForwardMode(),
    initial_state: Float[Array, " n_states"] | None = None,
) -> Trajectory:
    """Solve the model from `model.t0` and save at `times` (non-decreasing, >= t0).

    **Arguments:**

    - `params`: all parameters by name (e.g. `model.parameter_space.complete(...)`).
    - `times`: observation times; repeated times are allowed (padding).
    - `inputs`: $u(t)$ by name; defaults to `model.default_inputs()`.
    - `integrator`: solver, tolerances, `max_steps`.
    - `sensitivity`: how derivatives flow through the solve (see `ForwardMode`, ...).
    - `initial_state`: $x(t_0)$ instead of `model.initial_state(params)` (e.g. a
      pre-equilibrated steady state).

    Never raises on a failed solve: check `Trajectory.result`. jit- and vmap-safe.
    """
    times = jnp.asarray(times, dtype=float)
    solution = _solve(
        model, params, initial_state, inputs, integrator, sensitivity,
        t1=jnp.maximum(times[-1], model.t0), saveat=dfx.SaveAt(ts=times),
    )
    states = solution.ys
    result = RESULTS.promote(solution.result)
    finite = jnp.all(jnp.isfinite(states))
    result = RESULTS.where(
        (result == RESULTS.successful) & ~finite, RESULTS.nonfinite_state, result
    )
    observables = jax.vmap(lambda t, x: model.observe(t, x, params))(times, states)
    return Trajectory(
        times=times,
        states=states,
        observables=observables,
        result=result,
        num_steps=solution.stats["num_steps"],
    )


# Horizon of a steady-state search: far beyond any biological time scale; the solve
# ends at the steady-state event long before.
STEADY_STATE_HORIZON = 1e9


def steady_state(
    model: AbstractODEModel,
    params: Params,
    *,
    initial_state: Float[Array, " n_states"] | None = None,
    inputs: Mapping[str, AbstractInput] | None = None,
    integrator: Integrator = Integrator(),
    sensitivity: AbstractSensitivity = ForwardMode(),
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> tuple[Float[Array, " n_states"], RESULTS]:
    r"""Integrate from `model.t0` until $\lVert f(x)\rVert_2 < atol + rtol\,\lVert x\rVert_2$.

    Integration (not Newton) handles conservation laws, whose Jacobian is singular.
    The result is differentiable (the event time carries no derivative at a steady
    state; tested in forward mode). Returns the state and the solve's result.
    """
    norm = lambda y: jnp.sqrt(jnp.sum(y**2))
    solution = _solve(
        model, params, initial_state, inputs, integrator, sensitivity,
        t1=STEADY_STATE_HORIZON, saveat=dfx.SaveAt(t1=True),
        event=dfx.Event(dfx.steady_state_event(rtol=rtol, atol=atol, norm=norm)),
    )
    state = solution.ys[-1]
    result = RESULTS.promote(solution.result)
    # The event ending the solve is success; reaching the horizon without it is not.
    result = RESULTS.where(
        result == RESULTS.successful, RESULTS.no_steady_state, result
    )
    result = RESULTS.where(
        result == RESULTS.event_occurred, RESULTS.successful, result
    )
    result = RESULTS.where(
        (result == RESULTS.successful) & ~jnp.all(jnp.isfinite(state)),
        RESULTS.nonfinite_state, result,
    )
    return state, result
