"""Gradients of the likelihood through the ODE solve: every sensitivity method agrees
with the others, with central finite differences and, on the reference model, with the
gradient of the closed-form solution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibrate as cal
from helpers import central_difference_gradient, first_individual, relative_error


# Tight solves: the FD check sees solver error divided by the FD step.
INTEGRATOR = cal.Integrator(rtol=1e-10, atol=1e-12, max_steps=100_000)
METHODS = {
    "forward": cal.ForwardMode(),
    "discrete_adjoint": cal.DiscreteAdjoint(),
    "continuous_adjoint": cal.ContinuousAdjoint(),
    "direct": cal.DirectDifferentiation(),
}
MODELS = ["reference", "enzyme_kinetics", "mapk_cascade"]


@functools.cache
def problem(name):
    module = cal.zoo_module(name)
    model = module.MODEL()
    data = first_individual(module.synthetic_data(jax.random.key(7)))
    objective = cal.Objective(model, integrator=INTEGRATOR)
    # Away from the optimum so the gradient is far from zero.
    truth = model.parameter_space.complete(module.TRUE_PARAMETERS)
    z = objective.space.to_vector(truth) + 0.1 * jnp.cos(
        jnp.arange(objective.n_parameters, dtype=float)
    )
    return model, objective, data, z


@functools.cache
def gradient(name, method):
    model, objective, data, z = problem(name)
    objective = cal.Objective(model, integrator=INTEGRATOR, sensitivity=METHODS[method])
    nll = lambda z: objective.negative_log_likelihood(z, data)[0]
    value, grad = jax.jit(lambda z: objective.sensitivity.value_and_grad(nll, z))(z)
    return float(value), np.asarray(grad)


@functools.cache
def finite_difference(name):
    model, objective, data, z = problem(name)
    nll = jax.jit(lambda z: objective.negative_log_likelihood(z, data)[0])
    return central_difference_gradient(nll, z)


def _cases():
    for name in MODELS:
        for method in METHODS:
            marks = []
            if name == "mapk_cascade" and method == "direct":
                marks = [pytest.mark.slow]  # minutes to compile/run on 2 cores
            yield pytest.param(name, method, marks=marks, id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_cases()))
def test_gradient_matches_finite_differences(name, method):
    value, grad = gradient(name, method)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert np.linalg.norm(grad) > 1.0  # far from stationary: the check has teeth
    assert relative_error(grad, finite_difference(name)) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_methods_agree_with_each_other(name):
    reference_value, reference = gradient(name, "forward")
    for method in ("discrete_adjoint", "continuous_adjoint"):
        value, grad = gradient(name, method)
        assert value == pytest.approx(reference_value, rel=1e-12)
        # Discrete methods differentiate the same arithmetic; the continuous adjoint
        # only agrees to the solver tolerance.
        tol = 1e-10 if method == "discrete_adjoint" else 1e-6
        assert relative_error(grad, reference) < tol, method


def test_reference_gradient_matches_closed_form():
    model, objective, data, z = problem("reference")
    module = cal.zoo_module("reference")
    sigma = 0.05

    def closed_form_nll(z):
        params = objective.params(z)
        x = module.closed_form(data.times, params["p"], params["q"])
        r = (data.values[:, 0] - x) / sigma
        return jnp.sum(0.5 * r**2 + jnp.log(sigma) + 0.5 * jnp.log(2 * jnp.pi))

    exact_value, exact = jax.value_and_grad(closed_form_nll)(z)
    for method in ("forward", "discrete_adjoint", "continuous_adjoint"):
        value, grad = gradient("reference", method)
        # The ODE is solved to rtol 1e-10, the closed form is exact.
        assert value == pytest.approx(float(exact_value), rel=1e-7)
        assert relative_error(grad, exact) < 1e-6, method


def test_cascade_is_stiff():
    """The cascade needs an implicit solver: an explicit one takes many more steps."""
    import diffrax as dfx

    module = cal.zoo_module("mapk_cascade")
    model = module.MODEL()
    params = model.parameter_space.complete()
    steps = {}
    for label, integrator in {
        "implicit": cal.Integrator(rtol=1e-8, atol=1e-10),
        "explicit": cal.Integrator(solver=dfx.Tsit5(), rtol=1e-8, atol=1e-10,
                                   max_steps=200_000),
    }.items():
        traj = jax.jit(
            lambda p: cal.simulate(model, p, module.OBSERVATION_TIMES, integrator=integrator)
        )(params)
        assert traj.result == cal.RESULTS.successful
        steps[label] = int(traj.num_steps)
    assert steps["explicit"] > 10 * steps["implicit"], steps


def test_materialised_jacobian_linearises_to_the_forward_jacobian():
    """What a Gauss–Newton-type solver sees of the ODE residuals under
    `with_materialised_jacobian`: the same values, a linear map equal to the forward
    Jacobian, and tangents of the arguments pushed through as without the wrapper."""
    from calibrate._sensitivity import with_materialised_jacobian

    model, objective, data, z = problem("reference")
    residuals = lambda z, args: objective.residuals(z * args[0], data)[0]
    wrapped = with_materialised_jacobian(residuals)
    scale = (jnp.asarray(1.0),)
    value, linear = jax.linearize(lambda x: wrapped(x, scale), z)
    expected = jax.jacfwd(lambda x: residuals(x, scale))(z)
    np.testing.assert_allclose(value, residuals(z, scale), rtol=0, atol=0)
    np.testing.assert_allclose(jax.vmap(linear, out_axes=1)(jnp.eye(z.size)), expected,
                               rtol=1e-12, atol=1e-14)
    # A tangent in both the parameters and the arguments.
    dz, dscale = jnp.cos(jnp.arange(z.size) + 1.0), (jnp.asarray(0.3),)
    _, tangent = jax.jvp(wrapped, (z, scale), (dz, dscale))
    _, plain = jax.jvp(residuals, (z, scale), (dz, dscale))
    assert float(jnp.max(jnp.abs(plain))) > 1.0
    np.testing.assert_allclose(tangent, plain, rtol=1e-12, atol=1e-12)


def test_automatic_takes_gradients_by_the_adjoint_only_beyond_max_forward():
    rule = cal.Automatic()
    for lanes in (1, 2, 8, 127, 128, 999, 1000, 5000):
        limit = rule.forward_limit(lanes)
        assert type(rule.for_gradient(limit, lanes)) is cal.ForwardMode
        assert type(rule.for_gradient(limit + 1, lanes)) is cal.DiscreteAdjoint
    # Wider batches make forward tangents dearer (benchmarks/RESULTS_sensitivity.md).
    limits = [rule.forward_limit(lanes) for lanes in (1, 8, 128, 1000)]
    assert limits == sorted(limits, reverse=True) and len(set(limits)) == 4
    assert rule.forward_limit(127) == rule.forward_limit(2)
    # One number is one limit for every width; tiers must start at one lane.
    assert {cal.Automatic(max_forward=5).forward_limit(n) for n in (1, 10, 10**4)} == {5}
    tiers = cal.Automatic(max_forward=[(100, 3), (1, 9)])
    assert (tiers.forward_limit(99), tiers.forward_limit(100)) == (9, 3)
    for bad in (((8, 3),), (), ((1, 3), (1, 5))):
        with pytest.raises(ValueError, match="max_forward.*from one on"):
            cal.Automatic(max_forward=bad)
    for bad in (4.5, ((1, 3, 5),), ((1, 2.5),), "40"):
        with pytest.raises(TypeError, match="max_forward"):
            cal.Automatic(max_forward=bad)
    # Jacobians and anything unresolved stay forward: the adjoints survive no second
    # order, and a reverse Jacobian costs a sweep per residual.
    assert type(rule.for_jacobian()) is cal.ForwardMode
    assert rule.mode == "forward" and rule.second_order == cal.ForwardMode.second_order
    assert type(cal.DiscreteAdjoint().for_gradient(1)) is cal.DiscreteAdjoint
    with pytest.raises(ValueError, match="forward-mode"):
        cal.Automatic(forward=cal.DiscreteAdjoint())


def test_signalling_chain_gradients_agree_with_finite_differences():
    """The zoo's chain that the sensitivity benchmark grows, at 2 tiers (9 parameters):
    both strategies `Automatic` chooses between give its gradient."""
    chain = cal.zoo_module("signalling_chain")
    with pytest.raises(ValueError, match="at least 2 tiers"):
        chain.chain_model(1)
    model = chain.chain_model(2)()
    data = first_individual(chain.synthetic_data(jax.random.key(3), tiers=2))
    objective = cal.Objective(model, integrator=INTEGRATOR)
    assert objective.n_parameters == 9
    z = objective.space.to_vector(model.parameter_space.complete({})) + 0.1 * jnp.sin(
        jnp.arange(9, dtype=float))
    nll = lambda o: lambda z: o.negative_log_likelihood(z, data)[0]
    expected = central_difference_gradient(jax.jit(nll(objective)), z)
    assert np.linalg.norm(expected) > 1.0
    rule = cal.Automatic(max_forward=8)
    for sensitivity in (rule.for_gradient(8), rule.for_gradient(9)):
        chosen = cal.Objective(model, integrator=INTEGRATOR, sensitivity=sensitivity)
        _, grad = jax.jit(lambda z, o=chosen: o.sensitivity.value_and_grad(nll(o), z))(z)
        assert relative_error(grad, expected) < 1e-5, type(sensitivity).__name__
