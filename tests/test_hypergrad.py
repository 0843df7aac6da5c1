"""Hypergradients against closed forms, finite differences and each other.

Problems:
- ridge regression with learned log-strength (closed form p*(θ));
- a smoothed elastic net on an orthonormal design, whose ε → 0 limit away from kinks
  is the lasso's closed form (soft thresholding);
- the reference ODE x' = -x + p u(t), x(0) = q: the inner problem fits p to training
  data, the outer one scores q on validation data; p*(q) is explicit because x is
  linear in p.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import calibrate as cal
from calibrate._data import Measurements


# ---------------------------------------------------------------------------------
# Ridge regression: L_in = ½‖Xw − y‖² + ½ e^θ ‖w‖², L_out = ½‖X_v w − y_v‖².


def _ridge_data():
    rng = np.random.default_rng(0)
    w = rng.normal(size=5)
    x, xv = rng.normal(size=(30, 5)), rng.normal(size=(20, 5))
    y = x @ w + 0.3 * rng.normal(size=30)
    yv = xv @ w + 0.3 * rng.normal(size=20)
    return tuple(jnp.asarray(a) for a in (x, y, xv, yv))


RIDGE_ARGS = _ridge_data()
RIDGE_THETA = jnp.array(0.7)


def ridge_inner(w, theta, args):
    x, y, _, _ = args
    return 0.5 * jnp.sum((x @ w - y) ** 2) + cal.L2()(w, jnp.exp(theta))


def ridge_residuals(w, theta, args):
    x, y, _, _ = args
    return jnp.concatenate([x @ w - y, jnp.exp(0.5 * theta) * w])


def ridge_outer(w, theta, args):
    xv, yv = args[2], args[3]
    return 0.5 * jnp.sum((xv @ w - yv) ** 2)


def ridge_closed_form(theta):
    x, y, _, _ = RIDGE_ARGS
    w = jnp.linalg.solve(x.T @ x + jnp.exp(theta) * jnp.eye(5), x.T @ y)
    return ridge_outer(w, theta, RIDGE_ARGS)


RIDGE_EXACT = float(jax.grad(ridge_closed_form)(RIDGE_THETA))
RIDGE = cal.BilevelProblem(ridge_outer, inner_loss=ridge_inner)
RIDGE_START = jnp.zeros(5)


def ridge(method, **kwargs):
    return cal.hypergradient(RIDGE, RIDGE_THETA, RIDGE_ARGS, start=RIDGE_START,
                             method=method, **kwargs)


@pytest.mark.parametrize(
    "method",
    [
        cal.Implicit(),
        cal.Implicit(linear_solver=cal.ConjugateGradient()),
        cal.Implicit(curvature=cal.ForwardHessian()),
        cal.Implicit(curvature=cal.ForwardHessian(), linear_solver=cal.ConjugateGradient()),
    ],
    ids=["exact-direct", "exact-cg", "forward-direct", "forward-cg"],
)
def test_ridge_implicit_matches_closed_form(method):
    h = ridge(method, throw=True)
    assert h.successful
    assert abs(float(h.value) - RIDGE_EXACT) < 1e-8 * abs(RIDGE_EXACT)
    assert float(h.linear_residual) < 1e-10
    assert float(h.stationarity) < 1e-9


@pytest.mark.parametrize(
    "method",
    [
        cal.Implicit(solution_jacobian=True),
        cal.Implicit(curvature=cal.ForwardHessian(), linear_solver=cal.ConjugateGradient(),
                     solution_jacobian=True),
    ],
    ids=["exact-direct", "forward-cg"],
)
def test_ridge_solution_jacobian_is_the_derivative_of_the_closed_form_solution(method):
    x, y, _, _ = RIDGE_ARGS
    solution = lambda theta: jnp.linalg.solve(x.T @ x + jnp.exp(theta) * jnp.eye(5), x.T @ y)
    h = ridge(method, throw=True)
    expected = jax.jacfwd(solution)(RIDGE_THETA)
    assert h.solution_jacobian.shape == (5,)
    assert float(jnp.linalg.norm(expected)) > 0.05
    np.testing.assert_allclose(h.solution_jacobian, expected, rtol=1e-8, atol=1e-12)
    assert ridge(cal.Implicit(), throw=True).solution_jacobian is None


def test_ridge_gauss_newton_is_exact_only_without_the_dropped_term():
    # For residuals [Xw − y; e^{θ/2} w] Gauss–Newton's H = XᵀX + λI is exact but its
    # mixed term drops r·∂²r/∂w∂θ = ½λw, i.e. half of the exact mixed term λw.
    # A tight stationarity tolerance: the inner least-squares fit stops at 1% of it.
    problem = cal.BilevelProblem(ridge_outer, inner_residuals=ridge_residuals)
    method = cal.Implicit(curvature=cal.GaussNewton(), stationarity_tol=1e-10)
    h = cal.hypergradient(problem, RIDGE_THETA, RIDGE_ARGS, start=RIDGE_START,
                          method=method, throw=True)
    x, y, xv, yv = RIDGE_ARGS
    lam = jnp.exp(RIDGE_THETA)
    h_matrix = x.T @ x + lam * jnp.eye(5)
    w = jnp.linalg.solve(h_matrix, x.T @ y)
    z = jnp.linalg.solve(h_matrix, xv.T @ (xv @ w - yv))
    expected = -0.5 * lam * w @ z
    assert abs(float(h.value) - float(expected)) < 1e-8 * abs(float(expected))
    assert abs(float(expected) - RIDGE_EXACT) > 0.1 * abs(RIDGE_EXACT)


def test_neumann_converges_with_terms_and_reports_divergence():
    x = RIDGE_ARGS[0]
    eigenvalues = np.linalg.eigvalsh(np.asarray(x.T @ x) + float(jnp.exp(RIDGE_THETA)) * np.eye(5))
    step = 1.0 / eigenvalues[-1]
    rho = 1 - step * eigenvalues[0]
    errors = []
    for terms in (10, 40, 160):
        h = ridge(cal.Implicit(linear_solver=cal.NeumannSeries(step, terms=terms)))
        errors.append(abs(float(h.value) - RIDGE_EXACT) / abs(RIDGE_EXACT))
        assert float(h.spectral_radius) == pytest.approx(rho, rel=1e-3)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6
    # The residual shrinks like rho^T.
    assert errors[1] / errors[0] < 10 * rho**30

    too_large = 2.5 / eigenvalues[-1]
    with pytest.warns(cal.HypergradientWarning, match="neumann_divergent"):
        h = ridge(cal.Implicit(linear_solver=cal.NeumannSeries(too_large, terms=40)))
    assert cal.result_name(h.result) == "neumann_divergent"
    assert float(h.spectral_radius) == pytest.approx(too_large * eigenvalues[-1] - 1, rel=1e-3)
    with pytest.raises(cal.HypergradientError, match="spectral radius"):
        ridge(cal.Implicit(linear_solver=cal.NeumannSeries(too_large, terms=40)), throw=True)


def test_unrolled_converges_to_implicit_as_steps_grow():
    x = RIDGE_ARGS[0]
    lr = 0.5 / float(np.linalg.eigvalsh(np.asarray(x.T @ x))[-1])
    errors = [
        abs(float(ridge(cal.Unrolled(cal.GradientDescent(lr), steps=k)).value) - RIDGE_EXACT)
        for k in (5, 20, 200)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8 * abs(RIDGE_EXACT)


def test_finite_differences_agree():
    h = ridge(cal.FiniteDifferences(step=1e-4))
    assert abs(float(h.value) - RIDGE_EXACT) < 1e-5 * abs(RIDGE_EXACT)


# The unrolled outer loss as a function of one optimiser hyperparameter, for FD.
UNROLLED_OPTIMISERS = {
    "gd-learning_rate": (cal.GradientDescent(0.004), "learning_rate"),
    "momentum-learning_rate": (cal.Momentum(0.002, 0.6), "learning_rate"),
    "momentum-momentum": (cal.Momentum(0.002, 0.6), "momentum"),
    "adam-b1": (cal.Adam(0.05, 0.8, 0.99), "b1"),
    "adam-b2": (cal.Adam(0.05, 0.8, 0.99), "b2"),
    "adam-learning_rate": (cal.Adam(0.05, 0.8, 0.99), "learning_rate"),
    "schedule-rate": (cal.GradientDescent(cal.InverseTimeDecay(0.006, 0.05)), "rate"),
    "schedule-initial": (cal.GradientDescent(cal.ExponentialDecay(0.006, 0.97)), "initial"),
}


def _field(optimiser, name):
    if isinstance(optimiser.learning_rate, cal.AbstractSchedule) and name != "learning_rate":
        return lambda o: getattr(o.learning_rate, name)
    return lambda o: getattr(o, name)


@pytest.mark.parametrize("case", list(UNROLLED_OPTIMISERS))
def test_unrolled_optimiser_hypergradients_match_finite_differences(case):
    optimiser, name = UNROLLED_OPTIMISERS[case]
    get = _field(optimiser, name)
    steps = 15  # short, so the result depends strongly on the optimiser
    h = ridge(cal.Unrolled(optimiser, steps=steps))
    analytic = float(get(h.optimiser_gradient))
    value = float(get(optimiser))
    step = 1e-5 * abs(value)
    shifted = [
        float(ridge(cal.Unrolled(eqx.tree_at(get, optimiser, value + s), steps=steps)).outer_loss)
        for s in (step, -step)
    ]
    numeric = (shifted[0] - shifted[1]) / (2 * step)
    assert abs(numeric) > 1e-3  # the hyperparameter matters here
    assert abs(analytic - numeric) < 1e-6 * abs(numeric)


def test_non_stationary_inner_optimum_is_reported():
    problem = cal.BilevelProblem(
        ridge_outer, inner_loss=ridge_inner, inner_solver=optx.BFGS(rtol=1e-10, atol=1e-10),
        inner_max_steps=2,
    )
    with pytest.raises(cal.HypergradientError, match="inner_not_stationary"):
        cal.hypergradient(problem, RIDGE_THETA, RIDGE_ARGS, start=RIDGE_START, throw=True)
    with pytest.warns(cal.HypergradientWarning, match=r"Newton step"):
        h = cal.hypergradient(problem, RIDGE_THETA, RIDGE_ARGS, start=RIDGE_START)
    assert float(h.stationarity) > float(h.stationarity_bound)


# ---------------------------------------------------------------------------------
# Smoothed elastic net on an orthonormal design: the inner problem decouples, and as
# ε → 0 its solution is soft thresholding w_j = sign(b_j)(|b_j| − αλ)₊ / (1 + (1−α)λ),
# b = Xᵀy, with α = ½ here.


def _lasso_data():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(40, 4)))
    b = np.array([3.0, -2.0, 0.5, -0.1])
    xv = rng.normal(size=(25, 4))
    yv = xv @ np.array([2.0, -1.5, 0.3, 0.0]) + 0.1 * rng.normal(size=25)
    return b, tuple(jnp.asarray(a) for a in (q, q @ b, xv, yv))


LASSO_B, LASSO_ARGS = _lasso_data()


def lasso_inner(w, theta, args):
    x, y, _, _, penalty = args
    return 0.5 * jnp.sum((x @ w - y) ** 2) + penalty(w, jnp.exp(theta))


def lasso_kinks(w, theta, args):
    return args[-1].kink_curvature(w, jnp.exp(theta))


LASSO = cal.BilevelProblem(ridge_outer, inner_loss=lasso_inner, kink_curvature=lasso_kinks)


def lasso_limit(theta):
    lam = jnp.exp(theta)
    b = jnp.asarray(LASSO_B)
    w = jnp.sign(b) * jnp.maximum(jnp.abs(b) - 0.5 * lam, 0.0) / (1 + 0.5 * lam)
    return ridge_outer(w, theta, LASSO_ARGS[:4])


def lasso(theta, smoothing, **kwargs):
    args = (*LASSO_ARGS, cal.ElasticNet(0.5, smoothing))
    return cal.hypergradient(LASSO, jnp.asarray(theta), args, start=jnp.zeros(4), **kwargs)


def test_elastic_net_hypergradient_converges_away_from_kinks():
    theta = np.log(1.4)  # αλ = 0.7: components 0, 1 active, 2, 3 at zero with margin
    exact = float(jax.grad(lasso_limit)(theta))
    errors = []
    for smoothing in (1e-3, 1e-4, 1e-5):
        h = lasso(theta, smoothing, throw=True)
        assert not np.any(h.kinks)
        errors.append(abs(float(h.value) - exact) / abs(exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-5
    # The smoothing error is first order in ε.
    assert errors[0] / errors[1] == pytest.approx(10, rel=0.2)


def test_elastic_net_at_a_kink_is_reported():
    theta = 0.0  # αλ = 0.5 = |b_2|: component 2 is exactly on the boundary
    with pytest.warns(cal.HypergradientWarning, match=r"near_kink: components \[2\]"):
        h = lasso(theta, 1e-5)
    assert np.flatnonzero(np.asarray(h.kinks)).tolist() == [2]
    with pytest.raises(cal.HypergradientError, match="near_kink"):
        lasso(theta, 1e-5, throw=True)
    # The two one-sided limits differ, so no number can be right.
    left = float(jax.grad(lasso_limit)(theta - 1e-9))
    right = float(jax.grad(lasso_limit)(theta + 1e-9))
    assert abs(left - right) > 0.1 * abs(left)


# ---------------------------------------------------------------------------------
# Capability checks: a strategy refuses a sensitivity that cannot supply it.


@pytest.mark.parametrize(
    "method,sensitivity",
    [
        (cal.Implicit(), cal.ForwardMode()),
        (cal.Implicit(), cal.DiscreteAdjoint()),
        (cal.Implicit(curvature=cal.ForwardHessian()), cal.DiscreteAdjoint()),
        (cal.Implicit(curvature=cal.ForwardHessian()), cal.ContinuousAdjoint()),
        (cal.Unrolled(), cal.DiscreteAdjoint()),
    ],
)
def test_unsupported_sensitivity_is_refused_before_tracing(method, sensitivity):
    problem = cal.BilevelProblem(ridge_outer, inner_loss=ridge_inner, sensitivity=sensitivity)
    with pytest.raises(ValueError, match=type(sensitivity).__name__):
        cal.hypergradient(problem, RIDGE_THETA, RIDGE_ARGS, start=RIDGE_START, method=method)


@pytest.mark.parametrize(
    "method,sensitivity",
    [
        (cal.Implicit(curvature=cal.GaussNewton()), cal.DiscreteAdjoint()),
        (cal.Implicit(curvature=cal.GaussNewton()), cal.ContinuousAdjoint()),
        (cal.Implicit(curvature=cal.ForwardHessian()), cal.ForwardMode()),
        (cal.Unrolled(), cal.ForwardMode()),
        (cal.Implicit(), cal.DirectDifferentiation()),
        (cal.FiniteDifferences(), cal.DiscreteAdjoint()),
    ],
)
def test_supported_combinations_pass_the_check(method, sensitivity):
    cal.check_supported(method, sensitivity)


# ---------------------------------------------------------------------------------
# The reference ODE: inner fits p (as z = log p) to training data, outer scores q.


REFERENCE = cal.zoo_module("reference")
TIGHT = cal.Integrator(rtol=1e-10, atol=1e-12)
SIGMA = 0.05
TRAIN_TIMES = jnp.linspace(0.25, 10.0, 40)
VALIDATION_TIMES = jnp.linspace(0.4, 9.6, 25)
Q = 1.3  # the outer point, away from the truth q = 2


def _measurements(times, values):
    values = jnp.asarray(values)[:, None]
    return Measurements(times, values, jnp.full_like(values, jnp.nan),
                        jnp.ones_like(values, bool))


@functools.cache
def reference_data(noise=True):
    rng = np.random.default_rng(3)
    clean = lambda t: REFERENCE.closed_form(t, 1.5, 2.0)
    train = clean(TRAIN_TIMES) + (SIGMA * rng.normal(size=40) if noise else 0.0)
    valid = clean(VALIDATION_TIMES) + SIGMA * rng.normal(size=25)
    return _measurements(TRAIN_TIMES, train), _measurements(VALIDATION_TIMES, valid)


def _with_q(objective, q):
    return eqx.tree_at(lambda o: o.fixed["q"], objective, q)


@functools.cache
def reference_problem(sensitivity):
    objective = cal.Objective(REFERENCE.MODEL(), estimate=["p"], fixed={"q": 2.0},
                              integrator=TIGHT, sensitivity=sensitivity)

    def inner(z, q, data):
        return _with_q(objective, q).residuals(z, data[0])[0]

    def outer(z, q, data):
        return 0.5 * jnp.sum(_with_q(objective, q).residuals(z, data[1])[0] ** 2)

    problem = cal.BilevelProblem(
        outer, inner_residuals=inner, sensitivity=sensitivity,
        inner_solver=optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12),
    )
    return problem, objective


def reference_closed_form(q, noise=True):
    """dF/dq with p*(q) = Σ a_i (y_i − q e_i) / Σ a_i², x = q e(t) + p a(t)."""
    train, valid = reference_data(noise)
    e = jnp.exp(-train.times)
    a = REFERENCE.closed_form(train.times, 1.0, 0.0)
    y = train.values[:, 0]

    def outer(q):
        p = jnp.sum(a * (y - q * e)) / jnp.sum(a * a)
        x = REFERENCE.closed_form(valid.times, p, q)
        return 0.5 * jnp.sum(((x - valid.values[:, 0]) / SIGMA) ** 2)

    return float(jax.grad(outer)(jnp.asarray(q)))


def reference(method, sensitivity, q=Q, noise=True, **kwargs):
    problem, objective = reference_problem(sensitivity)
    start = objective.space.to_vector({"p": 1.0})
    return cal.hypergradient(problem, jnp.asarray(q), reference_data(noise), start=start,
                             method=method, **kwargs)


def reference_curvature(z):
    """∂²L_in/∂z² at `z`, forward-over-forward."""
    problem, _ = reference_problem(cal.ForwardMode())
    inner = lambda z: problem.inner(z, jnp.asarray(Q), reference_data())
    return float(jax.jacfwd(jax.jacfwd(inner))(z)[0, 0])


@pytest.mark.parametrize(
    "method,sensitivity",
    [
        (cal.Implicit(curvature=cal.ForwardHessian()), cal.ForwardMode()),
        pytest.param(
            cal.Implicit(curvature=cal.ExactHessian(), linear_solver=cal.ConjugateGradient()),
            cal.DirectDifferentiation(),
            marks=pytest.mark.slow,  # second order through DirectAdjoint: ~2 min compile
        ),
    ],
    ids=["forward-hessian", "exact-hessian-cg"],
)
def test_reference_implicit_matches_closed_form(method, sensitivity):
    exact = reference_closed_form(Q)
    h = reference(method, sensitivity, throw=True)
    assert abs(float(h.value) - exact) < 1e-6 * abs(exact)
    # The fitted gain is the closed-form p*(q).
    train, _ = reference_data()
    e, a = jnp.exp(-train.times), REFERENCE.closed_form(train.times, 1.0, 0.0)
    p_star = jnp.sum(a * (train.values[:, 0] - Q * e)) / jnp.sum(a * a)
    _, objective = reference_problem(sensitivity)
    fitted = objective.params(h.inner_solution)["p"]
    assert float(fitted) == pytest.approx(float(p_star), rel=1e-8)


def test_reference_gauss_newton_is_exact_at_zero_residual():
    # Noise-free training data at the true q: the inner residuals vanish at p*, so the
    # Gauss–Newton Hessian and mixed term are exact.
    method = cal.Implicit(curvature=cal.GaussNewton())
    h = reference(method, cal.ForwardMode(), q=2.0, noise=False, throw=True)
    exact = reference_closed_form(2.0, noise=False)
    assert abs(float(h.value) - exact) < 1e-6 * abs(exact)


def test_reference_neumann_converges_and_reports_divergence():
    exact = reference_closed_form(Q)
    direct = reference(cal.Implicit(curvature=cal.ForwardHessian()), cal.ForwardMode())
    curvature = reference_curvature(direct.inner_solution)
    step = 0.5 / curvature  # I − αH = 0.5: the error halves with each term
    errors, values = [], []
    for terms in (5, 20, 40):
        method = cal.Implicit(cal.ForwardHessian(), cal.NeumannSeries(step, terms=terms))
        values.append(float(reference(method, cal.ForwardMode()).value))
        errors.append(abs(values[-1] - float(direct.value)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[0] == pytest.approx(0.5**15, rel=1e-3)
    assert abs(values[2] - exact) < 1e-6 * abs(exact)
    divergent = cal.Implicit(cal.ForwardHessian(), cal.NeumannSeries(2.5 / curvature, 20))
    with pytest.warns(cal.HypergradientWarning, match="neumann_divergent"):
        h = reference(divergent, cal.ForwardMode())
    assert float(h.spectral_radius) == pytest.approx(1.5, rel=1e-6)


def test_reference_unrolled_converges_as_steps_grow():
    exact = reference_closed_form(Q)
    h = reference(cal.Implicit(curvature=cal.ForwardHessian()), cal.ForwardMode())
    curvature = reference_curvature(h.inner_solution)
    errors = []
    for steps in (10, 60):
        method = cal.Unrolled(cal.GradientDescent(0.5 / curvature), steps=steps)
        errors.append(abs(float(reference(method, cal.ForwardMode()).value) - exact))
    assert errors[0] > errors[1]
    assert errors[1] < 1e-5 * abs(exact)
