"""Population calibration: recovery of known population parameters, and the outer
hypergradient against finite differences and unrolled-to-convergence differentiation.

The synthetic population: the reference model x' = -x + p u(t), x(0) = q with
log p_i = log 1.5 + η_i, η_i ~ N(0, 0.3²), N = 50 individuals, 20 measurements each
(σ = 0.05), and a shared initial condition q = 2 (or, in the second scenario, a
population-distributed one).
"""

import dataclasses
import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import calibrate as cal
from calibrate import _population
from calibrate._compilation import compilation
from helpers import relative_error


REFERENCE = cal.zoo_module("reference")
MODEL = REFERENCE.MODEL()
N = 50
TIMES = REFERENCE.OBSERVATION_TIMES[::2]
INTEGRATOR = cal.Integrator(rtol=1e-8, atol=1e-10)
TRUE_MEAN, TRUE_SD, TRUE_Q = math.log(1.5), 0.3, 2.0
SHARED_Q = cal.Hierarchy(random=["p"], fixed=["q"])
START = {"p": 1.0, "q": 1.0}


@functools.cache
def shared_q_data():
    eta = TRUE_SD * np.random.default_rng(0).normal(size=N)
    params = [{"p": 1.5 * float(np.exp(e)), "q": TRUE_Q} for e in eta]
    return cal.synthetic_dataset(MODEL, params, TIMES, key=jax.random.key(1)), eta


@functools.cache
def shared_q_result():
    data, _ = shared_q_data()
    return cal.calibrate_population(MODEL, data, hierarchy=SHARED_Q, start=START,
                                    integrator=INTEGRATOR)


def _within(result, name, kind, truth, n_se=3.0):
    rows = result.population
    row = rows[(rows.parameter == name) & (rows.kind == kind)].iloc[0]
    assert np.isfinite(row.se) and row.se > 0
    assert abs(row.estimate - truth) < n_se * row.se, (name, kind, row.estimate, truth, row.se)
    return row


def test_laplace_recovers_shared_initial_condition_and_lognormal_gain():
    result = shared_q_result()
    data, eta = shared_q_data()
    assert result.converged
    assert (result.individual.status == "successful").all()
    _within(result, "q", "fixed", TRUE_Q)
    mean = _within(result, "p", "mean_scaled", TRUE_MEAN)
    sd = _within(result, "p", "sd", TRUE_SD)
    # The standard errors are the ones N individuals allow: ω/√N and ω/√(2N).
    assert mean.se == pytest.approx(TRUE_SD / math.sqrt(N), rel=0.35)
    assert sd.se == pytest.approx(TRUE_SD / math.sqrt(2 * N), rel=0.35)
    # Twenty precise measurements per individual: little shrinkage, and the
    # individual gains follow the truth.
    assert abs(result.shrinkage["p"]) < 0.1
    fitted = np.log(result.individual.p.to_numpy())
    assert np.corrcoef(fitted, TRUE_MEAN + eta)[0, 1] > 0.99
    m = 3  # q, μ_p, log ω_p
    n_obs = N * len(TIMES)
    assert result.minus_two_log_likelihood == pytest.approx(2 * result.objective)
    assert result.aic == pytest.approx(result.minus_two_log_likelihood + 2 * m)
    assert result.bic == pytest.approx(result.minus_two_log_likelihood + m * math.log(n_obs))
    assert result.history.objective.iloc[-1] <= result.history.objective.iloc[0]


def test_laplace_objective_is_the_exact_marginal_likelihood_of_a_linear_model():
    # x(t) = q e^{-t} + p a(t) is linear in q, so with q random the Laplace
    # approximation is exact: y_i ~ N(p a + μ e, σ²I + ω² e eᵀ).
    # The model is misspecified for these data (large residuals), so the ODE is solved
    # tightly: its error enters the objective as Σ r δr.
    data, _ = shared_q_data()
    setup = cal.population_setup(MODEL, data, hierarchy=cal.Hierarchy(random=["q"], fixed=["p"]),
                                 start={"p": 1.5, "q": 1.8},
                                 integrator=cal.Integrator(rtol=1e-11, atol=1e-13))
    theta = setup.theta
    method = cal.Implicit(curvature=cal.ForwardHessian())
    starts = setup.converge_inner(method, theta, setup.starts)
    laplace = float(setup.evaluate(method, theta, starts).value)

    p = float(setup.problem.params(starts[0], theta)["p"])
    mu, sd, sigma = float(theta["mean"][0]), float(jnp.exp(theta["omega"][0])), 0.05
    times = np.asarray(TIMES)
    e, a = np.exp(-times), np.asarray(REFERENCE.closed_form(TIMES, 1.0, 0.0))
    cov = sigma**2 * np.eye(times.size) + sd**2 * np.outer(e, e)
    _, log_det = np.linalg.slogdet(2 * np.pi * cov)
    exact = 0.0
    for y in np.asarray(data.measurements.values)[:, :, 0]:
        d = y - p * a - mu * e
        exact += 0.5 * d @ np.linalg.solve(cov, d) + 0.5 * log_det
    assert laplace == pytest.approx(exact, rel=1e-8, abs=1e-6)


def test_optax_outer_optimiser_descends():
    # Same problem and compiled evaluation as the recovery test, driven by Adam.
    data, _ = shared_q_data()
    result = cal.calibrate_population(
        MODEL, data, hierarchy=SHARED_Q, start=START, integrator=INTEGRATOR,
        outer=cal.FirstOrder(optax.adam(0.1), steps=6), standard_errors=False,
    )
    objective = result.history.objective.to_numpy()
    assert len(objective) == 6 and not result.converged
    assert objective[-1] < objective[0] - 100.0
    assert np.all(np.isnan(result.population.se))


def test_bhhh_and_bfgs_reach_the_same_optimum():
    """BHHH and the default BFGS, from the same start, agree on the optimum to what
    the outer tolerance allows; BHHH's trial steps never raise the recorded objective."""
    bfgs = shared_q_result()
    data, _ = shared_q_data()
    bhhh = cal.calibrate_population(MODEL, data, hierarchy=SHARED_Q, start=START,
                                    integrator=INTEGRATOR, outer=cal.BHHH(),
                                    standard_errors=False)
    assert bhhh.converged and bfgs.converged
    # Both stop within decrement_tol = 1e-4 of the optimum's objective.
    assert bhhh.objective == pytest.approx(bfgs.objective, abs=2e-4)
    for kind, name in (("fixed", "q"), ("mean_scaled", "p"), ("sd", "p")):
        rows = [r.population[(r.population.parameter == name) & (r.population.kind == kind)]
                for r in (bhhh, bfgs)]
        se = float(rows[1].se.iloc[0])
        assert abs(float(rows[0].estimate.iloc[0]) - float(rows[1].estimate.iloc[0])) < 0.05 * se
    assert np.all(np.diff(bhhh.history.objective.to_numpy()) <= 0.0)


def test_bhhh_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path):
    """Stopped after 3 outer steps and resumed from its checkpoint, BHHH takes the
    steps the uninterrupted run takes, to the same numbers."""
    data, _ = shared_q_data()
    kwargs = dict(hierarchy=SHARED_Q, start=START, integrator=INTEGRATOR,
                  standard_errors=False)
    straight = cal.calibrate_population(MODEL, data, outer=cal.BHHH(), **kwargs)
    checkpoint = cal.Checkpoint(tmp_path / "checkpoint.bin")
    stopped = cal.calibrate_population(MODEL, data, outer=cal.BHHH(max_steps=3),
                                       checkpoint=checkpoint, **kwargs)
    assert stopped.outer_steps == 3 and not stopped.converged
    assert checkpoint.meta()["step"] == 3
    resumed = cal.calibrate_population(MODEL, data, outer=cal.BHHH(), checkpoint=checkpoint,
                                       resume=True, **kwargs)
    assert straight.converged and resumed.converged
    assert resumed.outer_steps == straight.outer_steps > 3
    np.testing.assert_array_equal(resumed.history.objective, straight.history.objective)
    assert resumed.objective == straight.objective
    # The scores' predicted decrease: large after 3 steps, below the tolerance at the end.
    assert stopped.score_decrement > 1.0
    assert straight.score_decrement < cal.BHHH().decrement_tol
    assert shared_q_result().score_decrement < 1e-2  # BFGS, the default


def test_a_fit_stopped_short_is_reported_by_its_score_decrement():
    from calibrate.cli import _diagnostics_frame, _population_warnings

    result = shared_q_result()
    data, _ = shared_q_data()
    diagnostics = _diagnostics_frame(result, data.individuals)
    assert _population_warnings(result, diagnostics) == []
    short = dataclasses.replace(result, score_decrement=0.5)
    (warning,) = _population_warnings(short, diagnostics)
    assert "can still fall by 0.5" in warning and "bhhh" in warning


def test_bhhh_holds_an_estimate_at_its_bound_and_converges():
    """A toy outer objective of 40 individuals: θ₀ the mean of normal targets (sd 0.5,
    known), θ₁ the logit coordinate of a parameter whose objective falls all the way
    to its lower bound (θ₁ → -∞). BHHH converges, with θ₁ held within `bound_tol` of
    the bound and θ₀ at its optimum."""
    from types import SimpleNamespace

    targets = np.random.default_rng(3).normal(1.0, 0.5, size=40)
    weights = np.random.default_rng(4).uniform(0.1, 0.5, size=40)

    def evaluate(theta, starts):
        z0, z1 = float(theta["fixed"][0]), float(theta["fixed"][1])
        fraction = 1.0 / (1.0 + math.exp(-z1))
        per = np.stack([(z0 - targets) / 0.25, weights * fraction * (1 - fraction)], axis=1)
        value = 0.5 * np.sum((z0 - targets) ** 2) / 0.25 + np.sum(weights) * fraction
        h = SimpleNamespace(value={"fixed": jnp.asarray(per)}, inner_solution=starts)
        return SimpleNamespace(value=jnp.asarray(value),
                               gradient={"fixed": jnp.asarray(per.sum(axis=0))},
                               hypergradients=h)

    theta, _, steps, converged = cal.BHHH().run(
        evaluate, {"fixed": jnp.array([0.0, 0.0])}, jnp.zeros((40, 1)),
        lambda *_: None, bounded=np.array([False, True]))
    assert converged and steps < 40
    assert float(theta["fixed"][0]) == pytest.approx(np.mean(targets), abs=1e-3)
    assert 1.0 / (1.0 + math.exp(-float(theta["fixed"][1]))) < cal.BHHH().bound_tol

    # With θ₁ alone its decrement stays constant as it walks to -∞: only holding it
    # at the bound stops the walk.
    def bounded_only(theta, starts):
        full = evaluate({"fixed": jnp.array([np.mean(targets), theta["fixed"][0]])}, starts)
        h = SimpleNamespace(value={"fixed": full.hypergradients.value["fixed"][:, 1:]},
                            inner_solution=starts)
        return SimpleNamespace(value=full.value, gradient={"fixed": full.gradient["fixed"][1:]},
                               hypergradients=h)

    for bound_tol, expected in ((cal.BHHH().bound_tol, True), (0.0, False)):
        *_, converged = cal.BHHH(bound_tol=bound_tol, max_steps=40).run(
            bounded_only, {"fixed": jnp.array([0.0])}, jnp.zeros((40, 1)), lambda *_: None,
            bounded=np.array([True]))
        assert converged == expected


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(0, 4), radius=st.floats(1e-3, 1e3))
def test_trust_region_step_minimises_the_model_in_the_ball(seed, rank, radius):
    from calibrate._population import _trust_region_step

    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(4, rank)) * 10.0 ** rng.uniform(-3, 3, size=rank)
    curvature = factor @ factor.T
    gradient = rng.normal(size=4) * 10.0 ** rng.uniform(-3, 3)
    d, predicted = _trust_region_step(curvature, gradient, radius)
    model = lambda x: gradient @ x + 0.5 * x @ curvature @ x
    assert np.linalg.norm(d) <= radius * (1 + 1e-9)
    assert predicted == pytest.approx(-model(d), rel=1e-12, abs=1e-300)
    assert predicted > 0.0
    # No point of the ball does better (random points, and rescaled copies of d).
    trials = rng.normal(size=(2000, 4))
    trials *= (radius * rng.uniform(0, 1, size=(2000, 1)) ** 0.25
               / np.linalg.norm(trials, axis=1, keepdims=True))
    best = model(d)
    scale = 1e-9 * (abs(best) + 1e-300)
    assert all(model(x) >= best - scale for x in trials)
    assert all(model(c * d) >= best - scale for c in (0.5, 0.9, 0.99))


def _gain_curvature_bound(setup, theta, starts):
    """max_i ∂²L_in/∂η² for the reference model: Σ_t (p_i a(t)/σ)² + 1/ω², a(t) =
    x(t; p=1, q=0), since ∂x/∂η = p a(t) when log p = μ + η."""
    a = REFERENCE.closed_form(TIMES, 1.0, 0.0)
    p = jnp.exp(theta["mean"][0] + starts[:, 0])
    sd = jnp.exp(theta["omega"][0])
    return float(jnp.max(p**2) * jnp.sum(a**2) / 0.05**2 + 1 / sd**2)


def test_laplace_hypergradient_agrees_with_finite_differences_and_unrolled():
    data, _ = shared_q_data()
    setup = cal.population_setup(MODEL, data, hierarchy=SHARED_Q, start=START,
                                 integrator=INTEGRATOR)
    # Away from the optimum, inner fits converged.
    theta = {"fixed": setup.theta["fixed"] + 0.4, "mean": jnp.array([0.3]),
             "omega": jnp.log(jnp.array([0.4]))}
    method = cal.Implicit(curvature=cal.ForwardHessian())
    starts = setup.converge_inner(method, theta, setup.starts)
    implicit = setup.evaluate(method, theta, starts)
    assert np.all(np.asarray(implicit.hypergradients.result) == 0)
    gradient = np.asarray(jax.flatten_util.ravel_pytree(implicit.gradient)[0])
    assert np.linalg.norm(gradient) > 10.0  # far from stationary: the check has teeth

    fd = setup.evaluate(cal.FiniteDifferences(step=1e-3), theta, starts)
    fd_gradient = np.asarray(jax.flatten_util.ravel_pytree(fd.gradient)[0])
    assert relative_error(gradient, fd_gradient) < 1e-4

    # Unrolled gradient descent from the cold start, run to convergence.
    rate = 0.9 / _gain_curvature_bound(setup, theta, starts)
    unrolled = setup.evaluate(cal.Unrolled(cal.GradientDescent(rate), steps=150), theta,
                              setup.starts)
    unrolled_gradient = np.asarray(jax.flatten_util.ravel_pytree(unrolled.gradient)[0])
    assert relative_error(gradient, unrolled_gradient) < 1e-4


def test_warm_starts_follow_theta_to_first_order_and_save_inner_steps():
    """Between outer steps the inner solutions move as the implicit function theorem
    says, u*(θ') ≈ u*(θ) + (du*/dθ)(θ' − θ); population fits start the next inner fits
    there."""
    data, _ = shared_q_data()
    setup = cal.population_setup(MODEL, data, hierarchy=SHARED_Q, start=START,
                                 integrator=INTEGRATOR)
    theta = {"fixed": setup.theta["fixed"] + 0.4, "mean": jnp.array([0.3]),
             "omega": jnp.log(jnp.array([0.4]))}
    method = cal.Implicit(curvature=cal.ForwardHessian(), solution_jacobian=True)
    starts = setup.converge_inner(method, theta, setup.starts)
    warm = _population._WarmStarts(lambda th, s: setup.evaluate(method, th, s))
    first = warm(theta, starts).hypergradients
    solutions = _population._accepted_starts(first, starts)
    moved = {**theta, "mean": theta["mean"] + 0.1, "omega": theta["omega"] - 0.1}
    exact = setup.converge_inner(method, moved, solutions)
    delta = jax.tree.map(lambda a, b: a - b, moved, theta)
    predicted = _population._first_order_starts(
        solutions, solutions, first.solution_jacobian, jnp.ones(N, bool), delta)
    plain_error = np.linalg.norm(np.asarray(solutions - exact), axis=1)
    predicted_error = np.linalg.norm(np.asarray(predicted - exact), axis=1)
    assert np.median(plain_error) > 0.02  # θ moved far enough to matter
    assert np.all(predicted_error < 0.1 * plain_error + 1e-6)

    # Through the wrapper the optimisers call: same solutions, fewer steps.
    plain = setup.evaluate(method, moved, solutions).hypergradients
    predicted_fit = warm(moved, solutions).hypergradients
    assert np.all(np.asarray(predicted_fit.stationary))
    np.testing.assert_allclose(predicted_fit.inner_solution, plain.inner_solution,
                               atol=1e-5)
    assert int(jnp.sum(predicted_fit.inner_steps)) < int(jnp.sum(plain.inner_steps))
    # Starts that are no recorded solution are left alone.
    elsewhere = solutions + 0.01
    assert np.array_equal(
        _population._first_order_starts(elsewhere, solutions, first.solution_jacobian,
                                        jnp.ones(N, bool), delta), elsewhere)


def test_local_model_gives_the_hypergradient_of_the_solves_themselves():
    """`Implicit` differentiates the individuals' data terms expanded once around the
    inner optimum (one solve carrying every tangent); differentiating the losses
    through the solves, derivative by derivative, gives the same numbers. The enzyme
    model's observables are nonlinear in its rates, so the expansion's second-order
    terms count (the reference model's are linear in p and q)."""
    enzyme = cal.zoo_module("enzyme_kinetics")
    data = enzyme.synthetic_data(jax.random.key(3), 4, variability=0.2)
    setup = cal.population_setup(
        enzyme.MODEL(), data, hierarchy=cal.Hierarchy(random=["kcat", "kf"], fixed=["kr"]),
        start={"kcat": 0.6, "kf": 1.5, "kr": 1.2}, start_sd=0.3, integrator=INTEGRATOR)
    assert setup.bilevel.local_model is not None
    method = cal.Implicit(curvature=cal.ForwardHessian())
    starts = setup.converge_inner(method, setup.theta, setup.starts)
    direct = dataclasses.replace(
        setup, bilevel=dataclasses.replace(setup.bilevel, local_model=None))
    expanded = setup.evaluate(method, setup.theta, starts)
    solved = direct.evaluate(method, setup.theta, starts)
    flat = lambda g: np.asarray(jax.flatten_util.ravel_pytree(g)[0])
    assert np.linalg.norm(flat(solved.gradient)) > 10.0
    assert float(expanded.value) == pytest.approx(float(solved.value), rel=1e-12)
    assert relative_error(flat(expanded.gradient), flat(solved.gradient)) < 1e-9
    # Near-zero inner gradients carry cancellation error either way.
    for field in ("stationarity", "gradient_norm"):
        np.testing.assert_allclose(getattr(expanded.hypergradients, field),
                                   getattr(solved.hypergradients, field),
                                   rtol=1e-6, atol=1e-11)


@pytest.mark.slow
def test_validation_loss_hypergradient_for_a_penalty_strength():
    data, _ = shared_q_data()
    hierarchy = cal.Hierarchy(random=["p"], fixed=["q"], penalty=cal.L2())
    # Tight solves: finite differences see the solver's noise divided by the step (at
    # rtol 1e-10 the strength component is 6% off at a step of 1e-3, 2e-4 at 1e-12).
    setup = cal.population_setup(
        MODEL, data, hierarchy=hierarchy, objective=cal.ValidationLoss(0.25, seed=2),
        start=START, integrator=cal.Integrator(rtol=1e-12, atol=1e-14),
    )
    train, held_out, _ = setup.batch
    assert not np.any(np.asarray(train.mask) & np.asarray(held_out.mask))
    assert np.asarray(held_out.mask).sum(axis=(1, 2)).min() >= 1
    theta = {**setup.theta, "fixed": setup.theta["fixed"] + 0.4, "strength": jnp.array(2.0)}
    method = cal.Implicit(curvature=cal.ForwardHessian())
    starts = setup.converge_inner(method, theta, setup.starts)
    implicit = setup.evaluate(method, theta, starts)
    fd = setup.evaluate(cal.FiniteDifferences(step=1e-3), theta, starts)
    flat = lambda g: np.asarray(jax.flatten_util.ravel_pytree(g)[0])
    assert relative_error(flat(implicit.gradient), flat(fd.gradient)) < 1e-4
    assert abs(float(implicit.gradient["strength"])) > 0.1
    # Finite differences of a validation loss see the inner solutions' error times
    # ∂L_out/∂u ≠ 0 (unlike the Laplace objective, stationary in u to first order):
    # here the strength component differs by ~1e-4 relative over steps 1e-3–4e-3.
    assert float(implicit.gradient["strength"]) == pytest.approx(
        float(fd.gradient["strength"]), rel=1e-3)
    # Unrolled gradient descent run to convergence has no such error.
    rate = 0.9 / _gain_curvature_bound(setup, theta, starts)
    unrolled = setup.evaluate(cal.Unrolled(cal.GradientDescent(rate), steps=150), theta,
                              setup.starts)
    assert relative_error(flat(implicit.gradient), flat(unrolled.gradient)) < 1e-5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"hierarchy": cal.Hierarchy(random=["k_typo"])}, cal.ParameterError, "k_typo"),
        ({"hierarchy": cal.Hierarchy(random=["p"], penalty=cal.L2())}, ValueError,
         "ValidationLoss"),
        ({"hierarchy": SHARED_Q, "sensitivity": cal.DiscreteAdjoint()}, ValueError,
         "DiscreteAdjoint"),
        ({"hierarchy": SHARED_Q, "hypergradient": cal.Implicit()}, ValueError, "ForwardMode"),
    ],
    ids=["unknown-parameter", "penalty-without-holdout", "laplace-first-order-only",
         "exact-hessian-forward-mode"],
)
def test_bad_specifications_are_refused_before_any_solve(kwargs, error, match):
    data, _ = shared_q_data()
    with pytest.raises(error, match=match):
        cal.calibrate_population(MODEL, data, **kwargs)


def test_hierarchy_rejects_a_parameter_with_two_roles():
    with pytest.raises(cal.ParameterError, match="more than one role: p"):
        cal.Hierarchy(random=["p"], fixed=["p"])


@pytest.mark.slow
def test_laplace_recovers_population_distributed_initial_condition_with_full_covariance():
    rng = np.random.default_rng(5)
    cov = np.array([[0.3**2, 0.5 * 0.3 * 0.2], [0.5 * 0.3 * 0.2, 0.2**2]])
    eta = rng.multivariate_normal(np.zeros(2), cov, size=N)
    params = [{"p": 1.5 * float(np.exp(e[0])), "q": TRUE_Q + float(e[1])} for e in eta]
    data = cal.synthetic_dataset(MODEL, params, TIMES, key=jax.random.key(4))
    result = cal.calibrate_population(
        MODEL, data, hierarchy=cal.Hierarchy(random=["p", "q"],
                                             covariance=cal.FullCovariance()),
        start=START, start_sd={"p": 0.3, "q": 0.3}, integrator=INTEGRATOR,
    )
    assert result.converged
    _within(result, "p", "mean_scaled", TRUE_MEAN)
    _within(result, "q", "mean", TRUE_Q)
    sd = np.sqrt(np.diag(result.omega))
    assert sd == pytest.approx([0.3, 0.2], rel=0.3)
    correlation = result.omega[0, 1] / (sd[0] * sd[1])
    assert abs(correlation - 0.5) < 0.35


def _cascade_population(n, seed=7):
    """log10 k3, log10 k5 population-distributed (sd 0.1), basal active RAF 0.1."""
    cascade = cal.zoo_module("mapk_cascade")
    model = cascade.MODEL()
    truth = dict(cascade.TRUE_PARAMETERS, RAFp0=0.1)
    eta = 0.1 * np.random.default_rng(seed).normal(size=(n, 2))
    params = [dict(truth, k3=truth["k3"] * 10 ** e[0], k5=truth["k5"] * 10 ** e[1])
              for e in eta]
    data = cal.synthetic_dataset(model, params, cascade.OBSERVATION_TIMES,
                                 key=jax.random.key(8))
    return model, data, truth


CASCADE_HIERARCHY = cal.Hierarchy(random=["k3", "k5"], fixed=["RAFp0"])


@pytest.mark.slow
def test_laplace_recovers_cascade_population_with_shared_basal_phosphorylation():
    """The stiff cascade: log10 k3, log10 k5 population-distributed (sd 0.1, i.e.
    about 25 %), basal active RAF at t = 0 shared (0.1; active ERK would be
    forgotten within ~0.01 time units, before the first observation), N = 50."""
    model, data, truth = _cascade_population(N)
    result = cal.calibrate_population(
        model, data, hierarchy=CASCADE_HIERARCHY, start_sd=0.2,
        start={"k3": 2 * truth["k3"], "k5": 0.5 * truth["k5"], "RAFp0": 0.05},
    )
    assert result.converged
    assert (result.individual.status == "successful").mean() > 0.95
    _within(result, "RAFp0", "fixed", 0.1)
    _within(result, "k3", "mean_scaled", math.log10(truth["k3"]))
    _within(result, "k5", "mean_scaled", math.log10(truth["k5"]))
    _within(result, "k3", "sd", 0.1)
    _within(result, "k5", "sd", 0.1)


@pytest.mark.slow
def test_cascade_hypergradient_agrees_with_finite_differences_and_unrolled():
    # Four individuals drawn as in the recovery test (each one's hypergradient adds to
    # the total, so few suffice to check the formula).
    model, data, truth = _cascade_population(4)
    setup = cal.population_setup(
        model, data, hierarchy=CASCADE_HIERARCHY, start_sd=0.15,
        start={"k3": 1.3 * truth["k3"], "k5": 0.8 * truth["k5"], "RAFp0": 0.07},
    )
    theta = setup.theta
    flat = lambda g: np.asarray(jax.flatten_util.ravel_pytree(g)[0])
    method = cal.Implicit(curvature=cal.ForwardHessian())
    starts = setup.converge_inner(method, theta, setup.starts)
    implicit = setup.evaluate(method, theta, starts)
    assert np.all(np.asarray(implicit.hypergradients.result) == 0)
    gradient = flat(implicit.gradient)
    assert np.min(np.abs(gradient)) > 0.5  # every component far from stationary

    fd = setup.evaluate(cal.FiniteDifferences(step=1e-3), theta, starts)
    assert relative_error(gradient, flat(fd.gradient)) < 1e-4

    # Heavy ball with the step and momentum that are optimal for the inner Hessians'
    # extreme eigenvalues, from the cold start: the iterates and their derivatives
    # contract by (√κ - 1)/(√κ + 1) per step (κ ≈ 18 here: 60 steps give ~1e-12).
    inner_hessian = jax.vmap(lambda u, train, inputs: jax.jacfwd(jax.jacfwd(
        lambda v: setup.bilevel.inner(v, theta, (train, None, inputs))))(u))
    train, _, inputs = setup.batch
    eigenvalues = np.linalg.eigvalsh(np.asarray(inner_hessian(starts, train, inputs)))
    big, small = math.sqrt(eigenvalues.max()), math.sqrt(eigenvalues.min())
    heavy_ball = cal.Momentum(4 / (big + small) ** 2, ((big - small) / (big + small)) ** 2)
    unrolled = setup.evaluate(cal.Unrolled(heavy_ball, steps=60),
                              theta, setup.starts)
    assert relative_error(gradient, flat(unrolled.gradient)) < 1e-4


def test_new_data_of_the_same_shape_compiles_nothing():
    """After one calibration, another with new data of the same shapes (and all its
    outer steps) lowers no function to XLA: every compiled function is reused."""
    def calibrate(seed):
        eta = TRUE_SD * np.random.default_rng(seed).normal(size=N)
        params = [{"p": 1.5 * float(np.exp(e)), "q": TRUE_Q} for e in eta]
        data = cal.synthetic_dataset(MODEL, params, TIMES, key=jax.random.key(seed + 1))
        steps = []
        result = cal.calibrate_population(
            MODEL, data, hierarchy=SHARED_Q, start=START, integrator=INTEGRATOR,
            outer=cal.QuasiNewton(max_steps=4),
            callback=lambda step, *_: steps.append(step))
        assert steps == [1, 2, 3, 4]
        return result

    first = calibrate(5)
    with compilation() as log:
        second = calibrate(7)
    assert log.lowered == 0, f"{log.lowered} functions lowered: recompiled"
    # The run did real work on the new data.
    assert np.isfinite(second.objective) and second.objective != first.objective
