"""Compile times against the issue's target of 5 s, with calibrate's XLA flags and with
XLA's own, side by side in one run.

Each case runs in a fresh process with the persistent compilation cache off, so every
compile is real:

1. the ForwardMode gradient of Boehm_JProteomeRes2014 and of the zoo's MAPK cascade as
   a PEtab problem (`zoo_petab.py`), `jit(...).lower(x).compile()`;
2. the same gradients `vmap`ped over a batch of parameter sets (the emitters' effect on
   run time where kernels work on whole batches);
3. one evaluation of a Boehm population of 4 individuals (`bench_petab_population.py`'s
   problem: every inner MAP fit and the implicit hypergradient with the forward-over-
   forward Hessian), its first call;
4. the whole hierarchical fit of that population with 100 individuals, on one CPU
   device per core.

Tracing, lowering and XLA's compile are read from JAX's own timers. "calibrate" is what
`import calibrate` sets up (`--xla_cpu_use_fusion_emitters=false`); "XLA default" is the
same with `CALIBRATE_XLA_FLAGS=off`. Results go to `RESULTS_compile.md`, atomically.

    python benchmarks/bench_compile.py --out benchmarks/RESULTS_compile.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_petab import (
    measure_in_child,
    median_seconds,
    parent_arguments,
    run_header,
    seconds,
)
from bench_petab_population import BOEHM, calibrate_side, write_problem


HERE = Path(__file__).resolve().parent
TARGET_S = 5.0
STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "xla_s"}
FLAGS = {"calibrate": {}, "XLA default": {"CALIBRATE_XLA_FLAGS": "off"}}


def measure(case: str, folder: str, batch: int, repeats: int) -> dict:
    """One case, in this process."""
    os.environ["CALIBRATE_CACHE_DIR"] = "off"
    import jax

    jax.config.update("jax_enable_x64", True)
    if case == "population fit":
        from calibrate._batching import cpu_cores

        jax.config.update("jax_num_cpu_devices", cpu_cores())
    import jax.numpy as jnp
    import numpy as np

    import calibrate as cal

    stages = dict.fromkeys(STAGES.values(), 0.0)

    def record(event, duration, **kwargs):
        if event in STAGES:
            stages[STAGES[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(record)
    out = {"case": case, "batch": batch, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if case in ("gradient", "batched gradient"):
        problem = cal.load_petab(next(Path(folder).glob("*.yaml")),
                                 sensitivity=cal.ForwardMode())
        x0 = np.asarray(problem.nominal_x())
        if case == "gradient":
            x = jnp.asarray(x0)
            function = jax.jit(lambda x: problem.value_and_gradient(x))
        else:
            shifts = 0.05 * np.random.default_rng(0).standard_normal((batch, x0.size))
            x = jnp.asarray(x0 + shifts)
            function = jax.jit(jax.vmap(lambda x: problem.value_and_gradient(x)))
        started = time.perf_counter()
        compiled = function.lower(x).compile()
        out["compile_s"] = time.perf_counter() - started
        value, _ = jax.block_until_ready(compiled(x))
        out["run_s"] = median_seconds(lambda: compiled(x), repeats)
        out["check"] = float(jnp.sum(value))
    elif case == "population evaluation":
        from calibrate._population import population_setup

        setup = population_setup(cal.load_petab(Path(folder) / "problem.yaml"))
        method = cal.Implicit(curvature=cal.ForwardHessian())
        started = time.perf_counter()
        evaluation = setup.evaluate(method, setup.theta, setup.starts)
        jax.block_until_ready(evaluation.value)
        out["compile_s"] = sum(stages.values())
        out["first_s"] = time.perf_counter() - started
        out["run_s"] = median_seconds(lambda: setup.evaluate(
            method, setup.theta, setup.starts).value, repeats)
        out["check"] = float(evaluation.value)
    else:
        fit = calibrate_side(Path(folder), max_steps=100, solver="rodas5", outer="bfgs")
        out.update(compile_s=fit["compile_s"], run_s=fit["wall_s"] - fit["compile_s"],
                   wall_s=fit["wall_s"], check=fit["objective"],
                   outer_steps=fit["outer_steps"], devices=fit["devices"])
    return {**out, **stages}


def child_environment(flags: str) -> dict:
    """The parent's starting environment, with calibrate's own emitter flag taken out
    of `XLA_FLAGS` (calibrate adds it back unless `flags` says otherwise)."""
    from bench_petab import _CHILD_ENVIRONMENT

    from calibrate._compilation import CPU_EMITTER_FLAG

    environment = dict(_CHILD_ENVIRONMENT or os.environ)
    xla = environment.get("XLA_FLAGS", "").replace(CPU_EMITTER_FLAG, "").strip()
    environment.pop("XLA_FLAGS", None)
    if xla:
        environment["XLA_FLAGS"] = xla
    return {**environment, **FLAGS[flags]}


def render(rows: list[dict], started: float, argv: list[str]) -> str:
    lines = [
        *run_header("Compile times: calibrate's XLA flags and XLA's own",
                    "bench_compile.py", started, argv),
        "- Each row a fresh process without the persistent cache. Compile is tracing + "
        "lowering + XLA (JAX's timers; for the gradients, `jit(...).lower().compile()`); "
        "run is the median of warm calls (for the population fit: its wall time less "
        "compiling). Ratios are calibrate / XLA default, below 1 means calibrate's flags "
        f"are faster. Target: compile ≤ {TARGET_S:.0f} s.",
        "",
        "| case | flags | trace | lower | XLA | compile | target | run | "
        "compile ratio | run ratio | same result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict = {}
    for row in rows:
        by_case.setdefault(row["label"], {})[row["flags"]] = row
    for label, pair in by_case.items():
        theirs = pair.get("XLA default")
        for name, row in pair.items():
            ratios = "| |"
            same = ""
            if name == "calibrate" and theirs is not None:
                ratios = (f"| {row['compile_s'] / theirs['compile_s']:.2f} | "
                          f"{row['run_s'] / theirs['run_s']:.2f} |")
                scale = max(abs(theirs["check"]), 1e-300)
                same = f"{abs(row['check'] - theirs['check']) / scale:.0e}"
            met = "met" if row["compile_s"] <= TARGET_S else "not met"
            lines.append(
                f"| {label} | {name} | {seconds(row['trace_s'])} | "
                f"{seconds(row['lower_s'])} | {seconds(row['xla_s'])} | "
                f"{seconds(row['compile_s'])} | {met} | {seconds(row['run_s'])} "
                f"{ratios} {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_compile.md")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2,
                        help="each case this many times per flag setting, alternating")
    parser.add_argument("--population", type=int, default=100,
                        help="individuals of the population fit (0 skips it)")
    args = parent_arguments(parser, argv, measure)
    if args is None:
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    import zoo_petab

    from calibrate._io import write_text_atomic

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calibrate_compile_") as tmp:
        cascade = Path(tmp) / "cascade"
        zoo_petab.write_mapk_cascade(cascade)
        small, large = Path(tmp) / "population_4", Path(tmp) / "population"
        write_problem(small, 4, 0)
        cases = [
            ("gradient", "Boehm gradient", BOEHM, 1),
            ("gradient", "cascade gradient", cascade, 1),
            ("batched gradient", "Boehm gradient, vmap over 1,000", BOEHM, 1000),
            ("batched gradient", "cascade gradient, vmap over 100", cascade, 100),
            ("population evaluation", "Boehm population evaluation, N = 4", small, 4),
        ]
        if args.population:
            write_problem(large, args.population, 0)
            cases.append(("population fit",
                          f"Boehm population fit, N = {args.population:,}", large,
                          args.population))
        rows = []
        for case, label, folder, batch in cases:
            for _ in range(args.rounds):
                for flags in FLAGS:
                    config = {"case": case, "folder": str(folder), "batch": batch}
                    row = measure_in_child(__file__, config, args.repeats,
                                           env=child_environment(flags))
                    rows.append({**row, "label": label, "flags": flags})
                    print(f"{label}, {flags}: compile {row['compile_s']:.2f} s "
                          f"(trace {row['trace_s']:.2f}, XLA {row['xla_s']:.2f}), run "
                          f"{row['run_s'] * 1e3:.1f} ms", flush=True)
            write_text_atomic(args.out, render(_medians(rows), started, argv))


def _medians(rows: list[dict]) -> list[dict]:
    """Rows of the same case and flags merged into their medians."""
    merged: dict = {}
    for row in rows:
        merged.setdefault((row["label"], row["flags"]), []).append(row)
    out = []
    for group in merged.values():
        first = dict(group[0])
        for key in ("compile_s", "run_s", "trace_s", "lower_s", "xla_s"):
            first[key] = statistics.median(r[key] for r in group)
        first["rounds"] = len(group)
        out.append(first)
    return out


if __name__ == "__main__":
    main()
