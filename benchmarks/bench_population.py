#!/usr/bin/env python
"""Population benchmark: one outer hypergradient of the stiff cascade at N individuals.

Run from the repository root:

    python benchmarks/bench_population.py                          # N = 10, 100, 1000
    python benchmarks/bench_population.py --sizes 10 --naive-sizes 10 --out scratch.md

The problem: `mapk_cascade` with log10 k3 and log10 k5 population-distributed
(sd 0.1) and the basal active RAF fraction at t = 0 a shared fixed effect; Laplace
(FOCE-I) outer objective; θ = (RAFp0, μ_k3, μ_k5, log ω_k3, log ω_k5).

For each N, in a fresh child process (so peak memory is per N):

1. compile time of the batched evaluation (warm inner LM fits + implicit hypergradient),
   its run time from converged warm starts, and the run time of the hypergradient
   alone at fixed inner optima (vmapped `Implicit.at_optimum`), for each strategy in
   `--strategies` (curvature × linear solver);
2. peak resident memory of the process (and device memory on GPU).

Side by side, for `--naive-sizes`: what a user without hypergradients writes, central
finite differences on θ around a loop of per-individual scipy fits
(`scipy.optimize.least_squares`, BDF solves, finite-difference Jacobians), the Laplace
objective evaluated from scipy's Jacobian. Reported as a ratio to the batched
evaluation at the same N.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import traceback

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = {
    "forward-direct": ("ForwardHessian", "DirectSolve"),
    "forward-cg": ("ForwardHessian", "ConjugateGradient"),
    "gauss-newton-direct": ("GaussNewton", "DirectSolve"),
    "gauss-newton-cg": ("GaussNewton", "ConjugateGradient"),
}
RANDOM = ("k3", "k5")
FIXED = ("RAFp0",)
SD = 0.1


def _problem(n, seed):
    """Synthetic cascade population of size n (simulated in one vmapped solve)."""
    import jax
    import jax.numpy as jnp
    import pandas as pd

    import calibrate as cal

    cascade = cal.zoo_module("mapk_cascade")
    model = cascade.MODEL()
    truth = dict(cascade.TRUE_PARAMETERS, RAFp0=0.1)
    rng = np.random.default_rng(seed)
    eta = SD * rng.normal(size=(n, len(RANDOM)))
    space = model.parameter_space
    base = space.complete(truth)
    params = {k: jnp.broadcast_to(v, (n,)) for k, v in base.items()}
    for j, name in enumerate(RANDOM):
        params[name] = params[name] * 10 ** jnp.asarray(eta[:, j])
    times = cascade.OBSERVATION_TIMES
    integrator = cal.Integrator(rtol=1e-10, atol=1e-12)
    from calibrate._batching import map_individuals, safe_chunk_size

    chunk = safe_chunk_size(len(model.states) ** 3)
    traj = jax.jit(lambda params: map_individuals(
        lambda p: cal.simulate(model, p, times, integrator=integrator), (params,), (0,),
        chunk if n > chunk else None))(params)
    obs = np.asarray(traj.observables)
    obs = obs + 0.01 * rng.normal(size=obs.shape)
    rows = [
        (f"ind{i:05d}", float(t), name, float(obs[i, a, k]))
        for i in range(n) for a, t in enumerate(np.asarray(times))
        for k, name in enumerate(model.observable_names)
    ]
    frame = pd.DataFrame(rows, columns=["individual", "time", "observable", "value"])
    data = cal.dataset_for_model(model, frame, source="<benchmark>")
    start = {"k3": 2 * truth["k3"], "k5": 0.5 * truth["k5"], "RAFp0": 0.05}
    # The generating random effects relative to the start means: near-optimal first
    # inner starts, so that N = 1000 needs no cold fits (minutes per LM step there).
    shift = np.array([math.log10(start[name] / truth[name]) for name in RANDOM])
    return model, data, truth, start, eta - shift


def _peak_memory_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return peak, stats["peak_bytes_in_use"] / 2**20
    except Exception:  # CPU devices have no memory statistics
        pass
    return peak, None


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def measure(n, strategies, repeats, seed, queue):
    """Child process: time each strategy at size n; put a dict on `queue`."""
    out = {"n": n, "rows": [], "error": None}
    try:
        import jax
        import jax.numpy as jnp

        import calibrate as cal
        from calibrate._batching import map_individuals

        model, data, truth, start, near = _problem(n, seed)
        hierarchy = cal.Hierarchy(random=RANDOM, fixed=FIXED)
        setup = cal.population_setup(model, data, hierarchy=hierarchy, start=start,
                                     start_sd=0.2)
        theta = setup.theta
        starts = None
        for label in strategies:
            curvature, solver = STRATEGIES[label]
            method = cal.Implicit(curvature=getattr(cal, curvature)(),
                                  linear_solver=getattr(cal, solver)())
            row = {"strategy": label, "chunk_size": setup.chunk_size}
            t0 = time.perf_counter()
            first = _block(setup.evaluate(method, theta, jnp.asarray(near) if starts is None
                                          else starts))
            row["first_call_s"] = time.perf_counter() - t0
            if starts is None:
                starts = setup.converge_inner(method, theta, first.hypergradients.inner_solution)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                e = _block(setup.evaluate(method, theta, starts))
                times.append(time.perf_counter() - t0)
            row["evaluation_s"] = float(np.median(times))
            row["compile_s"] = max(row["first_call_s"] - row["evaluation_s"], 0.0)
            row["inner_steps_max"] = int(jnp.max(e.hypergradients.inner_steps))
            row["not_stationary"] = int(jnp.sum(e.hypergradients.result != 0))
            row["gradient"] = np.asarray(jax.flatten_util.ravel_pytree(e.gradient)[0]).tolist()

            at_optimum = jax.jit(lambda u, train, inputs: map_individuals(
                lambda u, train, inputs: method.at_optimum(
                    setup.bilevel, u, theta, (train, None, inputs)),
                (u, train, inputs), (0, 0, 0), setup.chunk_size,
            ))
            train, _, inputs = setup.batch
            u = e.hypergradients.inner_solution
            t0 = time.perf_counter()
            _block(at_optimum(u, train, inputs))
            first_h = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _block(at_optimum(u, train, inputs))
                times.append(time.perf_counter() - t0)
            row["hypergradient_s"] = float(np.median(times))
            row["hypergradient_compile_s"] = max(first_h - row["hypergradient_s"], 0.0)
            row["peak_rss_mb"], row["peak_device_mb"] = _peak_memory_mb()
            out["rows"].append(row)
            print(f"N={n} {label}: {row}", flush=True)
        out["theta"] = {k: np.asarray(v).tolist() for k, v in theta.items()}
    except Exception:
        out["error"] = traceback.format_exc()
    queue.put(out)


# ---- the naive alternative: scipy fits in a loop, finite differences on θ ------------


def naive_gradient(n, seed, step=1e-3):
    """Central differences of the Laplace objective over θ, each evaluation a Python
    loop of scipy least-squares fits (BDF solves, finite-difference Jacobians).

    Tolerances are set so the result is a usable gradient: scipy's default Jacobian
    step (~1.5e-8) against a BDF solve at rtol 1e-8 gives O(1) errors in J and so in
    the log-determinant of the Laplace objective; at rtol 1e-10 with a 1e-5 step they
    are ~1e-5."""
    from scipy.integrate import solve_ivp
    from scipy.optimize import least_squares

    import calibrate as cal

    model, data, truth, start, _ = _problem(n, seed)
    times = np.asarray(data.measurements.times[0])
    values = np.asarray(data.measurements.values)
    space = model.parameter_space
    base = {k: float(v) for k, v in space.complete(truth).items()}

    sys.path.insert(0, HERE)
    from bench_core import _mapk_rhs  # the plain-numpy right-hand side

    def simulate(p):
        def rhs(t, x):
            return _mapk_rhs(t, x, p, {"L": 1.0 if t < 60 else 0.0})

        x0 = np.array([1, 0, 1 - p["RAFp0"], p["RAFp0"], 1, 0, 1, 0, 0.0])
        first = solve_ivp(rhs, (0, 60), x0, method="BDF", rtol=1e-10, atol=1e-12,
                          t_eval=times[times < 60])
        second = solve_ivp(rhs, (60, times[-1]), first.y[:, -1] if first.y.size else x0,
                           method="BDF", rtol=1e-10, atol=1e-12, t_eval=times[times >= 60])
        x = np.concatenate([first.y, second.y], axis=1)
        return x[[3, 5, 7, 8]].T

    def laplace(theta):
        z_raf0, mu3, mu5, log_w3, log_w5 = theta
        raf0 = 0.9 / (1 + math.exp(-z_raf0))  # RAFp0 in [0, 0.9], as calibrate maps it
        omega = np.exp([log_w3, log_w5])
        total = 0.0
        for i in range(n):
            def residuals(eta):
                p = dict(base, RAFp0=raf0, k3=10 ** (mu3 + eta[0]), k5=10 ** (mu5 + eta[1]))
                r = (simulate(p) - values[i]) / 0.01
                return np.concatenate([r.ravel(), eta / omega])

            fit = least_squares(residuals, np.zeros(2), x_scale=omega, diff_step=1e-5,
                                xtol=1e-10, ftol=1e-10, gtol=1e-10)
            r = fit.fun
            jac = fit.jac[:-2]
            nll = 0.5 * np.sum(r[:-2] ** 2) + r[:-2].size * (math.log(0.01)
                                                            + 0.5 * math.log(2 * math.pi))
            h = jac.T @ jac + np.diag(1 / omega**2)
            total += nll + 0.5 * np.sum(r[-2:] ** 2) + np.sum(np.log(omega)) \
                + 0.5 * np.linalg.slogdet(h)[1]
        return total

    theta = np.array([math.log(start["RAFp0"] / (0.9 - start["RAFp0"])), math.log10(start["k3"]), math.log10(start["k5"]),
                      math.log(0.2), math.log(0.2)])
    t0 = time.perf_counter()
    grad = np.zeros_like(theta)
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = step * max(1.0, abs(theta[j]))
        grad[j] = (laplace(theta + e) - laplace(theta - e)) / (2 * e[j])
    return time.perf_counter() - t0, grad


def run_isolated(fn, args, timeout):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": f"timed out after {timeout} s", "rows": [], "n": args[0]}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return result


def _naive_child(n, seed, queue):
    try:
        seconds, grad = naive_gradient(n, seed)
        queue.put({"n": n, "seconds": seconds, "gradient": grad.tolist(), "error": None})
    except Exception:
        queue.put({"n": n, "error": traceback.format_exc()})


def render(results, naive, args, elapsed):
    import jax

    import calibrate as cal

    lines = [
        "# Population benchmark: one outer hypergradient of the stiff cascade",
        "",
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')} on "
        f"{platform.machine()} with {os.cpu_count()} CPUs, device `{jax.devices()[0]}`, "
        f"jax {jax.__version__}, calibrate {cal.__version__}; {elapsed / 60:.1f} min. "
        f"Command: `python benchmarks/bench_population.py {' '.join(sys.argv[1:])}`.",
        "",
        "Problem: `mapk_cascade`, log10 k3 and log10 k5 population-distributed (sd 0.1), "
        "RAFp0 shared; Laplace (FOCE-I) objective; θ has 5 entries; 32 times × 4 "
        "observables per individual. `evaluation` = warm-started inner LM fits "
        "(at most 64 steps) + hypergradient, from converged warm starts; `hypergradient` "
        "= the implicit hypergradient alone at fixed inner optima; `chunk` = individuals per "
        "vmapped chunk (on CPU, chunks keep jaxlib's batched LAPACK kernels on one thread; "
        "see `calibrate/_batching.py`). Times are medians "
        f"of {args.repeats} calls after compilation.",
        "",
        "| N | strategy | chunk | first call − warm call s | evaluation s | hypergradient s | hypergradient compile s | inner steps (max) | not stationary | peak RSS MB | peak device MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res.get("error"):
            lines.append(f"| {res['n']} | failed | {res['error'].strip().splitlines()[-1]} |"
                         " | | | | | | | |")
            continue
        for row in res["rows"]:
            device = "" if row["peak_device_mb"] is None else f"{row['peak_device_mb']:.0f}"
            lines.append(
                f"| {res['n']} | {row['strategy']} | {row.get('chunk_size') or 'all'} | "
                f"{row['compile_s']:.1f} | "
                f"{row['evaluation_s']:.3g} | {row['hypergradient_s']:.3g} | "
                f"{row['hypergradient_compile_s']:.1f} | {row['inner_steps_max']} | "
                f"{row['not_stationary']} | {row['peak_rss_mb']:.0f} | {device} |"
            )
    if naive:
        lines += [
            "",
            "Naive alternative, same N, same start θ: central finite differences on θ "
            "(10 Laplace evaluations), each a Python loop of per-individual "
            "`scipy.optimize.least_squares` fits with BDF solves. Ratio = naive time / "
            "batched evaluation time (first strategy) at the same N, both after any "
            "compilation; `max rel. diff` compares the two gradients.",
            "",
            "| N | naive s | batched evaluation s | ratio | max rel. diff of gradients |",
            "|---|---|---|---|---|",
        ]
        by_n = {r["n"]: r for r in results if not r.get("error") and r["rows"]}
        for res in naive:
            if res.get("error"):
                lines.append(f"| {res['n']} | failed: {res['error'].strip().splitlines()[-1]} |"
                             " | | |")
                continue
            ours = by_n.get(res["n"])
            if ours is None:
                lines.append(f"| {res['n']} | {res['seconds']:.1f} | – | – | – |")
                continue
            row = ours["rows"][0]
            a, b = np.asarray(res["gradient"]), np.asarray(row["gradient"])
            diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
            lines.append(f"| {res['n']} | {res['seconds']:.1f} | {row['evaluation_s']:.3g} | "
                         f"{res['seconds'] / row['evaluation_s']:.0f}x | {diff:.1e} |")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench-", suffix=".md")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--naive-sizes", default="10")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all-strategies-up-to", type=int, default=100,
                        help="larger sizes run only the first strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS_population.md"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    naive_sizes = [int(s) for s in args.naive_sizes.split(",") if s]
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    t0 = time.perf_counter()
    results, naive = [], []
    for n in sizes:
        chosen = strategies if n <= args.all_strategies_up_to else strategies[:1]
        results.append(run_isolated(measure, (n, chosen, args.repeats, args.seed),
                                    args.timeout))
        write_atomic(args.out, render(results, naive, args, time.perf_counter() - t0))
    for n in naive_sizes:
        naive.append(run_isolated(_naive_child, (n, args.seed), args.timeout))
        write_atomic(args.out, render(results, naive, args, time.perf_counter() - t0))
    print(open(args.out).read())


if __name__ == "__main__":
    main()
