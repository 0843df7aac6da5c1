"""Simulation against closed forms, with inputs, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibrate as cal


TIMES = jnp.linspace(0.0, 10.0, 41)
TIGHT = cal.Integrator(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def reference():
    module = cal.zoo_module("reference")
    return module, module.MODEL()


def test_batched_simulation_matches_closed_form(reference):
    module, model = reference
    p = jnp.array([0.5, 1.5, 4.0])
    q = jnp.array([0.0, 2.0, 7.5])

    @jax.jit
    def batch(p, q):
        return jax.vmap(
            lambda p, q: cal.simulate(model, {"p": p, "q": q}, TIMES, integrator=TIGHT)
        )(p, q)

    traj = batch(p, q)
    assert bool(jnp.all(traj.ok))
    exact = jax.vmap(lambda p, q: module.closed_form(TIMES, p, q))(p, q)
    np.testing.assert_allclose(traj.observables[..., 0], exact, atol=1e-8)
    # The step input is resolved exactly: the solver steps onto t = 5.
    np.testing.assert_allclose(traj.states[:, 20, 0], exact[:, 20], atol=1e-9)


def test_inputs_are_arguments_and_interpolated_inputs_work(reference):
    module, model = reference
    params = model.parameter_space.complete({"p": 2.0, "q": 1.0})
    # u(t) = a + b t  =>  x(t) = (q - p (a - b)) e^{-t} + p (a - b + b t)
    a, b = 0.5, 0.3
    ramp = {"u": cal.Interpolated([0.0, 10.0], [a, a + 10 * b])}
    traj = cal.simulate(model, params, TIMES, inputs=ramp, integrator=TIGHT)
    exact = (1.0 - 2.0 * (a - b)) * jnp.exp(-TIMES) + 2.0 * (a - b + b * TIMES)
    np.testing.assert_allclose(traj.observables[:, 0], exact, atol=1e-8)
    # Piecewise-constant input with two switches: u = 1, 3, 0 on [0,2), [2,4), [4,...).
    steps = {"u": cal.PiecewiseConstant([0.0, 2.0, 4.0], [1.0, 3.0, 0.0])}
    traj = cal.simulate(model, params, TIMES, inputs=steps, integrator=TIGHT)

    def exact_steps(t):
        # Variation of constants, piece by piece.
        x, s = 1.0, 0.0
        for start, end, u in ((0.0, 2.0, 1.0), (2.0, 4.0, 3.0), (4.0, np.inf, 0.0)):
            stop = min(t, end)
            if stop <= start:
                break
            x = 2.0 * u + (x - 2.0 * u) * np.exp(-(stop - start))
        return x

    np.testing.assert_allclose(
        traj.observables[:, 0], [exact_steps(float(t)) for t in TIMES], atol=1e-8
    )


def test_max_steps_is_a_result_not_an_exception(reference):
    module, model = reference
    traj = cal.simulate(model, model.parameter_space.complete(), TIMES,
                        integrator=cal.Integrator(max_steps=3))
    assert traj.result == cal.RESULTS.max_steps_reached
    assert not bool(traj.ok)


class WrongShape(cal.AbstractODEModel):
    """Declares two states but returns one initial value."""

    states = ("a", "b")
    parameters = (cal.Parameter("k", 1.0),)
    observables = (cal.Observable("a"),)
    inputs = ()
    t0 = 0.0

    def rhs(self, t, x, params, inputs):
        return -x

    def initial_state(self, params):
        return jnp.stack([params["k"]])

    def observe(self, t, x, params):
        return x[:1]


def test_model_with_wrong_state_shape_gets_a_clear_error():
    model = WrongShape()
    with pytest.raises(ValueError, match=r"WrongShape: initial_state returned shape \(1,\)"):
        cal.simulate(model, model.parameter_space.complete(), TIMES)


def test_steady_state_and_its_derivative_match_the_closed_form():
    # x' = -x + p u with u = 1 settles at x = p, so d x_ss / d p = 1.
    model = cal.zoo_model("reference")
    inputs = {"u": cal.Constant(1.0)}

    def settle(p, max_steps=20_000):
        params = model.parameter_space.complete({"p": 1.5, "q": 0.2})
        params["p"] = p
        return cal.steady_state(model, params, inputs=inputs,
                                integrator=cal.Integrator(max_steps=max_steps))

    state, result = jax.jit(settle)(1.5)
    assert cal.result_name(result) == "successful"
    np.testing.assert_allclose(state, [1.5], rtol=1e-8)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(lambda p: settle(p)[0]))(1.5), [1.0],
                               rtol=1e-6)
    _, result = jax.jit(lambda p: settle(p, max_steps=3))(1.5)
    assert cal.result_name(result) == "max_steps_reached"
