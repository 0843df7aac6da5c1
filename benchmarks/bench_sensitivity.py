"""Forward sensitivities against the discrete adjoint as parameters grow: where the
rule of `calibrate.Automatic` comes from.

The gradient of one individual's negative log-likelihood w.r.t. its estimated
parameters, on the zoo's signalling chain (`models/signalling_chain.py`, n tiers:
n states, 4n + 1 parameters), with `ForwardMode` and with `DiscreteAdjoint`, side by
side in one run:

1. the 16-tier chain (16 states, 65 parameters) with the first k parameters estimated,
   so only the number of parameters changes;
2. chains of 2 to 32 tiers with every parameter estimated (9 to 129), so states and
   parameters grow together;

each for one individual and for a batch of individuals under `vmap` (as multistart
fits and populations run them). Every measurement runs in a fresh process with the
persistent compilation cache off, so compile times are real. Results (medians of
warm calls, the compile, and the relative difference of the two gradients) go to
`RESULTS_sensitivity.md`, written atomically.

    python benchmarks/bench_sensitivity.py --out benchmarks/RESULTS_sensitivity.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_petab import (
    measure_in_child,
    median_seconds,
    parent_arguments,
    run_header,
    seconds,
)


HERE = Path(__file__).resolve().parent
METHODS = ("ForwardMode", "DiscreteAdjoint")


def measure(tiers: int, n_estimated: int, method: str, batch: int, repeats: int) -> dict:
    """One gradient configuration, in this process."""
    os.environ["CALIBRATE_CACHE_DIR"] = "off"
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import calibrate as cal

    chain = cal.zoo_module("signalling_chain")
    model = chain.chain_model(tiers)()
    names = [p.name for p in model.parameters][:n_estimated]
    sensitivity = getattr(cal, method)()
    objective = cal.Objective(model, estimate=names, sensitivity=sensitivity)
    data = chain.synthetic_data(jax.random.PRNGKey(0), batch, variability=0.2,
                                tiers=tiers).measurements
    truth = model.parameter_space.complete({})
    z = jnp.asarray(objective.space.to_vector(truth))
    # Each individual's gradient away from its optimum: the true values shifted.
    shifts = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (batch, z.size))
    zs = z[None, :] + shifts

    def gradient(z, measurements):
        return sensitivity.value_and_grad(
            lambda a, m: objective.negative_log_likelihood(a, m)[0], z, measurements)

    batched = jax.vmap(gradient) if batch > 1 else (
        lambda zs, m: jax.tree.map(lambda a: a[None], gradient(
            zs[0], jax.tree.map(lambda a: a[0], m))))
    started = time.perf_counter()
    compiled = jax.jit(batched).lower(zs, data).compile()
    compile_s = time.perf_counter() - started
    value, grad = jax.block_until_ready(compiled(zs, data))
    return {"tiers": tiers, "n_estimated": n_estimated, "method": method, "batch": batch,
            "compile_s": compile_s, "run_s": median_seconds(lambda: compiled(zs, data),
                                                            repeats),
            "value": np.asarray(value).tolist(), "gradient": np.asarray(grad).tolist()}


def relative_difference(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def render(rows: list[dict], started: float, argv: list[str]) -> str:
    lines = [
        *run_header("Forward sensitivities against the discrete adjoint",
                    "bench_sensitivity.py", started, argv),
        "- The gradient of one individual's negative log-likelihood (a batch: each "
        "individual's own gradient under `vmap`), Rodas5 at rtol 1e-8, atol 1e-10; run "
        "time is the median of warm calls, compile is `jit(...).lower().compile()` in a "
        "fresh process without the persistent cache. `adjoint / forward` above 1 means "
        "forward sensitivities are faster.",
        "",
        "| tiers (states) | estimated | batch | forward | adjoint | adjoint / forward | "
        "compile forward | compile adjoint | gradients differ by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = {}
    for row in rows:
        pairs.setdefault((row["tiers"], row["n_estimated"], row["batch"]), {})[
            row["method"]] = row
    for (tiers, n, batch), pair in pairs.items():
        forward, adjoint = pair.get("ForwardMode"), pair.get("DiscreteAdjoint")
        if forward is None or adjoint is None:
            continue
        lines.append(
            f"| {tiers} | {n} | {batch} | {seconds(forward['run_s'])} | "
            f"{seconds(adjoint['run_s'])} | {adjoint['run_s'] / forward['run_s']:.2f} | "
            f"{forward['compile_s']:.1f} s | {adjoint['compile_s']:.1f} s | "
            f"{relative_difference(adjoint['gradient'], forward['gradient']):.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_sensitivity.md")
    parser.add_argument("--estimated", default="4,8,16,24,32,48,65",
                        help="numbers of estimated parameters of the 16-tier chain")
    parser.add_argument("--tiers", default="2,4,8,16,32",
                        help="chain lengths, every parameter estimated")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parent_arguments(parser, argv, measure)
    if args is None:
        return
    from calibrate._io import write_text_atomic

    started = time.perf_counter()
    configs = [(16, int(k)) for k in args.estimated.split(",")]
    configs += [(int(n), 4 * int(n) + 1) for n in args.tiers.split(",")]
    configs = list(dict.fromkeys(configs))
    rows = []
    for tiers, n_estimated in configs:
        for batch in (int(b) for b in args.batches.split(",")):
            for method in METHODS:
                config = {"tiers": tiers, "n_estimated": n_estimated, "method": method,
                          "batch": batch}
                row = measure_in_child(__file__, config, args.repeats)
                rows.append(row)
                print(f"{tiers} tiers, {n_estimated} estimated, batch {batch}, {method}: "
                      f"{row['run_s'] * 1e3:.1f} ms, compile {row['compile_s']:.1f} s",
                      flush=True)
                write_text_atomic(args.out, render(rows, started, argv))


if __name__ == "__main__":
    main()
