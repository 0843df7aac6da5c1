#!/usr/bin/env python
"""One population hypergradient of N Boehm-sized individuals on the devices JAX has:
one CPU device per core, or a GPU. The scale test of the population calibrator.

    python benchmarks/bench_population_scale.py --individuals 1000 10000 \
        --out benchmarks/RESULTS_population_scale.md

The problem is `bench_petab_population.py`'s (Boehm_JProteomeRes2014, two log-normal
parameters, four shared, 48 measurements per individual), at its start point. For each
N, in a fresh process: the first evaluation (every individual's MAP fit from the cold
start plus the implicit hypergradient, compiling included), the inner fits repeated
until every individual is stationary, then warm evaluations from those optima, which
is what each outer step of `calibrate_population` costs. Peak memory is the process's
resident set on CPU and the device's own peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_petab import json_from_process, leave_the_device_to_children
from bench_petab_population import write_problem


HERE = Path(__file__).resolve().parent


def measure(folder: Path, repeats: int, cpu_devices: int | None) -> dict:
    """Evaluations of the population in `folder`, in this process."""
    import jax
    import jax.numpy as jnp

    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.config.update("jax_enable_x64", True)
    import calibrate as cal
    from calibrate._compilation import compilation
    from calibrate._population import population_setup

    started = time.perf_counter()
    problem = cal.load_petab(folder / "problem.yaml")
    setup = population_setup(problem)
    load_s = time.perf_counter() - started
    method = cal.Implicit(curvature=cal.ForwardHessian())
    with compilation() as log:
        started = time.perf_counter()
        jax.block_until_ready(setup.evaluate(method, setup.theta, setup.starts).value)
        first_s = time.perf_counter() - started
    starts = setup.converge_inner(method, setup.theta, setup.starts)
    times, evaluation = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        evaluation = setup.evaluate(method, setup.theta, starts)
        jax.block_until_ready(evaluation.value)
        times.append(time.perf_counter() - started)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {
        "individuals": len(setup.individuals),
        "platform": device.platform, "device_kind": device.device_kind,
        "devices": len(jax.devices()), "load_s": load_s, "first_s": first_s,
        "compile_s": log.seconds, "warm_s": statistics.median(times),
        "stationary": int(evaluation.hypergradients.stationary.sum()),
        "objective": float(evaluation.value),
        "gradient_norm": float(jnp.sqrt(sum(jnp.sum(g**2) for g in
                                            jax.tree.leaves(evaluation.gradient)))),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": stats["peak_bytes_in_use"] / 2**20 if stats else None,
    }


def in_subprocess(folder: Path, repeats: int, cpu_devices: int | None) -> dict:
    return json_from_process([sys.executable, __file__, "--child", str(folder),
                              "--repeats", str(repeats),
                              *(["--cpu-devices", str(cpu_devices)] if cpu_devices else [])])


def main():
    from calibrate._batching import cpu_cores

    parser = argparse.ArgumentParser()
    parser.add_argument("--individuals", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="CPU devices when there is no accelerator (default: one "
                             "per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "RESULTS_population_scale.md"))
    args = parser.parse_args()

    if args.child:
        Path(args.out).write_text(json.dumps(
            measure(Path(args.child), args.repeats, args.cpu_devices)))
        return
    leave_the_device_to_children()
    import jax

    jax.config.update("jax_enable_x64", True)
    accelerated = jax.default_backend() != "cpu"
    cpu_devices = None if accelerated else (args.cpu_devices or cpu_cores())
    rows = []
    for n in args.individuals:
        with tempfile.TemporaryDirectory(prefix="boehm_population_") as tmp:
            started = time.perf_counter()
            write_problem(Path(tmp), n, args.seed)
            written_s = time.perf_counter() - started
            rows.append({**in_subprocess(Path(tmp), args.repeats, cpu_devices),
                         "write_s": written_s})
        print(rows[-1], flush=True)
    report(args, rows)


def report(args, rows):
    import jax

    import calibrate as cal

    command = "python benchmarks/bench_population_scale.py " + " ".join(sys.argv[1:])
    lines = [
        "# One population hypergradient of N Boehm-sized individuals",
        "",
        f"`{command}` on {platform.node()} ({platform.machine()}, "
        f"{rows[0]['devices']} {rows[0]['platform']} device(s), {rows[0]['device_kind']}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}, "
        f"calibrate {cal.__version__}.",
        "",
        "`first` = the first evaluation (cold-start MAP fits, implicit hypergradient, "
        "compiling); `warm` = one evaluation from converged inner optima (median of "
        f"{args.repeats}), what each outer step costs; throughput = N / warm.",
        "",
        "| N | devices | load s | first s | compile s | warm s | individuals / s "
        "| stationary | objective | ‖gradient‖ | peak RSS MB | peak device MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        device = f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] else ""
        lines.append(
            f"| {r['individuals']} | {r['devices']} × {r['platform']} | {r['load_s']:.1f} "
            f"| {r['first_s']:.1f} | {r['compile_s']:.1f} | {r['warm_s']:.2f} "
            f"| {r['individuals'] / r['warm_s']:.0f} | {r['stationary']} "
            f"| {r['objective']:.9g} | {r['gradient_norm']:.9g} "
            f"| {r['peak_rss_mb']:.0f} | {device} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
