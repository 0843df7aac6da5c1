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

Each side runs once per way of using the CPU's cores: calibrate with 1 and with one
CPU device per core (`--cpu-devices`; the individuals are split over the devices),
the AMICI loop in 1 and in one process per core (`--amici-processes`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_petab import json_from_process, leave_the_device_to_children, run_amici_side


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
    """The hierarchical fit, in this process: wall and compile seconds, estimates."""
    import jax

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
    population = result.population
    return {"wall_s": wall, "compile_s": log.seconds, "outer_steps": int(result.outer_steps),
            "converged": bool(result.converged), "objective": float(result.objective),
            "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind,
            "estimates": {pid: float(population[population.parameter == pid].estimate.iloc[0])
                          for pid in (*RANDOM, *SHARED)},
            "omega": np.sqrt(np.diag(result.omega)).tolist()}


def calibrate_in_subprocess(folder: Path, args, cpu_devices: int) -> dict:
    """`calibrate_side` in a fresh process with `cpu_devices` CPU devices (JAX fixes its
    device count when it starts): the individuals are split over them."""
    return json_from_process([sys.executable, __file__, "--calibrate-child", str(folder),
                              "--cpu-devices", str(cpu_devices),
                              "--max-steps", str(args.max_steps), "--solver", args.solver,
                              "--outer", args.outer])


def amici_loop(python: str, folder: Path, individuals: int, processes: int) -> dict:
    """The AMICI + fides loop in `processes` processes at once, each fitting every
    `processes`-th individual; its time is the slowest process's fitting time."""
    arguments = ("--population", str(folder), "--individuals", str(individuals))
    if processes == 1:
        return {**run_amici_side(python, *arguments), "processes": 1}
    run_amici_side(python, "--population", str(folder), "--individuals", "1")  # builds it
    with ThreadPoolExecutor(processes) as pool:
        parts = list(pool.map(lambda k: run_amici_side(
            python, *arguments, "--share", f"{k}/{processes}"), range(processes)))
    return {"version": parts[0]["version"], "import_s": parts[0]["import_s"],
            "loop_s": max(p["loop_s"] for p in parts),
            "converged": sum(p["converged"] for p in parts), "processes": processes}


def main():
    from calibrate._batching import cpu_cores

    cores = cpu_cores()
    parser = argparse.ArgumentParser()
    parser.add_argument("--individuals", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--solver", choices=SOLVERS, default=SOLVERS[0])
    parser.add_argument("--outer", choices=OUTERS, default=OUTERS[0])
    parser.add_argument("--cpu-devices", type=int, nargs="+", default=sorted({1, cores}),
                        help="calibrate once per count of CPU devices (one process each)")
    parser.add_argument("--amici-python")
    parser.add_argument("--amici-processes", type=int, nargs="+", default=sorted({1, cores}),
                        help="run the AMICI loop once per count of parallel processes")
    parser.add_argument("--calibrate-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "RESULTS_petab_population.md"))
    args = parser.parse_args()

    import jax

    if args.calibrate_child:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices[0])
        jax.config.update("jax_enable_x64", True)
        ours = calibrate_side(Path(args.calibrate_child), args.max_steps, args.solver,
                              args.outer)
        Path(args.out).write_text(json.dumps(ours))
        return
    leave_the_device_to_children()
    jax.config.update("jax_enable_x64", True)
    with tempfile.TemporaryDirectory(prefix="boehm_population_") as tmp:
        folder = Path(tmp)
        truth = write_problem(folder, args.individuals, args.seed)
        ours = [calibrate_in_subprocess(folder, args, k) for k in args.cpu_devices]
        theirs = [amici_loop(args.amici_python, folder, args.individuals, k)
                  for k in args.amici_processes] if args.amici_python else []
    report(args, truth, ours, theirs)


def where(run: dict) -> str:
    """The devices a calibrate run used, e.g. "2 CPU devices" or "1 GPU device (H100)"."""
    kind = "" if run["platform"] == "cpu" else f" ({run['device_kind']})"
    return (f"{run['devices']} {run['platform'].upper()} "
            f"device{'s' * (run['devices'] > 1)}{kind}")


def report(args, truth, ours, theirs):
    import jax

    import calibrate as cal

    options = (f"{'' if args.solver == SOLVERS[0] else ' --solver ' + args.solver}"
               f"{'' if args.outer == OUTERS[0] else ' --outer ' + args.outer}"
               f" --cpu-devices {' '.join(map(str, args.cpu_devices))}"
               + (f" --amici-python AMICI --amici-processes "
                  f"{' '.join(map(str, args.amici_processes))}" if theirs else ""))
    lines = [
        "# A population of Boehm-sized individuals: calibrate against an AMICI loop",
        "",
        f"`python benchmarks/bench_petab_population.py --individuals {args.individuals}"
        f"{options}` on {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"jax {jax.__version__}, calibrate {cal.__version__}"
        f"{', AMICI ' + theirs[0]['version'] if theirs else ''}.",
        "",
        "| side | what | wall (incl. compile) | compile | converged |",
        "|---|---|---|---|---|",
    ]
    for run in ours:
        lines.append(
            f"| calibrate, {where(run)} "
            f"| hierarchical fit of {args.individuals} individuals ({args.outer.upper()}, "
            f"{run['outer_steps']} outer steps, then standard errors; objective "
            f"{run['objective']:.6f}) | {run['wall_s']:.1f} s | {run['compile_s']:.1f} s "
            f"| {run['converged']} |")
    for run in theirs:
        processes = run["processes"]
        lines.append(
            f"| AMICI + fides, {processes} process{'es' * (processes > 1)} "
            f"| {args.individuals} individual fits"
            f"{', one after another' if processes == 1 else ', split over the processes'} | "
            f"{run['loop_s']:.1f} s ({run['loop_s'] * processes / args.individuals:.2f} s "
            f"each) | {run['import_s']:.1f} s (model build) | {run['converged']} of "
            f"{args.individuals} |")
    if theirs:
        lines += ["", "Ratios AMICI loop / calibrate (above 1: calibrate faster; in "
                  "brackets without calibrate's compilation):", "",
                  "| | " + " | ".join(f"calibrate, {where(r)}" for r in ours)
                  + " |", "|---|" + "---|" * len(ours)]
        for run in theirs:
            lines.append(f"| AMICI, {run['processes']} process(es) | " + " | ".join(
                f"{run['loop_s'] / r['wall_s']:.2f}× "
                f"({run['loop_s'] / (r['wall_s'] - r['compile_s']):.2f}×)" for r in ours)
                + " |")
    lines += ["", "Estimates against the truth (ω = 0.2 for both random effects):", "",
              "| parameter | truth | " + " | ".join(
                  f"calibrate, {where(r)}" for r in ours) + " |",
              "|---|---|" + "---|" * len(ours)]
    for pid, value in truth.items():
        kind = "median" if pid in RANDOM else "fixed"
        lines.append(f"| {pid} ({kind}) | {value:.6g} | " + " | ".join(
            f"{r['estimates'][pid]:.6g}" for r in ours) + " |")
    lines.append("| ω | 0.2, 0.2 | " + " | ".join(
        ", ".join(f"{w:.3g}" for w in r["omega"]) for r in ours) + " |")
    out = Path(args.out)
    partial = out.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
