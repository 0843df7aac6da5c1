"""Stiff MAPK-like signalling cascade with ERK-induced negative feedback (9 states).

Ligand L(t) binds receptor R; the complex RL activates RAF, RAFp activates MEK,
MEKp activates ERK, ERKp drives synthesis of a feedback protein F that speeds up RAF
deactivation. Mass action, totals of R, RAF, MEK and ERK conserved (= 1):

  v1 = k1 L R          v2 = k2 RL            v3 = k3 RL RAF       v4 = k4 RAFp (1 + F)
  v5 = k5 RAFp MEK     v6 = k6 MEKp          v7 = k7 MEKp ERK     v8 = k8 ERKp
  v9 = k9 ERKp         v10 = k10 F

Receptor binding (k1 ~ 1e3) and ERK cycling (k7, k8 ~ 1e2) are orders of magnitude
faster than feedback (k10 ~ 1e-2): explicit solvers need far more steps than
Kvaerno5 (see `tests/test_zoo.py::test_cascade_is_stiff`).
"""

import jax
import jax.numpy as jnp

import calibrate as cal


def _rate(name, default, description):
    return cal.Parameter(name, default, 1e-4, 1e5, scale="log10", description=description)


class MAPKCascade(cal.AbstractODEModel):
    """Stiff MAPK-like cascade with negative feedback (9 states, 10 rate constants)."""

    states = ("R", "RL", "RAF", "RAFp", "MEK", "MEKp", "ERK", "ERKp", "F")
    parameters = (
        _rate("k1", 1000.0, "ligand binding"),
        _rate("k2", 0.05, "complex dissociation"),
        _rate("k3", 5.0, "RAF activation by RL"),
        _rate("k4", 0.5, "RAF deactivation (feedback-enhanced)"),
        _rate("k5", 2.0, "MEK activation by RAFp"),
        _rate("k6", 1.0, "MEK deactivation"),
        _rate("k7", 200.0, "ERK activation by MEKp"),
        _rate("k8", 100.0, "ERK deactivation"),
        _rate("k9", 0.5, "feedback synthesis"),
        _rate("k10", 0.05, "feedback degradation"),
        # Basal phosphorylation at t = 0 (fractions of each total): zero unless a
        # population model learns them.
        cal.Parameter("RAFp0", 0.0, 0.0, 0.9, estimate=False,
                      description="initial active RAF fraction"),
        cal.Parameter("MEKp0", 0.0, 0.0, 0.9, estimate=False,
                      description="initial active MEK fraction"),
        cal.Parameter("ERKp0", 0.0, 0.0, 0.9, estimate=False,
                      description="initial active ERK fraction"),
    )
    observables = (
        cal.Observable("RAFp", cal.Gaussian(0.01), "active RAF (fraction)"),
        cal.Observable("MEKp", cal.Gaussian(0.01), "active MEK (fraction)"),
        cal.Observable("ERKp", cal.Gaussian(0.01), "active ERK (fraction)"),
        cal.Observable("F", cal.Gaussian(0.01), "feedback protein"),
    )
    inputs = ("L",)
    t0 = 0.0

    def rhs(self, t, x, params, inputs):
        R, RL, RAF, RAFp, MEK, MEKp, ERK, ERKp, F = x
        k = [params[f"k{i}"] for i in range(1, 11)]
        v1 = k[0] * inputs["L"] * R
        v2 = k[1] * RL
        v3 = k[2] * RL * RAF
        v4 = k[3] * RAFp * (1 + F)
        v5 = k[4] * RAFp * MEK
        v6 = k[5] * MEKp
        v7 = k[6] * MEKp * ERK
        v8 = k[7] * ERKp
        v9 = k[8] * ERKp
        v10 = k[9] * F
        return jnp.stack(
            [
                -v1 + v2, v1 - v2,
                -v3 + v4, v3 - v4,
                -v5 + v6, v5 - v6,
                -v7 + v8, v7 - v8,
                v9 - v10,
            ]
        )

    def initial_state(self, params):
        raf, mek, erk = params["RAFp0"], params["MEKp0"], params["ERKp0"]
        one = jnp.ones_like(raf)
        zero = jnp.zeros_like(one)
        return jnp.stack([one, zero, 1 - raf, raf, 1 - mek, mek, 1 - erk, erk, zero])

    def observe(self, t, x, params):
        return jnp.stack([x[3], x[5], x[7], x[8]])

    def default_inputs(self):
        # Ligand on at t = 0, washed out at t = 60.
        return {"L": cal.PiecewiseConstant([0.0, 60.0], [1.0, 0.0])}


MODEL = MAPKCascade
TRUE_PARAMETERS = {p.name: p.default for p in MAPKCascade.parameters}
OBSERVATION_TIMES = jnp.concatenate(
    [jnp.geomspace(0.05, 10.0, 16), jnp.linspace(15.0, 120.0, 16)]
)


def synthetic_data(key, n_individuals=1, variability=0.0):
    """Noisy RAFp, MEKp, ERKp, F; `variability` is the sd of log-normal rates."""
    keys = jax.random.split(key, 2)
    rates = [n for n in TRUE_PARAMETERS if n.startswith("k")]
    eta = variability * jax.random.normal(keys[0], (n_individuals, len(rates)))
    params = [
        {**TRUE_PARAMETERS, **{n: TRUE_PARAMETERS[n] * float(jnp.exp(e[j]))
                               for j, n in enumerate(rates)}}
        for e in eta
    ]
    return cal.synthetic_dataset(MODEL(), params, OBSERVATION_TIMES, key=keys[1])
