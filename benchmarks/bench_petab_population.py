#!/usr/bin/env python
"""A population of Boehm-sized individuals: calibrate's hierarchical fit against a loop
of AMICI individual fits doing the same job, on the same CPU, in one run.

    python benchmarks/bench_petab_population.py --individuals 100 \
        --amici-python /path/to/amici-venv/bin/python --out benchmarks/RESULTS_petab_population.md

The problem is Boehm_JProteomeRes2014 (8 states, 48 measurements per individual) with
`Epo_degradation_BaF3` and `k_phos` log-normal across individuals (ω = 0.2 on the log
scale), the other four kinetic parameters shared and the noise levels known. Data are
simulated at the collection's optimum, with each individual's two parameters drawn from
the population, plus normal noise of the collection's σ. Both sides start from the
same point (every kinetic parameter 10^0.1 above its true value, or below
where that would cross its upper bound):

- calibrate: `calibrate_population(load_petab(yaml))`, the PEtab population extension
  (FOCE-I objective, implicit hypergradients, every individual's MAP fit batched);
- AMICI: for each individual, a fides trust-region fit (BFGS, forward sensitivities)
  of its six kinetic parameters to its data — the two-stage approach whose estimates
  are then summarised across individuals.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_petab import run_amici_side


HERE = Path(__file__).resolve().parent
BOEHM = HERE.parent / "tests" / "data" / "petab" / "Boehm_JProteomeRes2014"
RANDOM = {"Epo_degradation_BaF3": 0.2, "k_phos": 0.2}
SHARED = ("k_exp_hetero", "k_exp_homo", "k_imp_hetero", "k_imp_homo")
START_OFFSET_LOG10 = 0.1

# `Integrator`'s default (Rodas5), or Kvaerno5 with chord Newton for comparison.
SOLVERS = ("rodas5", "kvaerno5")
# The default outer optimiser (BFGS), or BHHH for comparison.
OUTERS = ("bfgs", "bhhh")


def write_problem(folder: Path, individuals: int, seed: int) -> dict:
    """Writes the population PEtab problem to `folder`; returns the truth."""
    import jax
    import jax.numpy as jnp
    import pandas as pd

    import calibrate as cal

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model_Boehm_JProteomeRes2014.xml",
                 "experimentalCondition_Boehm_JProteomeRes2014.tsv",
                 "observables_Boehm_JProteomeRes2014.tsv"):
        shutil.copy(BOEHM / name, folder / name)
    source = cal.load_petab(BOEHM / "Boehm_JProteomeRes2014.yaml",
                            integrator=cal.Integrator(rtol=1e-10, atol=1e-12))
    truth_x = np.asarray(source.nominal_x())
    ids = list(source.estimated_ids)
    rng = np.random.default_rng(seed)
    xs = np.repeat(truth_x[None], individuals, axis=0)
    for pid, omega in RANDOM.items():
        xs[:, ids.index(pid)] += omega * rng.standard_normal(individuals) / np.log(10)
    y, sigma, _ = jax.jit(jax.vmap(lambda x: source.predictions(x)))(jnp.asarray(xs))
    y, sigma = np.asarray(y), np.asarray(sigma)
    noisy = y + sigma * rng.standard_normal(y.shape)
    base = pd.read_csv(BOEHM / "measurementData_Boehm_JProteomeRes2014.tsv", sep="\t",
                       dtype=str, keep_default_na=False)
    frames = []
    for i in range(individuals):
        frame = base.copy()
        frame.insert(0, "individualId", f"id{i:04d}")
        frame["measurement"] = [f"{v:.10g}" for v in noisy[i]]
        frames.append(frame)
    pd.concat(frames).to_csv(folder / "measurements.tsv", sep="\t", index=False)
    parameters = pd.read_csv(BOEHM / "parameters_Boehm_JProteomeRes2014.tsv", sep="\t",
                             dtype=str, keep_default_na=False)
    distribution, sd, nominal, estimate = [], [], [], []
    for _, row in parameters.iterrows():
        pid = row["parameterId"]
        kinetic = pid in RANDOM or pid in SHARED
        distribution.append("logNormal" if pid in RANDOM else "fixed" if kinetic else "")
        sd.append(str(RANDOM[pid] * 1.5) if pid in RANDOM else "")
        value = float(row["nominalValue"])
        up = 10 ** START_OFFSET_LOG10
        factor = up if value * up < float(row["upperBound"]) else 1 / up
        nominal.append(repr(value * factor) if kinetic else row["nominalValue"])
        estimate.append("1" if kinetic else "0")
    parameters["nominalValue"] = nominal
    parameters["estimate"] = estimate
    parameters["populationDistribution"] = distribution
    parameters["populationSd"] = sd
    parameters.to_csv(folder / "parameters.tsv", sep="\t", index=False)
    (folder / "problem.yaml").write_text(
        "format_version: 1\n"
        "parameter_file: parameters.tsv\n"
        "problems:\n"
        "  - sbml_files: [model_Boehm_JProteomeRes2014.xml]\n"
        "    condition_files: [experimentalCondition_Boehm_JProteomeRes2014.tsv]\n"
        "    measurement_files: [measurements.tsv]\n"
        "    observable_files: [observables_Boehm_JProteomeRes2014.tsv]\n")
    return {pid: 10.0 ** truth_x[ids.index(pid)] for pid in (*RANDOM, *SHARED)}


def calibrate_side(folder: Path, max_steps: int, solver: str, outer: str) -> dict:
    import calibrate as cal
    from calibrate._compilation import compilation

    default = cal.Integrator()
    integrator = default if solver == "rodas5" else cal.Integrator(
        solver=cal.kvaerno5_chord(default.rtol, default.atol))
    started = time.perf_counter()
    with compilation() as log:
        problem = cal.load_petab(folder / "problem.yaml", integrator=integrator)
        optimiser = {"bhhh": cal.BHHH, "bfgs": cal.QuasiNewton}[outer](max_steps=max_steps)
        result = cal.calibrate_population(problem, outer=optimiser)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "compile_s": log.seconds, "result": result}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--individuals", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--solver", choices=SOLVERS, default=SOLVERS[0])
    parser.add_argument("--outer", choices=OUTERS, default=OUTERS[0])
    parser.add_argument("--amici-python")
    parser.add_argument("--out", default=str(HERE / "RESULTS_petab_population.md"))
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    with tempfile.TemporaryDirectory(prefix="boehm_population_") as tmp:
        folder = Path(tmp)
        truth = write_problem(folder, args.individuals, args.seed)
        ours = calibrate_side(folder, args.max_steps, args.solver, args.outer)
        theirs = run_amici_side(args.amici_python, "--population", str(folder),
                                "--individuals", str(args.individuals)) \
            if args.amici_python else None
    report(args, truth, ours, theirs)


def report(args, truth, ours, theirs):
    import jax

    import calibrate as cal

    result = ours["result"]
    lines = [
        "# A population of Boehm-sized individuals: calibrate against an AMICI loop",
        "",
        f"`python benchmarks/bench_petab_population.py --individuals {args.individuals}"
        f"{'' if args.solver == SOLVERS[0] else ' --solver ' + args.solver}"
        f"{'' if args.outer == OUTERS[0] else ' --outer ' + args.outer}"
        f"{' --amici-python AMICI' if theirs else ''}` on {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"jax {jax.__version__}, calibrate {cal.__version__}"
        f"{', AMICI ' + theirs['version'] if theirs else ''}.",
        "",
        "| side | what | wall (incl. compile) | compile | converged |",
        "|---|---|---|---|---|",
        f"| calibrate | hierarchical fit of {args.individuals} individuals "
        f"({args.outer.upper()}, {result.outer_steps} outer steps, then standard errors) "
        f"| {ours['wall_s']:.1f} s | "
        f"{ours['compile_s']:.1f} s "
        f"| {bool(result.converged)} |",
    ]
    if theirs:
        lines.append(
            f"| AMICI + fides | {args.individuals} individual fits, one after another | "
            f"{theirs['loop_s']:.1f} s ({theirs['loop_s'] / args.individuals:.2f} s each) | "
            f"{theirs['import_s']:.1f} s (model build) | {theirs['converged']} of "
            f"{args.individuals} |")
        lines += ["", f"Ratio AMICI loop / calibrate: {theirs['loop_s'] / ours['wall_s']:.2f}× "
                  f"(excluding calibrate's compilation: "
                  f"{theirs['loop_s'] / (ours['wall_s'] - ours['compile_s']):.2f}×)."]
    lines += ["", "Estimates against the truth (ω = 0.2 for both random effects):", "",
              "| parameter | truth | calibrate |", "|---|---|---|"]
    for pid, value in truth.items():
        kind = "median" if pid in RANDOM else "fixed"
        rows = result.population[result.population.parameter == pid]
        lines.append(f"| {pid} ({kind}) | {value:.6g} | {rows.estimate.iloc[0]:.6g} |")
    omega = np.sqrt(np.diag(result.omega))
    lines.append(f"| ω | 0.2, 0.2 | {', '.join(f'{w:.3g}' for w in omega)} |")
    out = Path(args.out)
    partial = out.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
