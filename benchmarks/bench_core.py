#!/usr/bin/env python
"""Core benchmarks of calibrate: solve, gradients, batched gradients, scipy baseline.

Run from the repository root:

    python benchmarks/bench_core.py                       # all zoo models, full run
    python benchmarks/bench_core.py --models reference --batches 1,10 --repeats 3 \
        --out scratch-results.md                             # quick smoke run

For every zoo model (``calibrate.zoo_names()``) it measures, at the tolerances of
``calibrate.Integrator()``:

1. compile time (``jax.jit(f).lower(...).compile()``, lower + compile) and run time
   (median of repeats after one warm call, ``block_until_ready``) of one solve and of
   the gradient of the negative log-likelihood w.r.t. the unconstrained vector ``z``
   with each sensitivity method (a method that fails is reported, not fatal);
2. the gradient (ForwardMode and DiscreteAdjoint) ``vmap``-ed over batches of
   individuals, each with its own parameters and data;
3. side by side, scipy ``solve_ivp(method="BDF")`` with a plain numpy right-hand side
   and a forward finite-difference gradient (n_p + 1 solves);
4. diffrax's default ``Kvaerno5()`` against calibrate's chord Kvaerno5 and its default
   stiff solver (Rodas5).

Results are printed and written (atomically) as markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


# --------------------------------------------------------------------------------------
# Numpy models: the "naive user" baseline for scipy (plain numpy, no JAX in the loop).
# --------------------------------------------------------------------------------------


@dataclass
class NumpyModel:
    """x0(p), f(t, x, p, u) and h(t, x, p) written in plain numpy/Python floats."""

    rhs: Callable
    initial_state: Callable
    observe: Callable
    label: str = "plain numpy"


def _reference_rhs(t, x, p, u):
    return -x + p["p"] * u["u"]


def _enzyme_rhs(t, x, p, u):
    S, E, C, P = x
    binding = p["kf"] * S * E - p["kr"] * C
    catalysis = p["kcat"] * C
    return np.array([-binding, -binding + catalysis, binding - catalysis, catalysis])


def _mapk_rhs(t, x, p, u):
    R, RL, RAF, RAFp, MEK, MEKp, ERK, ERKp, F = x
    v1 = p["k1"] * u["L"] * R
    v2 = p["k2"] * RL
    v3 = p["k3"] * RL * RAF
    v4 = p["k4"] * RAFp * (1 + F)
    v5 = p["k5"] * RAFp * MEK
    v6 = p["k6"] * MEKp
    v7 = p["k7"] * MEKp * ERK
    v8 = p["k8"] * ERKp
    v9 = p["k9"] * ERKp
    v10 = p["k10"] * F
    return np.array(
        [-v1 + v2, v1 - v2, -v3 + v4, v3 - v4, -v5 + v6, v5 - v6, -v7 + v8, v7 - v8,
         v9 - v10]
    )


NUMPY_MODELS: dict[str, NumpyModel] = {
    "reference": NumpyModel(
        rhs=_reference_rhs,
        initial_state=lambda p: np.array([p["q"]]),
        observe=lambda t, x, p: x[None, :] if x.ndim == 1 else x,
    ),
    "enzyme_kinetics": NumpyModel(
        rhs=_enzyme_rhs,
        initial_state=lambda p: np.array([p["S0"], p["E0"], 0.0, 0.0]),
        observe=lambda t, x, p: np.stack([x[0], x[3]]),
    ),
    "mapk_cascade": NumpyModel(
        rhs=_mapk_rhs,
        initial_state=lambda p: np.array(
            [1.0, 0, 1 - p["RAFp0"], p["RAFp0"], 1 - p["MEKp0"], p["MEKp0"],
             1 - p["ERKp0"], p["ERKp0"], 0]
        ),
        observe=lambda t, x, p: np.stack([x[3], x[5], x[7], x[8]]),
    ),
}


def numpy_model_for(name, model):
    """The hand-written numpy model, or (for a zoo model without one) the model's own
    functions wrapped in `jax.jit` and called with numpy arrays."""
    if name in NUMPY_MODELS:
        return NUMPY_MODELS[name]
    import jax
    import jax.numpy as jnp

    rhs = jax.jit(lambda t, x, p, u: model.rhs(t, x, p, u))
    x0 = jax.jit(model.initial_state)
    obs = jax.jit(jax.vmap(model.observe, in_axes=(0, 1, None), out_axes=1))

    def as_jax(p):
        return {k: jnp.asarray(v) for k, v in p.items()}

    return NumpyModel(
        rhs=lambda t, x, p, u: np.asarray(rhs(t, x, as_jax(p), as_jax(u))),
        initial_state=lambda p: np.asarray(x0(as_jax(p))),
        observe=lambda t, x, p: np.asarray(obs(jnp.asarray(t), jnp.asarray(x), as_jax(p))),
        label="model.rhs via jax.jit (no numpy version written)",
    )


def numpy_input(inp):
    """A numpy callable u(t) for a calibrate input, and its jump times."""
    import calibrate as cal

    if isinstance(inp, cal.PiecewiseConstant):
        ts, vs = np.asarray(inp.times), np.asarray(inp.values)

        def u(t):
            i = np.searchsorted(ts, t, side="right") - 1
            return float(vs[max(i, 0)])

        return u, ts
    if isinstance(inp, cal.Interpolated):
        ts, vs = np.asarray(inp.times), np.asarray(inp.values)
        return (lambda t: float(np.interp(t, ts, vs))), np.zeros(0)
    if isinstance(inp, cal.Constant):
        v = float(inp.value)
        return (lambda t: v), np.zeros(0)
    return (lambda t: float(inp(t))), np.asarray(inp.discontinuities)


def numpy_from_vector(space, z):
    """`ParameterSpace.from_vector` in numpy (natural-scale floats by name)."""
    out = {}
    index = {n: i for i, n in enumerate(space.estimated)}
    for p in space.parameters:
        if p.name not in index:
            out[p.name] = float(p.default)
            continue
        zi = float(z[index[p.name]])
        a, b = p.scaled_bounds
        if math.isfinite(a) and math.isfinite(b):
            s = a + (b - a) / (1.0 + math.exp(-zi))
        elif math.isfinite(a):
            s = a + np.logaddexp(0.0, zi)
        elif math.isfinite(b):
            s = b - np.logaddexp(0.0, zi)
        else:
            s = zi
        out[p.name] = math.exp(s) if p.scale == "log" else 10.0**s if p.scale == "log10" else s
    return out


def numpy_nll(noise_models, y, mask, sigma_data, y_pred, params):
    """The negative log-likelihood of `Objective.negative_log_likelihood`, in numpy."""
    import calibrate as cal

    total = 0.0
    log2pi = math.log(2 * math.pi)
    for k, noise in enumerate(noise_models):
        m = mask[:, k]
        yk = np.where(m, y[:, k], 1.0)
        pk = np.where(m, y_pred[:, k], 1.0)

        def val(spec):
            return params[spec] if isinstance(spec, str) else float(spec)

        if isinstance(noise, cal.Gaussian):
            sig_model = np.full_like(pk, val(noise.sigma))
            g, gp, logjac = yk, pk, 0.0
        elif isinstance(noise, cal.Proportional):
            a, b = val(noise.absolute), val(noise.relative)
            sig_model = np.sqrt(a**2 + (b * pk) ** 2 + 1e-300) + 1e-12
            g, gp, logjac = yk, pk, 0.0
        elif isinstance(noise, cal.LogNormal):
            sig_model = np.full_like(pk, val(noise.sigma))
            g, gp = np.log(np.maximum(yk, 1e-300)), np.log(np.maximum(pk, 1e-300))
            logjac = np.log(yk)
        else:
            raise NotImplementedError(f"no numpy version of {type(noise).__name__}")
        sk = np.where(np.isfinite(sigma_data[:, k]), sigma_data[:, k], sig_model)
        sk = np.where(m, sk, 1.0)
        r = (g - gp) / sk
        nll = 0.5 * r**2 + np.log(sk) + 0.5 * log2pi + logjac
        total += float(np.sum(np.where(m, nll, 0.0)))
    return total


class ScipyProblem:
    """One individual solved with scipy's BDF: the naive-user baseline.

    No Jacobian is supplied (BDF finite-differences it, as a user who writes only the
    right-hand side gets). Integration restarts at input discontinuities, as diffrax
    steps onto them too.
    """

    def __init__(self, name, model, space, meas, rtol, atol):
        self.np_model = numpy_model_for(name, model)
        self.space = space
        self.noise_models = model.noise_models
        self.rtol, self.atol = rtol, atol
        self.t0 = float(model.t0)
        self.times = np.asarray(meas.times, dtype=float)
        self.values = np.asarray(meas.values, dtype=float)
        self.sigma = np.asarray(meas.sigma, dtype=float)
        self.mask = np.asarray(meas.mask, dtype=bool)
        inputs = model.default_inputs()
        self.inputs = {}
        jumps = []
        for n, inp in inputs.items():
            u, js = numpy_input(inp)
            self.inputs[n] = u
            jumps.extend(float(j) for j in js)
        t_end = max(float(self.times[-1]), self.t0)
        cuts = sorted({j for j in jumps if self.t0 < j < t_end})
        self.edges = [self.t0, *cuts, t_end]

    def solve(self, z):
        from scipy.integrate import solve_ivp

        p = numpy_from_vector(self.space, z)
        inputs = self.inputs
        rhs = self.np_model.rhs

        def fun(t, x):
            return rhs(t, x, p, {n: u(t) for n, u in inputs.items()})

        x = np.asarray(self.np_model.initial_state(p), dtype=float)
        states = np.empty((len(self.times), len(x)))
        nfev = 0
        ok = True
        n_seg = len(self.edges) - 1
        for s in range(n_seg):
            a, b = self.edges[s], self.edges[s + 1]
            last = s == n_seg - 1
            sel = (self.times >= a) & ((self.times <= b) if last else (self.times < b))
            if b <= a:
                states[sel] = x
                continue
            # Save at the requested times and at the segment's end (the next start).
            t_eval = np.unique(np.append(self.times[sel], b))
            sol = solve_ivp(fun, (a, b), x, method="BDF", rtol=self.rtol, atol=self.atol,
                            t_eval=t_eval)
            nfev += sol.nfev
            if not sol.success or sol.y.shape[1] != len(t_eval):
                ok = False
                states[:] = np.nan
                break
            states[sel] = sol.y.T[np.searchsorted(t_eval, self.times[sel])]
            x = sol.y[:, -1]
        obs = np.asarray(self.np_model.observe(self.times, states.T, p)).T
        return obs, p, nfev, ok

    def nll(self, z):
        obs, p, nfev, ok = self.solve(z)
        if not ok:
            return math.inf
        return numpy_nll(self.noise_models, self.values, self.mask, self.sigma, obs, p)

    def fd_gradient(self, z, step):
        """Forward differences: n_p + 1 solves; step `step * max(1, |z_i|)`."""
        z = np.asarray(z, dtype=float)
        f0 = self.nll(z)
        g = np.empty_like(z)
        for i in range(len(z)):
            h = step * max(1.0, abs(z[i]))
            zi = z.copy()
            zi[i] += h
            g[i] = (self.nll(zi) - f0) / h
        return f0, g


# --------------------------------------------------------------------------------------
# Timing helpers.
# --------------------------------------------------------------------------------------


def aot_compile(fn, *args):
    """(compiled, seconds) for `jax.jit(fn).lower(*args).compile()`."""
    import jax

    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def n_repeats(warm, repeats, budget_s, fill_s=2.0, cap=200):
    """How many timed calls: `repeats`, more for fast calls (up to about `fill_s` of
    calls, at most `cap`) to tame noise, fewer for slow ones (about `budget_s` in all)."""
    warm = max(warm, 1e-9)
    n = max(repeats, min(cap, int(fill_s / warm)))
    return max(1, min(n, int(budget_s / warm)))


def time_compiled(compiled, *args, repeats=5, budget_s=60.0):
    """(median seconds, output, n repeats) after one warm call (see `n_repeats`)."""
    import jax

    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warm = time.perf_counter() - t
    if warm > budget_s:  # too slow to repeat: report the (already compiled) first call
        return warm, out, 1
    n = n_repeats(warm, repeats, budget_s)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), out, n


def time_python(fn, repeats=5, budget_s=60.0):
    """(median seconds, output, n) of a plain Python call (first call counted as warm)."""
    t = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t
    n = n_repeats(warm, repeats, budget_s)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), out, n


def fmt_s(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(r):
    if r is None or not math.isfinite(r):
        return "–"
    return f"{r:.3g}×"


def fmt_g(x, digits=2):
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}e}"


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # A runtime check inside a solve (eqx.error_if, e.g. max_steps in diffrax's backward
    # solve) arrives wrapped in a long callback traceback: keep its own message.
    for line in reversed(text):
        if "EquinoxRuntimeError:" in line:
            return "runtime error: " + line.split("EquinoxRuntimeError:", 1)[1].strip()[:160]
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}"


def rel_diff(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --------------------------------------------------------------------------------------
# One gradient in a child process (a method that runs away can be stopped).
# --------------------------------------------------------------------------------------

SENSITIVITIES = ("ForwardMode", "DiscreteAdjoint", "ContinuousAdjoint", "DirectDifferentiation")


def single_gradient(report, *, name, method, z, meas, repeats, on_error=None):
    """Compile and time `value_and_grad` of the NLL of one individual; runs in a child.

    `on_error="raise"` sets `EQX_ON_ERROR=raise` before importing calibrate (which
    otherwise turns failed runtime checks into NaN), so a failure says why.
    """
    if on_error is not None:
        os.environ["EQX_ON_ERROR"] = on_error
    import jax
    import jax.numpy as jnp

    import calibrate as cal

    model = cal.zoo_model(name)
    S = getattr(cal, method)()
    obj = cal.Objective(model, integrator=cal.Integrator(), sensitivity=S)
    m = cal.Measurements(**{k: jnp.asarray(v) for k, v in meas.items()})
    z = jnp.asarray(z)

    def vg(zz, mm):
        return S.value_and_grad(lambda a, b: obj.negative_log_likelihood(a, b)[0], zz, mm)

    compiled, tc = aot_compile(vg, z, m)
    report("compiled", tc)
    tr, (val, g), n_rep = time_compiled(compiled, z, m, repeats=repeats)
    return tc, tr, float(val), np.asarray(g), n_rep


def _child(queue, fn, kwargs):
    try:
        result = fn(lambda kind, value: queue.put((kind, value)), **kwargs)
        queue.put(("done", result))
    except BaseException as exc:  # noqa: BLE001
        queue.put(("error", short_reason(exc)))


def run_isolated(fn, kwargs, timeout):
    """Run `fn(report, **kwargs)` in a spawned process; ("done", result) or
    ("failed", {"reason": ..., "compile": seconds or None})."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, fn, kwargs), daemon=True)
    proc.start()
    deadline = time.perf_counter() + timeout
    info = {"compile": None}
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                stage = ("still compiling" if info["compile"] is None else
                         f"compiled in {info['compile']:.0f} s, then the timed calls "
                         f"did not finish")
                return "failed", {**info, "reason": f"no result within {timeout:.0f} s "
                                  f"({stage})"}
            try:
                kind, value = q.get(timeout=min(left, 5.0))
            except queue_mod.Empty:
                if not proc.is_alive() and q.empty():
                    return "failed", {**info, "reason": f"child process died (exit code "
                                      f"{proc.exitcode})"}
                continue
            if kind == "compiled":
                info["compile"] = value
            elif kind == "done":
                return "done", value
            else:
                return "failed", {**info, "reason": value}
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        proc.join(1)


# --------------------------------------------------------------------------------------
# The benchmark of one model.
# --------------------------------------------------------------------------------------


@dataclass
class ModelReport:
    name: str
    header: str
    tables: list = field(default_factory=list)  # (title, columns, rows, note)
    facts: dict = field(default_factory=dict)


def individual_parameters(space, true_params, n, variability, seed):
    """n natural-scale parameter sets around `true_params`: log-normal factors
    exp(variability * N(0,1)) on log scales, (1 + variability * N(0,1)) on linear
    ones (clipped into the bounds), as the zoo's `synthetic_data` draws them."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name in space.estimated:
        p = space[name]
        v = float(true_params.get(name, p.default))
        eta = variability * rng.standard_normal(n)
        if p.scale == "lin":
            x = v * (1 + eta)
            lo = p.lower + 1e-6 * (abs(p.lower) + 1) if math.isfinite(p.lower) else -np.inf
            hi = p.upper - 1e-6 * (abs(p.upper) + 1) if math.isfinite(p.upper) else np.inf
            x = np.clip(x, lo, hi)
        else:
            x = v * np.exp(eta)
            x = np.clip(x, p.lower * (1 + 1e-9), p.upper * (1 - 1e-9))
        sets[name] = x
    return sets


def bench_model(name, args, log):
    import diffrax as dfx
    import jax
    import jax.numpy as jnp

    import calibrate as cal
    from calibrate._simulate import _jump_times

    mod = cal.zoo_module(name)
    model = mod.MODEL()
    space = model.parameter_space
    integ = cal.Integrator()
    rtol, atol = integ.rtol, integ.atol
    n_max = max(args.batches) if args.batches else 1

    t = time.perf_counter()
    dataset = mod.synthetic_data(jax.random.PRNGKey(args.seed), n_max, variability=0.2)
    t_data = time.perf_counter() - t
    log(f"[{name}] synthetic_data({n_max}) took {t_data:.1f} s")

    psets = individual_parameters(space, mod.TRUE_PARAMETERS, n_max, 0.2, args.seed)
    Z = jnp.stack([space[n].to_unconstrained(jnp.asarray(psets[n])) for n in space.estimated],
                  axis=1)
    M = dataset.measurements
    z = Z[0]
    m = jax.tree.map(lambda a: a[0], M)
    times = m.times
    n_p = len(space.estimated)

    def plural(n, word):
        return f"{n} {word}" + ("" if n == 1 else "s")

    rep = ModelReport(
        name=name,
        header=(
            f"{model.describe()} — {plural(len(model.states), 'state')}, "
            f"{plural(n_p, 'estimated parameter')} ({', '.join(space.estimated)}), "
            f"{plural(len(model.observables), 'observable')} × {times.shape[0]} times. "
            f"Data: `synthetic_data(PRNGKey({args.seed}), {n_max}, variability=0.2)` "
            f"(took {t_data:.0f} s to generate); each individual's gradient is taken at "
            f"its own parameters (true values × exp(0.2·N(0,1)) on log scales, "
            f"× (1 + 0.2·N(0,1)) on linear ones); single-individual rows use individual 0."
        ),
    )

    # ---------------- 1. single solve and gradients ----------------
    rows = []

    def solve_fn(z, times):
        traj = cal.simulate(model, cal.Objective(model).params(z), times, integrator=integ)
        return traj.observables, traj.num_steps, traj.ok

    c_solve, tc_solve = aot_compile(solve_fn, z, times)
    tr_solve, (obs_jax, steps, ok), n_rep = time_compiled(c_solve, z, times, repeats=args.repeats)
    rep.facts["jax_solve"] = tr_solve
    rows.append(["solve (calibrate default solver)", fmt_s(tc_solve), fmt_s(tr_solve),
                 f"{n_rep} calls; {int(steps)} steps, ok={bool(ok)}"])
    log(f"[{name}] solve: compile {tc_solve:.2f} s, run {fmt_s(tr_solve)}, {int(steps)} steps")

    grads = {}
    grad_times = {}
    meas_np = {k: np.asarray(getattr(m, k)) for k in ("times", "values", "sigma", "mask")}
    for label in SENSITIVITIES:
        status, payload = run_isolated(
            single_gradient,
            dict(name=name, method=label, z=np.asarray(z), meas=meas_np,
                 repeats=args.repeats),
            timeout=args.method_timeout,
        )
        if status == "done":
            tc, tr, val, g, n_rep = payload
            if not (math.isfinite(val) and np.all(np.isfinite(g))):
                what = "value" if not math.isfinite(val) else "gradient"
                # Run it again with runtime errors raised, to learn why.
                log(f"[{name}] grad {label}: non-finite {what}; rerunning with "
                    f"EQX_ON_ERROR=raise for the reason")
                st2, p2 = run_isolated(
                    single_gradient,
                    dict(name=name, method=label, z=np.asarray(z), meas=meas_np,
                         repeats=1, on_error="raise"),
                    timeout=args.method_timeout,
                )
                why = ("no error raised" if st2 == "done" else p2["reason"])
                reason = f"non-finite {what}; with `EQX_ON_ERROR=raise`: {why}"
                rows.append([f"∇ NLL, {label}", fmt_s(tc), f"fails: {reason}", ""])
                log(f"[{name}] grad {label}: FAILS {reason}")
                continue
            grads[label] = (val, g)
            grad_times[label] = tr
            rows.append([f"∇ NLL, {label}", fmt_s(tc), fmt_s(tr), f"{n_rep} calls"])
            log(f"[{name}] grad {label}: compile {tc:.2f} s, run {fmt_s(tr)}")
        else:
            tc = payload.get("compile")
            reason = payload["reason"]
            rows.append([f"∇ NLL, {label}", fmt_s(tc) if tc else "–", f"fails: {reason}", ""])
            log(f"[{name}] grad {label}: FAILS {reason}")
    rep.facts["grad_times"] = dict(grad_times)
    rep.facts["grad_failures"] = {r[0].split(", ", 1)[1]: r[2][len("fails: "):]
                                  for r in rows[1:] if str(r[2]).startswith("fails: ")}
    ref = grads.get("ForwardMode") or next(iter(grads.values()), None)
    for r in rows[1:]:
        lbl = r[0].split(", ", 1)[1]
        if lbl in grads and ref is not None:
            d = rel_diff(grads[lbl][1], ref[1])
            r[3] += ("; reference for the rel. differences" if grads[lbl] is ref else
                     f"; rel. diff. to ForwardMode gradient {fmt_g(d)}"
                     + (" — **inaccurate gradient**" if d > 1e-3 else ""))
            rep.facts[f"grad_diff_{lbl}"] = d
    rep.tables.append(("Single individual: compile and run time", ["what", "compile (lower+compile)",
                       "run (median)", "notes"], rows, None))

    # ---------------- 2. scipy baseline ----------------
    rows = []
    try:
        sp = ScipyProblem(name, model, space, m, rtol, atol)
        ts_solve, (obs_sp, _, nfev, sp_ok), _ = time_python(lambda: sp.solve(np.asarray(z)),
                                                           repeats=args.repeats)
        obs_diff = float(np.max(np.abs(obs_sp - np.asarray(obs_jax))
                                / (np.abs(np.asarray(obs_jax)) + 1e-6)))
        rows.append(["solve", fmt_s(ts_solve), fmt_s(tr_solve), fmt_ratio(ts_solve / tr_solve),
                     f"{nfev} RHS evaluations, ok={sp_ok}; max rel. diff. of observables "
                     f"{fmt_g(obs_diff)}"])
        rep.facts["solve_ratio"] = ts_solve / tr_solve
        ts_grad, (f0, g_fd), _ = time_python(
            lambda: sp.fd_gradient(np.asarray(z), args.fd_step), repeats=args.repeats)
        if grad_times:
            best = min(grad_times, key=grad_times.get)
            jax_val, jax_g = ref
            fm_t = grad_times.get("ForwardMode", grad_times[best])
            rows.append([
                f"gradient: FD ({n_p + 1} solves) vs ForwardMode",
                fmt_s(ts_grad), fmt_s(fm_t), fmt_ratio(ts_grad / fm_t),
                f"rel. diff. FD vs JAX gradient {fmt_g(rel_diff(g_fd, jax_g))}; NLL "
                f"scipy {f0:.6g} vs JAX {jax_val:.6g}",
            ])
            if best != "ForwardMode":
                rows.append([
                    f"gradient: FD vs fastest JAX ({best})",
                    fmt_s(ts_grad), fmt_s(grad_times[best]),
                    fmt_ratio(ts_grad / grad_times[best]), "",
                ])
            rep.facts["grad_ratio_fm"] = ts_grad / fm_t
            rep.facts["grad_ratio_best"] = (ts_grad / grad_times[best], best)
            rep.facts["fd_rel_diff"] = rel_diff(g_fd, jax_g)
        log(f"[{name}] scipy: solve {fmt_s(ts_solve)}, FD gradient {fmt_s(ts_grad)}")
    except Exception as exc:  # noqa: BLE001
        rows.append(["scipy baseline", "–", "–", "–", f"fails: {short_reason(exc)}"])
        log(f"[{name}] scipy FAILS {short_reason(exc)}")
        if args.verbose:
            traceback.print_exc()
    rep.tables.append((
        f"scipy `solve_ivp(method=\"BDF\")` (numpy RHS, rtol={rtol:g}, atol={atol:g}) vs JAX",
        ["what", "scipy", "JAX (run)", "scipy / JAX", "notes"], rows,
        f"Finite differences: forward, step {args.fd_step:g}·max(1, |z_i|) in the "
        f"unconstrained coordinates. scipy gets no Jacobian (BDF finite-differences it) "
        f"and restarts at input discontinuities. RHS: "
        f"{numpy_model_for(name, model).label}. JAX times exclude compilation.",
    ))

    # ---------------- 3. batched gradients ----------------
    rows = []
    for S in (cal.ForwardMode(), cal.DiscreteAdjoint()):
        label = type(S).__name__
        obj = cal.Objective(model, integrator=integ, sensitivity=S)

        def nll(zz, mm, obj=obj):
            return obj.negative_log_likelihood(zz, mm)[0]

        def batched(ZZ, MM, S=S, nll=nll):
            return jax.vmap(lambda a, b: S.value_and_grad(nll, a, b))(ZZ, MM)

        prev = None  # (batch, seconds) of the last measured size
        for b in args.batches:
            if prev is not None and prev[1] * b / prev[0] > args.skip_s:
                est = prev[1] * b / prev[0]
                rows.append([label, str(b), "–", f"skipped: one call estimated at "
                             f"{est:.0f} s > {args.skip_s:.0f} s", "–", "–"])
                log(f"[{name}] batch {label} {b}: skipped (est. {est:.0f} s)")
                continue
            Zb = Z[:b]
            Mb = jax.tree.map(lambda a: a[:b], M)
            try:
                compiled, tc = aot_compile(batched, Zb, Mb)
                tr, (vals, gs), n_rep = time_compiled(compiled, Zb, Mb, repeats=args.repeats,
                                                      budget_s=60.0)
                n_bad = int(np.sum(~np.isfinite(np.asarray(vals))))
                note = f"{n_rep} calls" + (f"; {n_bad} failed solves" if n_bad else "")
                single = grad_times.get(label)
                per_ind = tr / b
                rows.append([label, str(b), fmt_s(tc), fmt_s(tr), f"{b / tr:,.1f}",
                             (f"{fmt_ratio(per_ind / single)} of single-call time per "
                              f"individual; " if single else "") + note])
                rep.facts[f"batch_{label}_{b}"] = tr
                prev = (b, tr)
                log(f"[{name}] batch {label} {b}: compile {tc:.2f} s, run {fmt_s(tr)} "
                    f"({b / tr:.1f} ind/s)")
            except Exception as exc:  # noqa: BLE001
                rows.append([label, str(b), "–", f"fails: {short_reason(exc)}", "–", "–"])
                log(f"[{name}] batch {label} {b}: FAILS {short_reason(exc)}")
                if args.verbose:
                    traceback.print_exc()
    rep.tables.append((
        "Gradient of the NLL vmapped over individuals (each with own parameters and data)",
        ["method", "batch", "compile", "time per batch", "individuals / s", "notes"], rows,
        "A vmapped adaptive solve runs every individual until the slowest one is done, so "
        "time per individual can exceed the single-call time. "
        f"Sizes whose single call is predicted (linearly from the previous size) to exceed "
        f"{args.skip_s:.0f} s are skipped.",
    ))

    # ---------------- 4. solver choice ----------------
    rows = []
    params = cal.Objective(model).params(z)
    ref_integ = cal.Integrator(rtol=1e-12, atol=1e-14, max_steps=200_000)
    ref_traj = cal.simulate(model, params, times, integrator=ref_integ)
    ref_obs = np.asarray(ref_traj.observables)

    def stats_fn(params, times, integrator):
        inputs = model.default_inputs()
        sol = dfx.diffeqsolve(
            dfx.ODETerm(model.vector_field), integrator.ode_solver(), t0=model.t0,
            t1=jnp.maximum(times[-1], model.t0), dt0=integrator.dt0,
            y0=model.initial_state(params), args=(params, dict(inputs)),
            saveat=dfx.SaveAt(ts=times),
            stepsize_controller=integrator.controller(_jump_times(model, params, inputs)),
            max_steps=integrator.max_steps, throw=False,
        )
        return sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

    results = {}
    tight = cal.Integrator(rtol=rtol * 1e-2, atol=atol * 1e-2)
    configs = (
        ("diffrax default", "diffrax default `dfx.Kvaerno5()` (VeryChord root finder)",
         cal.Integrator(solver=dfx.Kvaerno5())),
        ("Kvaerno5 chord", "calibrate `kvaerno5_chord` (Kvaerno5 + Chord at 1% of tol.)",
         cal.Integrator(solver=cal.kvaerno5_chord(integ.rtol, integ.atol))),
        ("calibrate default", "calibrate default (Rodas5)", integ),
        ("calibrate tight", f"calibrate default solver at rtol={tight.rtol:g}, "
         f"atol={tight.atol:g} (100× tighter)", tight),
    )
    for key, label, integrator in configs:
        try:
            def f(z, times, integrator=integrator):
                traj = cal.simulate(model, cal.Objective(model).params(z), times,
                                    integrator=integrator)
                return traj.observables, traj.num_steps, traj.ok

            compiled, tc = aot_compile(f, z, times)
            tr, (obs, steps, ok), _ = time_compiled(compiled, z, times, repeats=args.repeats)
            acc, rej = jax.jit(stats_fn, static_argnums=2)(params, times, integrator)
            err = float(np.max(np.abs(np.asarray(obs) - ref_obs)))
            results[key] = (tr, int(steps), err)
            rows.append([label, f"{int(acc)} / {int(rej)}", fmt_s(tc), fmt_s(tr),
                         fmt_g(err), str(bool(ok))])
        except Exception as exc:  # noqa: BLE001
            rows.append([label, "–", "–", f"fails: {short_reason(exc)}", "–", "–"])
    for other in ("Kvaerno5 chord", "calibrate default", "calibrate tight"):
        if "diffrax default" in results and other in results:
            t_a, s_a, e_a = results["diffrax default"]
            t_b, s_b, e_b = results[other]
            rows.append([f"ratio diffrax default / {other}", f"{s_a / s_b:.2f}× steps",
                         "", fmt_ratio(t_a / t_b), f"{e_a / max(e_b, 1e-300):.3g}× error", ""])
            rep.facts[f"kvaerno_ratio_{other}"] = (t_a / t_b, s_a / s_b, e_a / max(e_b, 1e-300))
            log(f"[{name}] Kvaerno5 default / {other}: time {t_a / t_b:.2f}×, "
                f"steps {s_a / s_b:.2f}×, error {e_a / max(e_b, 1e-300):.3g}×")
    rep.tables.append((
        "Solver choice: diffrax's default Kvaerno5 vs calibrate's default",
        ["solver", "accepted / rejected steps", "compile", "solve (run)",
         "max abs. error of observables", "ok"], rows,
        "Error: max. absolute difference of the observables from a solve at rtol=1e-12, "
        "atol=1e-14 (calibrate default solver), at the parameters of individual 0. "
        "Where diffrax's root finder rejects many steps, the smaller steps it ends up with "
        "make it more accurate than asked; the tighter row shows what calibrate's solver "
        "costs at a comparable or better accuracy.",
    ))
    rep.facts["t_data"] = t_data
    return rep


# --------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------


def machine_info():
    import diffrax
    import equinox
    import jax
    import optimistix
    import scipy

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "platform": f"{platform.platform()}, Python {platform.python_version()}",
        "versions": (f"jax {jax.__version__} ({jax.default_backend()}), diffrax "
                     f"{diffrax.__version__}, optimistix {optimistix.__version__}, equinox "
                     f"{equinox.__version__}, scipy {scipy.__version__}, numpy "
                     f"{np.__version__}"),
        "load": load,
    }


def auto_summary(reports):
    lines = []
    for rep in reports:
        f = rep.facts
        bits = []
        gt = f.get("grad_times") or {}
        if gt:
            order = sorted(gt, key=gt.get)
            fastest = gt[order[0]]
            bits.append("gradient methods fastest first: " + ", ".join(
                f"{k} {fmt_s(gt[k])}" + ("" if k == order[0] else f" ({gt[k] / fastest:.2g}×)")
                for k in order))
            bad = [k for k in gt if f.get(f"grad_diff_{k}", 0.0) > 1e-3]
            if bad:
                bits.append("inaccurate gradient (rel. diff. to ForwardMode > 1e-3): " + ", ".join(
                    f"{k} ({f[f'grad_diff_{k}']:.1e})" for k in bad))
        for label in ("ForwardMode", "DiscreteAdjoint"):
            sizes = sorted(int(k.rsplit("_", 1)[1]) for k in f
                           if k.startswith(f"batch_{label}_"))
            if sizes and label in gt:
                b = sizes[-1]
                tb = f[f"batch_{label}_{b}"]
                bits.append(f"{label} vmapped over {b}: {b / tb:,.0f} individuals/s, "
                            f"{gt[label] * b / tb:.3g}× the throughput of single calls")
        for k, why in (f.get("grad_failures") or {}).items():
            bits.append(f"{k} fails: {why.rstrip('.')}")
        if "solve_ratio" in f:
            bits.append(f"scipy BDF solve takes {f['solve_ratio']:.3g}× the JAX solve")
        if "grad_ratio_fm" in f:
            r, best = f["grad_ratio_best"]
            text = f"the FD gradient takes {f['grad_ratio_fm']:.3g}× the ForwardMode gradient"
            if best != "ForwardMode":
                text += f" and {r:.3g}× the fastest JAX gradient ({best})"
            bits.append(text + f"; FD vs JAX gradient rel. diff. {f['fd_rel_diff']:.1e}")
        if "kvaerno_ratio_calibrate default" in f:
            tr, sr, er = f["kvaerno_ratio_calibrate default"]
            text = (f"diffrax's default Kvaerno5 needs {sr:.2f}× the steps and {tr:.2f}× "
                    f"the time of calibrate's default solver, with {er:.2g}× its error")
            if "kvaerno_ratio_calibrate tight" in f:
                tr, sr, er = f["kvaerno_ratio_calibrate tight"]
                text += (f" ({sr:.2f}× the steps, {tr:.2f}× the time and {er:.2g}× the error "
                         f"of calibrate's solver at 100× tighter tolerances)")
            bits.append(text)
        if bits:
            lines.append(f"- **{rep.name}**: " + "; ".join(bits) + ".")
    return lines


def render(reports, info, args, elapsed, argv):
    out = ["# calibrate core benchmarks", ""]
    out += ["<!-- SUMMARY -->", ""]
    out += [
        f"- Date: {info['date']}; total runtime {elapsed / 60:.1f} min",
        f"- Machine: {info['cpu']}; {info['platform']}",
        f"- Versions: {info['versions']}",
        f"- Load average (1/5/15 min) at start: {info['load_start']}, at end: {info['load']}",
        f"- Command: `python {' '.join(argv)}`",
        "- Tolerances: `calibrate.Integrator()` defaults (rtol=1e-8, atol=1e-10, "
        "max_steps=20000) for JAX and scipy alike.",
        "- Run times are medians of repeated calls after one warm call "
        "(`block_until_ready`); compile time is `jax.jit(f).lower(...).compile()`. "
        "The machine was shared with other jobs, so treat single timings as noisy and "
        "compare the ratios taken in the same run.",
        "",
        "## Key numbers (generated)",
        "",
        *auto_summary(reports),
        "",
    ]
    for rep in reports:
        out += [f"## {rep.name}", "", rep.header, ""]
        for title, cols, rows, note in rep.tables:
            out += [f"### {title}", "", "| " + " | ".join(cols) + " |",
                    "|" + "|".join("---" for _ in cols) + "|"]
            for r in rows:
                r = list(r) + [""] * (len(cols) - len(r))
                out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
            if note:
                out += ["", note]
            out.append("")
    return "\n".join(out) + "\n"


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo models (default: all of calibrate.zoo_names())")
    parser.add_argument("--batches", default="1,10,100,1000",
                        help="comma-separated batch sizes for the vmapped gradient")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per measurement (more for calls under 0.4 s, "
                             "fewer for calls over 12 s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--fd-step", type=float, default=1e-5,
                        help="relative forward-difference step in z")
    parser.add_argument("--skip-s", type=float, default=120.0,
                        help="skip a batch size whose single call would take longer")
    parser.add_argument("--method-timeout", type=float, default=900.0,
                        help="seconds (compile + runs) before a sensitivity method of the "
                             "single-individual gradient is reported as failing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = parser.parse_args(argv[1:])
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import jax

    import calibrate as cal

    models = args.models or cal.zoo_names()
    info = machine_info()
    info["load_start"] = info["load"]

    def log(msg):
        print(msg, flush=True)

    # Warm JAX's own start-up so the first compile time is not inflated by it.
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))

    start = time.perf_counter()
    reports = []
    for name in models:
        try:
            reports.append(bench_model(name, args, log))
        except Exception as exc:  # noqa: BLE001
            log(f"[{name}] benchmark FAILED: {short_reason(exc)}")
            traceback.print_exc()
            reports.append(ModelReport(name=name, header=f"benchmark failed: "
                                       f"{short_reason(exc)}"))
        # Write what we have after each model, so a long run leaves partial results.
        elapsed = time.perf_counter() - start
        info.update(machine_info() | {"load_start": info["load_start"]})
        write_atomic(args.out, render(reports, info, args, elapsed, argv))
    text = render(reports, info, args, time.perf_counter() - start, argv)
    write_atomic(args.out, text)
    print(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
