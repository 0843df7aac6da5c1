#!/usr/bin/env python
"""Stiff solvers side by side: calibrate's Kvaerno5 (chord Newton) against Rodas5.

Run from the repository root:

    python benchmarks/bench_solvers.py [--repeats 5] [--out benchmarks/RESULTS_solvers.md]

For the zoo models (synthetic data at the true parameters) and PEtab benchmark
problems (tests/data/petab, nominal parameters) and each solver at the default
tolerances (rtol 1e-8, atol 1e-10): compile time of the forward-mode gradient of the
negative log-likelihood, run times (median of repeats after a warm call) of the
likelihood and of its gradient, accepted and rejected steps, and the error of the
likelihood and gradient against a reference at rtol 1e-12, atol 1e-14.
Ratios are Rodas5 / Kvaerno5 from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import calibrate as cal  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
PETAB = ROOT / "tests" / "data" / "petab"
DEFAULT = cal.Integrator()
SOLVERS = {"Kvaerno5": cal.kvaerno5_chord(DEFAULT.rtol, DEFAULT.atol), "Rodas5": None}


def _median_time(function, *args, repeats):
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def zoo_case(name: str, integrator: cal.Integrator):
    """(value function, value-and-gradient function, point, steps function)."""
    module = cal.zoo_module(name)
    model = module.MODEL()
    data = module.synthetic_data(jax.random.key(0), n_individuals=1)
    measurements = jax.tree.map(lambda a: a[0], data.measurements)
    inputs = jax.tree.map(lambda a: a[0], data.batched_inputs(model))
    objective = cal.Objective(model, integrator=integrator)
    z = objective.space.to_vector(model.parameter_space.complete(module.TRUE_PARAMETERS))
    value = lambda z: objective.negative_log_likelihood(z, measurements, inputs)[0]
    steps = lambda z: objective.trajectory(z, measurements, inputs).num_steps
    return value, z, steps


def petab_case(name: str, integrator: cal.Integrator):
    reference = json.loads((PETAB / "reference.json").read_text())[name]
    problem = cal.load_petab(PETAB / reference["yaml"], integrator=integrator)
    return lambda x: problem.negative_log_likelihood(x), problem.nominal_x(), None


CASES = {
    "reference": zoo_case, "enzyme_kinetics": zoo_case, "mapk_cascade": zoo_case,
    "Boehm_JProteomeRes2014": petab_case, "Fujita_SciSignal2010": petab_case,
    "Brannmark_JBC2010": petab_case,
}


def bench(name: str, solver_name: str, repeats: int) -> dict:
    integrator = cal.Integrator(solver=SOLVERS[solver_name], max_steps=100_000)
    value, x, steps = CASES[name](name, integrator)
    value_jit = jax.jit(value)
    gradient = jax.jit(lambda x: cal.ForwardMode().value_and_grad(value, x))
    started = time.perf_counter()
    gradient.lower(x).compile()
    compile_s = time.perf_counter() - started
    v, g = jax.block_until_ready(gradient(x))
    row = {"compile_s": compile_s,
           "value_s": _median_time(value_jit, x, repeats=repeats),
           "gradient_s": _median_time(gradient, x, repeats=repeats),
           "value": float(v), "gradient": np.asarray(g).tolist()}
    if steps is not None:
        row["steps"] = int(jax.jit(steps)(x))
    return row


def reference_point(name: str) -> tuple[float, np.ndarray]:
    integrator = cal.Integrator(solver=cal.kvaerno5_chord(1e-12, 1e-14), rtol=1e-12,
                                atol=1e-14, max_steps=200_000)
    value, x, _ = CASES[name](name, integrator)
    v, g = jax.jit(lambda x: cal.ForwardMode().value_and_grad(value, x))(x)
    return float(v), np.asarray(g)


def render(rows, started, argv) -> str:
    lines = [
        "# Stiff solvers: Kvaerno5 (chord Newton) against Rodas5", "",
        f"`python benchmarks/bench_solvers.py {' '.join(argv)}` on {platform.node() or 'host'} "
        f"({os.cpu_count()} CPUs, {jax.devices()[0].platform}), {started:%Y-%m-%d %H:%M} UTC; "
        f"jax {jax.__version__}, calibrate {cal.__version__}. Default tolerances "
        "(rtol 1e-8, atol 1e-10); errors against rtol 1e-12, atol 1e-14 (Kvaerno5). "
        "Gradients: ForwardMode. Ratios: Rodas5 / Kvaerno5 (below 1: Rodas5 faster).", "",
        "| case | solver | steps | likelihood | gradient | compile | error of −log L | "
        "error of gradient (max-rel) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for name, by_solver in rows.items():
        for solver_name, r in by_solver.items():
            if "error" in r:
                lines.append(f"| {name} | {solver_name} | failed: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {name} | {solver_name} | {r.get('steps', '—')} | "
                f"{r['value_s'] * 1e3:.2f} ms | {r['gradient_s'] * 1e3:.2f} ms | "
                f"{r['compile_s']:.1f} s | {r['value_error']:.1e} | {r['gradient_error']:.1e} |")
        k, rd = by_solver.get("Kvaerno5", {}), by_solver.get("Rodas5", {})
        if "value_s" in k and "value_s" in rd:
            ratios.append(f"| {name} | {rd['value_s'] / k['value_s']:.2f} | "
                          f"{rd['gradient_s'] / k['gradient_s']:.2f} | "
                          f"{rd['compile_s'] / k['compile_s']:.2f} |")
    lines += ["", "| case | likelihood ratio | gradient ratio | compile ratio |",
              "|---|---|---|---|", *ratios, ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_solvers.md"))
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    rows = {}
    for name in args.cases.split(","):
        reference_value, reference_gradient = reference_point(name)
        rows[name] = {}
        for solver_name in SOLVERS:
            try:
                r = bench(name, solver_name, args.repeats)
            except Exception as error:  # a failing solver is a result, not a crash
                rows[name][solver_name] = {"error": f"{type(error).__name__}: {error}"[:120]}
                continue
            r["value_error"] = abs(r["value"] - reference_value) / abs(reference_value)
            r["gradient_error"] = float(np.max(np.abs(np.asarray(r["gradient"])
                                                      - reference_gradient))
                                        / np.max(np.abs(reference_gradient)))
            rows[name][solver_name] = r
            print(name, solver_name, {k: v for k, v in r.items() if k != "gradient"},
                  flush=True)
    text = render(rows, started, sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, out)
    print(text)


if __name__ == "__main__":
    main()
