"""Rodas5: fifth-order convergence, stiff accuracy against Kvaerno5, and exact
derivatives through its steps."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibrate as cal


def _exact(t):
    """y' = -2y + sin t, y(0) = 1."""
    return 1.2 * np.exp(-2 * t) + (2 * np.sin(t) - np.cos(t)) / 5


@jax.jit
def _fixed_steps(dt):
    term = dfx.ODETerm(lambda t, y, args: -2 * y + jnp.sin(t))
    solution = dfx.diffeqsolve(term, cal.Rodas5(), 0.0, 2.0, dt, jnp.array([1.0]),
                               stepsize_controller=dfx.ConstantStepSize(),
                               saveat=dfx.SaveAt(t1=True), max_steps=256)
    return solution.ys[-1, 0]


def test_converges_with_order_five_on_a_non_autonomous_problem():
    errors = [abs(float(_fixed_steps(2.0 / n)) - _exact(2.0)) for n in (10, 20, 40, 80)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    # The time-derivative term matters: without it the order drops below two.
    assert np.all(orders > 4.8), orders
    assert errors[-1] < 2e-12


@jax.jit
def _fixed_steps_at(dt, times):
    term = dfx.ODETerm(lambda t, y, args: -2 * y + jnp.sin(t))
    solution = dfx.diffeqsolve(term, cal.Rodas5(), 0.0, 2.0, dt, jnp.array([1.0]),
                               stepsize_controller=dfx.ConstantStepSize(),
                               saveat=dfx.SaveAt(ts=times), max_steps=256)
    return solution.ys[:, 0]


def _oscillator_with_a_stiff_mode(t, y, args):
    return jnp.stack([-y[1], y[0], -50.0 * y[2]])


def test_dense_output_is_as_accurate_as_the_steps():
    """Rodas5's own continuous extension: between steps the solution is as accurate
    as at their ends, with interpolation error of order four. (The cubic Hermite
    interpolant it replaced was 160x less accurate between the steps of the adaptive
    solve below.)"""
    errors = []
    for n in (10, 20, 40, 80):
        # The midpoint of every step, padded to one shape with the end point.
        times = np.full(80, 2.0)
        times[:n] = (np.arange(n) + 0.5) * 2.0 / n
        values = np.asarray(_fixed_steps_at(2.0 / n, times))
        errors.append(float(np.max(np.abs(values - _exact(times)))))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 3.8), orders
    assert errors[-1] < 1e-9, errors

    times = jnp.linspace(0.0, 3.0, 301)
    exact = np.stack([np.cos(times), np.sin(times), np.exp(-50 * times)], axis=1)
    kwargs = dict(stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
                  max_steps=10_000)
    term = dfx.ODETerm(_oscillator_with_a_stiff_mode)
    start = jnp.array([1.0, 0.0, 1.0])
    dense = dfx.diffeqsolve(term, cal.Rodas5(), 0.0, 3.0, None, start,
                            saveat=dfx.SaveAt(ts=times), **kwargs)
    end = dfx.diffeqsolve(term, cal.Rodas5(), 0.0, 3.0, None, start,
                          saveat=dfx.SaveAt(t1=True), **kwargs)
    end_error = np.max(np.abs(np.asarray(end.ys[0]) - exact[-1]))
    assert np.max(np.abs(np.asarray(dense.ys) - exact)) < 3 * end_error


def _robertson(t, y, args):
    return jnp.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                      0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                      3e7 * y[1] ** 2])


def test_stiff_robertson_agrees_with_a_tight_kvaerno5_solution():
    ts = jnp.array([1e-3, 1.0, 1e2, 1e4, 1e5])

    def solve(solver, rtol, atol):
        return dfx.diffeqsolve(dfx.ODETerm(_robertson), solver, 0.0, 1e5, 1e-6,
                               jnp.array([1.0, 0.0, 0.0]), saveat=dfx.SaveAt(ts=ts),
                               stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                               max_steps=100_000)

    reference = solve(cal.kvaerno5_chord(1e-12, 1e-16), 1e-12, 1e-16)
    rodas = solve(cal.Rodas5(), 1e-8, 1e-12)
    assert rodas.result == dfx.RESULTS.successful
    np.testing.assert_allclose(rodas.ys, reference.ys, rtol=1e-6, atol=1e-10)
    # Mass is conserved exactly by the linear stage equations.
    np.testing.assert_allclose(jnp.sum(rodas.ys, axis=1), 1.0, rtol=1e-12)
    assert int(rodas.stats["num_steps"]) < 400


@pytest.mark.parametrize("sensitivity", [cal.ForwardMode(), cal.DiscreteAdjoint()],
                         ids=["forward", "discrete_adjoint"])
def test_derivatives_through_rodas5_match_the_closed_form(zoo, sensitivity):
    module = zoo["reference"]
    model = module.MODEL()
    times = jnp.array([1.0, 4.0, 7.0])
    integrator = cal.Integrator(solver=cal.Rodas5(), rtol=1e-10, atol=1e-12)

    def total(pq):
        trajectory = cal.simulate(model, {"p": pq[0], "q": pq[1]}, times,
                                  integrator=integrator, sensitivity=sensitivity)
        return jnp.sum(trajectory.states[:, 0])

    point = jnp.array([1.5, 2.0])
    value, gradient = jax.jit(lambda x: sensitivity.value_and_grad(total, x))(point)
    exact = lambda pq: jnp.sum(module.closed_form(times, pq[0], pq[1]))
    np.testing.assert_allclose(value, exact(point), rtol=1e-8)
    np.testing.assert_allclose(gradient, jax.grad(exact)(point), rtol=1e-7)


def test_reverse_mode_under_vmap_stays_finite_after_a_lane_has_finished(zoo):
    """A finished lane keeps taking discarded zero-length steps while the other runs on;
    reverse mode through them must not turn their 0 * inf into NaN gradients."""
    module = zoo["reference"]
    model = module.MODEL()
    times = jnp.array([1.0, 4.0, 7.0])
    integrator = cal.Integrator(rtol=1e-10, atol=1e-12)
    sensitivity = cal.DiscreteAdjoint()

    def total(pq):
        trajectory = cal.simulate(model, {"p": pq[0], "q": pq[1]}, times,
                                  integrator=integrator, sensitivity=sensitivity)
        return jnp.sum(trajectory.states[:, 0])

    # The second lane needs several times the steps of the first.
    points = jnp.array([[1.5, 2.0], [1.0, 60.0]])
    gradients = jax.jit(jax.vmap(jax.grad(total)))(points)
    exact = jax.vmap(jax.grad(lambda pq: jnp.sum(module.closed_form(times, pq[0], pq[1]))))
    np.testing.assert_allclose(gradients, exact(points), rtol=1e-7)


def test_a_step_traces_its_vector_field_once():
    """Rodas5 evaluates the field ten times a step (f, J by `jacfwd`, ∂f/∂t and seven
    stages). They share one traced program, which JAX then differentiates and batches
    once per transformation instead of once per evaluation."""
    calls = []

    def field(t, y, args):
        calls.append(t)
        return jnp.stack([-y[1], y[0], -50.0 * y[2] + jnp.sin(t)]) * args

    def solve(scale):
        solution = dfx.diffeqsolve(dfx.ODETerm(field), cal.Rodas5(), 0.0, 1.0, 0.1,
                                   jnp.array([1.0, 0.0, 1.0]), args=scale,
                                   stepsize_controller=dfx.ConstantStepSize(),
                                   saveat=dfx.SaveAt(t1=True), max_steps=16,
                                   adjoint=dfx.ForwardMode())
        return solution.ys[-1]

    jax.make_jaxpr(solve)(1.0)
    # diffrax traces its step a few times (for shapes, then in the loop); one trace of
    # a step traces the field once, where ten evaluations traced it ten times.
    assert 1 <= len(calls) <= 3, len(calls)
    # Differentiated twice, the ten evaluations stay calls of one program.
    second = str(jax.make_jaxpr(jax.jacfwd(jax.jacfwd(solve)))(1.0))
    assert second.count("name=field_of") >= 10
