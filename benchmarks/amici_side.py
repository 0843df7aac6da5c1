#!/usr/bin/env python
"""AMICI's side of bench_petab.py; runs under an interpreter that has AMICI installed.

    AMICI_PYTHON benchmarks/amici_side.py --out amici.json --problems Boehm_JProteomeRes2014
    AMICI_PYTHON benchmarks/amici_side.py --out amici.json --population DIR --individuals N

The second form is the AMICI side of bench_petab_population.py: one fides fit per
individual of the population problem in DIR (its `individualId` column), one after
another, each of the individual's estimated parameters from the table's nominal values.
With `--share K/P` it fits every P-th of the first N individuals from the K-th, so P
processes together fit them all.

AMICI (pip install "amici[petab]" petab scipy) builds each model with the SWIG of its
own environment: bench_petab.py puts that environment's bin first on PATH and sets
SWIG. Compiled models are kept in $AMICI_MODELS (default: a folder in the temp dir),
so the import time counted is that of a first build only when the folder is empty.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path


DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "petab"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--problems", nargs="*", default=[])
    parser.add_argument("--yaml", nargs="*", default=[], metavar="NAME=YAML",
                        help="further problems by their YAML file")
    parser.add_argument("--population")
    parser.add_argument("--individuals", type=int)
    parser.add_argument("--share", default="0/1", metavar="K/P",
                        help="fit only every P-th individual from the K-th (P processes)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rtol", type=float, default=1e-8)
    args = parser.parse_args()

    import amici
    import petab.v1 as petab
    from amici.importers.petab.v1 import import_petab_problem
    from amici.sim.sundials import SensitivityMethod, SensitivityOrder
    from amici.sim.sundials.petab.v1 import LLH, RDATAS, create_edatas, simulate_petab
    from amici.sim.sundials.petab.v1._parameter_mapping import create_parameter_mapping

    for name in ["amici", *[n for n in logging.root.manager.loggerDict
                            if n.startswith("amici")]]:
        logging.getLogger(name).setLevel(logging.ERROR)
    models = Path(os.environ.get("AMICI_MODELS",
                                 Path(tempfile.gettempdir()) / "calibrate_amici_models"))
    if args.population:
        share, processes = (int(v) for v in args.share.split("/"))
        out = population_loop(Path(args.population), args.individuals, args.rtol, models,
                              share, processes)
        Path(args.out).write_text(json.dumps(out, indent=1))
        return
    reference = json.loads((DATA / "reference.json").read_text())
    out = {"version": amici.__version__, "atol": None, "problems": {}}
    yamls = {name: DATA / reference[name]["yaml"] for name in args.problems}
    yamls.update(item.split("=", 1) for item in args.yaml)
    for name, yaml in yamls.items():
        problem = petab.Problem.from_yaml(yaml)
        started = time.perf_counter()
        model = import_petab_problem(problem, output_dir=str(models / name),
                                     verbose=logging.ERROR)
        import_seconds = time.perf_counter() - started
        parameters = dict(zip(problem.x_free_ids, problem.x_nominal_free_scaled))
        conditions = problem.get_simulation_conditions_from_measurement_df()
        edatas = create_edatas(model, problem, conditions)
        mapping = create_parameter_mapping(problem, conditions, scaled_parameters=True,
                                           amici_model=model)

        def solver_for(method):
            solver = model.create_solver()
            solver.set_relative_tolerance(args.rtol)
            if method is not None:
                solver.set_sensitivity_order(SensitivityOrder.first)
                solver.set_sensitivity_method(method)
            return solver

        def run(solver):
            result = simulate_petab(
                problem, amici_model=model, solver=solver, problem_parameters=parameters,
                scaled_parameters=True, edatas=edatas, parameter_mapping=mapping,
                log_level=logging.ERROR)
            ok = all(rd.status == 0 for rd in result[RDATAS])
            return result, ok

        row = {"import_s": import_seconds}
        for label, method in (("simulate", None), ("grad_forward", SensitivityMethod.forward),
                              ("grad_adjoint", SensitivityMethod.adjoint)):
            solver = solver_for(method)
            out["atol"] = solver.get_absolute_tolerance()
            result, ok = run(solver)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                result, ok = run(solver)
                times.append(time.perf_counter() - started)
            row[f"{label}_s"] = statistics.median(times) if ok else None
            row[f"{label}_ok"] = ok
            if label == "simulate":
                row["nllh"] = -float(result[LLH])
        out["problems"][name] = row
        print(name, row, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


def population_loop(folder: Path, individuals: int, rtol: float, models: Path,
                    share: int = 0, processes: int = 1) -> dict:
    import amici
    import fides
    import numpy as np
    import petab.v1 as petab
    from amici.importers.petab.v1 import import_petab_problem
    from amici.sim.sundials import SensitivityMethod, SensitivityOrder
    from amici.sim.sundials.petab.v1 import LLH, RDATAS, SLLH, create_edatas, simulate_petab
    from amici.sim.sundials.petab.v1._parameter_mapping import create_parameter_mapping

    logging.getLogger("fides").setLevel(logging.WARNING)
    whole = petab.Problem.from_yaml(folder / "problem.yaml")
    measurements = whole.measurement_df
    parameters = whole.parameter_df.drop(
        columns=["populationDistribution", "populationSd"], errors="ignore")
    ids = list(dict.fromkeys(measurements["individualId"]))[:individuals][share::processes]

    def problem_of(individual):
        problem = copy.copy(whole)
        problem.parameter_df = parameters
        problem.measurement_df = measurements[
            measurements.individualId == individual].drop(columns="individualId")
        return problem

    first = problem_of(ids[0])
    started = time.perf_counter()
    model = import_petab_problem(first, output_dir=str(models / "boehm_population"),
                                 verbose=logging.ERROR)
    import_seconds = time.perf_counter() - started
    solver = model.create_solver()
    solver.set_relative_tolerance(rtol)
    solver.set_sensitivity_order(SensitivityOrder.first)
    solver.set_sensitivity_method(SensitivityMethod.forward)
    free = list(first.x_free_ids)
    lower = np.asarray(first.get_lb(scaled=True, fixed=False))
    upper = np.asarray(first.get_ub(scaled=True, fixed=False))
    x0 = np.asarray(first.x_nominal_free_scaled)
    loop_seconds, converged, values, estimates = 0.0, 0, [], []
    for individual in ids:
        problem = problem_of(individual)
        conditions = problem.get_simulation_conditions_from_measurement_df()
        edatas = create_edatas(model, problem, conditions)
        mapping = create_parameter_mapping(problem, conditions, scaled_parameters=True,
                                           amici_model=model)

        def objective(x, problem=problem, edatas=edatas, mapping=mapping):
            result = simulate_petab(
                problem, amici_model=model, solver=solver,
                problem_parameters=dict(zip(free, x)), scaled_parameters=True,
                edatas=edatas, parameter_mapping=mapping, log_level=logging.ERROR)
            if not all(rd.status == 0 for rd in result[RDATAS]):
                return np.inf, np.full(len(free), np.nan)
            return -float(result[LLH]), -np.array([result[SLLH][p] for p in free])

        optimiser = fides.Optimizer(objective, ub=upper, lb=lower,
                                    hessian_update=fides.BFGS(),
                                    options={fides.Options.MAXITER: 1000})
        started = time.perf_counter()
        value, x, _, _ = optimiser.minimize(x0)
        loop_seconds += time.perf_counter() - started
        converged += int(optimiser.exitflag > 0)
        values.append(float(value))
        estimates.append([float(v) for v in x])
    return {"version": amici.__version__, "import_s": import_seconds, "loop_s": loop_seconds,
            "converged": converged, "individuals": len(ids), "parameters": free,
            "values": values, "estimates": estimates}


if __name__ == "__main__":
    main()
