"""Likelihoods and residuals against hand computations (closed-form model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import calibrate as cal
from helpers import first_individual


class Decay(cal.AbstractODEModel):
    """x' = -k x, x(0) = x0: three observables of x, one per noise model."""

    states = ("x",)
    parameters = (
        cal.Parameter("k", 0.5, 1e-2, 10.0, scale="log"),
        cal.Parameter("x0", 2.0, 0.1, 10.0),
        cal.Parameter("s_add", 0.1, 1e-3, 1.0, scale="log"),
    )
    observables = (
        cal.Observable("additive", cal.Gaussian("s_add")),
        cal.Observable("proportional", cal.Proportional(relative=0.1, absolute=0.05)),
        cal.Observable("lognormal", cal.LogNormal(0.2)),
    )
    inputs = ()
    t0 = 0.0

    def rhs(self, t, x, params, inputs):
        return -params["k"] * x

    def initial_state(self, params):
        return jnp.stack([params["x0"]])

    def observe(self, t, x, params):
        return jnp.concatenate([x, x, x])


TIMES = np.array([0.0, 0.5, 1.0, 2.0, 4.0])


@pytest.fixture(scope="module")
def setup():
    model = Decay()
    rng = np.random.default_rng(0)
    rows = []
    for t in TIMES:
        x = 2.0 * np.exp(-0.5 * t)
        rows += [
            ("a", t, "additive", x + 0.1 * rng.normal(), np.nan),
            ("a", t, "proportional", x * (1 + 0.1 * rng.normal()), np.nan),
            ("a", t, "lognormal", x * np.exp(0.2 * rng.normal()), np.nan),
        ]
    # One measurement with a known sigma overriding the noise model.
    rows[3] = (*rows[3][:4], 0.3)
    frame = pd.DataFrame(rows, columns=["individual", "time", "observable", "value", "sigma"])
    dataset = cal.dataset_for_model(model, frame)
    objective = cal.Objective(model, integrator=cal.Integrator(rtol=1e-12, atol=1e-14))
    return model, frame, dataset, objective


def hand_nll(frame, k, x0, s_add):
    total = 0.0
    for _, row in frame.iterrows():
        x = x0 * np.exp(-k * row.time)
        if row.observable == "additive":
            sd = row.sigma if np.isfinite(row.sigma) else s_add
            total -= stats.norm.logpdf(row.value, x, sd)
        elif row.observable == "proportional":
            sd = np.sqrt(0.05**2 + (0.1 * x) ** 2)
            total -= stats.norm.logpdf(row.value, x, sd)
        else:
            total -= stats.lognorm.logpdf(row.value, s=0.2, scale=x)
    return total


@pytest.mark.parametrize("values", [(0.5, 2.0, 0.1), (1.3, 1.2, 0.05)])
def test_negative_log_likelihood_matches_hand_computation(setup, values):
    model, frame, dataset, objective = setup
    k, x0, s_add = values
    z = objective.space.to_vector({"k": k, "x0": x0, "s_add": s_add})
    nll, result = objective.negative_log_likelihood(z, first_individual(dataset))
    assert result == cal.RESULTS.successful
    np.testing.assert_allclose(float(nll), hand_nll(frame, k, x0, s_add), rtol=1e-9)


def test_residuals_give_likelihood_up_to_a_constant(setup):
    model, frame, dataset, objective = setup
    data = first_individual(dataset)
    constants = []
    for values in [(0.5, 2.0, 0.1), (1.3, 1.2, 0.05), (0.1, 5.0, 0.5)]:
        z = objective.space.to_vector(dict(zip(["k", "x0", "s_add"], values)))
        nll, _ = objective.negative_log_likelihood(z, data)
        r, _ = objective.residuals(z, data)
        constants.append(float(nll - 0.5 * jnp.sum(r**2)))
    np.testing.assert_allclose(constants, constants[0], rtol=0, atol=1e-8)
    # Standardised residual of the first additive measurement, by hand.
    z = objective.space.to_vector({"k": 0.5, "x0": 2.0, "s_add": 0.1})
    r, _ = objective.residuals(z, data)
    first = frame.iloc[0]
    np.testing.assert_allclose(float(r[0]), (first.value - 2.0) / 0.1, rtol=1e-9)


def test_masked_entries_do_not_contribute(setup):
    model, frame, dataset, objective = setup
    smaller = cal.dataset_for_model(model, frame.iloc[3:])
    z = objective.space.to_vector({"k": 0.7, "x0": 1.5, "s_add": 0.2})
    nll, _ = objective.negative_log_likelihood(z, first_individual(smaller))
    np.testing.assert_allclose(float(nll), hand_nll(frame.iloc[3:], 0.7, 1.5, 0.2), rtol=1e-9)


def test_failed_solve_gives_inf_with_reason(setup):
    model, frame, dataset, _ = setup
    objective = cal.Objective(model, integrator=cal.Integrator(max_steps=2))
    z = objective.space.to_vector({"k": 0.5, "x0": 2.0, "s_add": 0.1})
    nll, result = objective.negative_log_likelihood(z, first_individual(dataset))
    assert float(nll) == np.inf
    assert result == cal.RESULTS.max_steps_reached
    assert "max_steps" in cal.result_message(result._value)
    r, result = objective.residuals(z, first_individual(dataset))
    assert bool(jnp.all(jnp.isfinite(r))) and float(jnp.sum(r**2)) > 1e10
    assert result == cal.RESULTS.max_steps_reached
    grad = jax.jacfwd(lambda z: objective.residuals(z, first_individual(dataset))[0])(z)
    assert bool(jnp.all(grad == 0))
