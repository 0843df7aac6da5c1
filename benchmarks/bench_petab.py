#!/usr/bin/env python
"""PEtab benchmark problems: calibrate next to AMICI, in one run.

Run from the repository root:

    python benchmarks/bench_petab.py --out benchmarks/RESULTS_petab.md \
        [--amici-python /path/to/amici-venv/bin/python] [--multistart 16]

For each problem in ``tests/data/petab`` (all five by default, ``--problems`` to pick,
where ``mapk_cascade`` names the zoo cascade written as PEtab by ``zoo_petab.py``, whose
likelihood and gradient are first checked against the zoo model's own):

1. calibrate: import time (``load_petab``: SBML and tables to compiled JAX code),
   compile time (lower + compile) and run time (median of ``--repeats`` after one
   warm call) of the negative log-likelihood over all conditions ("simulation") and
   of its gradient with ForwardMode, DiscreteAdjoint and ContinuousAdjoint.
2. AMICI, when ``--amici-python`` names an interpreter with AMICI installed
   (``amici_side.py`` runs there): import/compile time of the model and run times of
   ``simulate_petab`` without sensitivities, with forward and with adjoint
   sensitivities, each the median of the same number of repeats, single thread.
3. Side by side as ratios calibrate / AMICI (below 1: calibrate faster).

Both tools run at rtol = 1e-8; calibrate at atol = 1e-10, AMICI at its default
1e-16 (AMICI scales atol per state differently; both give the reference likelihood to
~1e-7). ``--multistart N`` also fits Boehm_JProteomeRes2014 from N random starts
and reports how many reach the collection's optimum.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np


ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "petab"
PROBLEMS = ("Boehm_JProteomeRes2014", "Bertozzi_PNAS2020", "Elowitz_Nature2000",
            "Fujita_SciSignal2010", "Brannmark_JBC2010")
RTOL, ATOL = 1e-8, 1e-10


def _timed(function, *args, repeats):
    """Compile seconds (lower + compile) and median run seconds of `function(*args)`."""
    jitted = eqx.filter_jit(function)
    started = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_seconds = time.perf_counter() - started
    out = jax.block_until_ready(compiled(*args))
    return compile_seconds, median_seconds(lambda: compiled(*args), repeats), out


def median_seconds(call, repeats: int) -> float:
    """Median wall time of `repeats` calls of `call()`, each waited for."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


ZOO = {"mapk_cascade": "write_mapk_cascade"}
_ZOO_FOLDER = Path(tempfile.mkdtemp(prefix="calibrate_zoo_petab_"))


def problem_yaml(name: str) -> Path:
    """The YAML file of a collection problem, or of a zoo model written as PEtab."""
    if name in ZOO:
        import zoo_petab

        yaml = _ZOO_FOLDER / name / f"{name}.yaml"
        return yaml if yaml.exists() else getattr(zoo_petab, ZOO[name])(yaml.parent)
    return DATA / json.loads((DATA / "reference.json").read_text())[name]["yaml"]


def bench_calibrate(name: str, repeats: int) -> dict:
    import calibrate as cal

    integrator = cal.Integrator(rtol=RTOL, atol=ATOL)
    yaml = problem_yaml(name)
    started = time.perf_counter()
    problem = cal.load_petab(yaml, integrator=integrator)
    import_seconds = time.perf_counter() - started
    x = problem.nominal_x()
    row = {"import_s": import_seconds}
    c, r, (value, result) = _timed(lambda p, x: p.evaluate(x), problem, x, repeats=repeats)
    if name in ZOO:
        import zoo_petab

        # The reference is the zoo model itself, which must give the same numbers.
        nll, sensitivity, _ = zoo_petab.zoo_nll(integrator)
        reference = float(jax.jit(nll)(x))
        row["zoo_nllh_difference"], row["zoo_gradient_difference"] = (
            zoo_petab.check_against_zoo(problem, integrator))
        _, row["zoo_grad_forward_s"], _ = _timed(
            lambda x: sensitivity.value_and_grad_fn(nll)(x), x, repeats=repeats)
    else:
        reference = json.loads((DATA / "reference.json").read_text())[name]["nllh_nominal"]
    row.update(simulate_compile_s=c, simulate_s=r, nllh=float(value),
               nllh_reference=reference, status=cal.result_name(result))
    for label, sensitivity in (("forward", cal.ForwardMode()),
                               ("discrete_adjoint", cal.DiscreteAdjoint()),
                               ("continuous_adjoint", cal.ContinuousAdjoint())):
        try:
            c, r, (_, gradient) = _timed(
                lambda p, x, s=sensitivity: p.value_and_gradient(x, s), problem, x,
                repeats=repeats)
            row[f"grad_{label}_compile_s"] = c
            row[f"grad_{label}_s"] = r
            row[f"grad_{label}_finite"] = bool(np.all(np.isfinite(np.asarray(gradient))))
        except Exception as error:  # a failing method is a result, not a crash
            row[f"grad_{label}_error"] = f"{type(error).__name__}: {error}"[:200]
    return row


def bench_amici(python: str, names, repeats: int) -> dict:
    zoo = [f"{n}={problem_yaml(n)}" for n in names if n in ZOO]
    return run_amici_side(python, "--repeats", str(repeats), "--rtol", str(RTOL),
                          "--problems", *[n for n in names if n not in ZOO],
                          *(["--yaml", *zoo] if zoo else []))


_CHILD_ENVIRONMENT: dict | None = None


def leave_the_device_to_children() -> None:
    """For a parent process that only writes problems and collects its children's
    results, called before it first touches a device: it takes no GPU memory ahead
    (JAX's default is 75 % of it), so its benchmark children start with the whole
    device, and they run in the environment the parent started with."""
    global _CHILD_ENVIRONMENT
    _CHILD_ENVIRONMENT = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def seconds(s: float) -> str:
    """A duration as milliseconds below a second, seconds above."""
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def run_header(title: str, script: str, started: float, argv: list[str]) -> list[str]:
    """The first lines of a results file: title, summary marker, date, machine, command."""
    return [
        f"# {title}",
        "",
        "<!-- SUMMARY -->",
        "",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; total "
        f"{(time.perf_counter() - started) / 60:.1f} min",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"logical CPUs; {platform.platform()}, Python {platform.python_version()}; "
        f"jax {jax.__version__} ({jax.default_backend()})",
        f"- Command: `python benchmarks/{script} {' '.join(argv)}`",
    ]


def measure_in_child(script: str, config: dict, repeats: int,
                     env: dict | None = None) -> dict:
    """`script`'s `measure(**config, repeats=repeats)` in a fresh process (whose
    `main` hands its `--child` arguments to `answer_parent`)."""
    return json_from_process([sys.executable, script, "--repeats", str(repeats),
                              "--child", json.dumps(config)], env=env)


def answer_parent(args, measure) -> None:
    """The child's side of `measure_in_child`: `measure`'s result as JSON in `args.out`."""
    Path(args.out).write_text(json.dumps(measure(**json.loads(args.child),
                                                 repeats=args.repeats)))


def parent_arguments(parser, argv: list[str], measure):
    """`argv` parsed by `parser` (which must define `--out` and `--repeats`) plus the
    hidden `--child` that `measure_in_child` passes. In a child: answers the parent
    with `measure` and returns None. In the parent: leaves the device to the children
    and returns the arguments."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        answer_parent(args, measure)
        return None
    leave_the_device_to_children()
    return args


def json_from_process(command: list[str], env: dict | None = None) -> dict:
    """Runs `command --out FILE` and returns the JSON it wrote to FILE."""
    with tempfile.TemporaryDirectory(prefix="calibrate_bench_") as folder:
        output = Path(folder) / "out.json"
        subprocess.run([*command, "--out", str(output)], check=True,
                       env=env if env is not None else _CHILD_ENVIRONMENT)
        return json.loads(output.read_text())


def run_amici_side(python: str, *arguments: str) -> dict:
    """`amici_side.py` under the AMICI environment's `python` (its SWIG first on PATH,
    one thread); returns what it wrote."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    venv_bin = str(Path(python).parent)
    environment["PATH"] = venv_bin + os.pathsep + environment.get("PATH", "")
    environment["SWIG"] = str(Path(venv_bin) / "swig")
    return json_from_process(
        [python, str(Path(__file__).with_name("amici_side.py")), *arguments], environment)


def bench_multistart(n_starts: int) -> dict:
    import calibrate as cal

    reference = json.loads((DATA / "reference.json").read_text())["Boehm_JProteomeRes2014"]
    problem = cal.load_petab(DATA / reference["yaml"],
                             integrator=cal.Integrator(rtol=RTOL, atol=ATOL))
    result = cal.fit_petab(problem, starts=cal.SobolStarts(n_starts), seed=0)
    objectives = np.asarray(result.objective)
    return {
        "starts": n_starts,
        "reached_optimum": result.n_within(1e-3, reference["nllh_nominal"]),
        "converged": int(np.sum(np.asarray(result.result)
                                == cal.RESULTS.successful._value)),
        "best": float(objectives[0]),
        "objectives": [float(v) for v in objectives],
        "wall_s": result.wall_seconds,
        "compile_s": result.compile_seconds,
        "per_start_s": (result.wall_seconds - result.compile_seconds) / n_starts,
    }


def _fmt(seconds):
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _ratio(a, b):
    return "–" if a is None or b is None or not b else f"{a / b:.1f}×"


def render(rows: dict, amici: dict | None, multistart: dict | None, started) -> str:
    import calibrate as cal

    lines = [
        "# PEtab benchmark problems: calibrate and AMICI side by side", "",
        f"Run {started:%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()}"
        f" ({os.cpu_count()} cores), calibrate {cal.__version__}, jax {jax.__version__}, "
        f"devices {[str(d) for d in jax.devices()]}"
        + (f"; AMICI {amici['version']}" if amici else "; AMICI not run") + ".",
        f"Tolerances rtol {RTOL:g}; calibrate atol {ATOL:g}"
        + (f", AMICI atol {amici['atol']:g}" if amici else "") + ". Times are medians of "
        "warm repeats; ratios are calibrate / AMICI (below 1: calibrate faster).", "",
        "<!-- SUMMARY -->", "",
        "| problem | import | compile sim | compile grad (fwd) | nllh (ref) | sim | grad fwd "
        "| grad discrete adj | grad continuous adj |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {_fmt(row['import_s'])} | {_fmt(row['simulate_compile_s'])} | "
            f"{_fmt(row.get('grad_forward_compile_s'))} | {row['nllh']:.6f} "
            f"({row['nllh_reference']:.6f}) | {_fmt(row['simulate_s'])} | "
            f"{_fmt(row.get('grad_forward_s'))} | "
            f"{_fmt(row.get('grad_discrete_adjoint_s'))} | "
            f"{_fmt(row.get('grad_continuous_adjoint_s'))} |")
    for name, row in rows.items():
        if "zoo_grad_forward_s" in row:
            lines.append(
                f"\n{name}: the zoo model written as PEtab (`zoo_petab.py`) and imported "
                f"gives the zoo model's likelihood to {row['zoo_nllh_difference']:.1e} and "
                f"gradient to {row['zoo_gradient_difference']:.1e} (relative); the zoo "
                f"model's own ForwardMode gradient takes {_fmt(row['zoo_grad_forward_s'])}.")
    errors = {(n, k): v for n, r in rows.items() for k, v in r.items() if k.endswith("_error")}
    for (name, key), text in errors.items():
        lines.append(f"\n{name} {key}: {text}")
    if amici:
        lines += ["", "## AMICI on the same problems", "",
                  "| problem | AMICI import+compile | AMICI sim | AMICI grad fwd | AMICI grad adj "
                  "| sim ratio | grad fwd ratio | best calibrate grad / AMICI best grad |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            a = amici["problems"].get(name)
            if a is None:
                continue
            ours = [row.get(f"grad_{k}_s") for k in
                    ("forward", "discrete_adjoint", "continuous_adjoint")]
            ours = min(v for v in ours if v is not None)
            theirs = min(v for v in (a["grad_forward_s"], a["grad_adjoint_s"]) if v)
            lines.append(
                f"| {name} | {_fmt(a['import_s'])} | {_fmt(a['simulate_s'])} | "
                f"{_fmt(a['grad_forward_s'])} | {_fmt(a['grad_adjoint_s'])} | "
                f"{_ratio(row['simulate_s'], a['simulate_s'])} | "
                f"{_ratio(row.get('grad_forward_s'), a['grad_forward_s'])} | "
                f"{_ratio(ours, theirs)} |")
    if multistart:
        m = multistart
        lines += ["", "## Multistart on Boehm_JProteomeRes2014", "",
                  f"{m['starts']} Sobol starts inside the bounds, BFGS, batched: "
                  f"{m['reached_optimum']} reached the optimum (within 1e-3 of "
                  f"{json.loads((DATA / 'reference.json').read_text())['Boehm_JProteomeRes2014']['nllh_nominal']:.6f}), "
                  f"{m['converged']} converged; best {m['best']:.6f}. Wall {m['wall_s']:.1f} s, "
                  f"of which {m['compile_s']:.1f} s compiling: {m['per_start_s']:.2f} s per "
                  "start.", "",
                  "Final objectives: " + ", ".join(f"{v:.3f}" for v in m["objectives"])]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--amici-python", default=None)
    parser.add_argument("--multistart", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/RESULTS_petab.md")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = {}
    for name in args.problems:
        print(f"calibrate: {name}", flush=True)
        rows[name] = bench_calibrate(name, args.repeats)
        print(json.dumps(rows[name], indent=1), flush=True)
    amici = None
    if args.amici_python:
        print("AMICI ...", flush=True)
        amici = bench_amici(args.amici_python, args.problems, args.repeats)
        print(json.dumps(amici, indent=1), flush=True)
    multistart = bench_multistart(args.multistart) if args.multistart else None
    text = render(rows, amici, multistart, started)
    sys.path.insert(0, str(ROOT))
    from calibrate._io import write_text_atomic

    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
