"""Chunked batching over individuals (calibrate/_batching.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import calibrate as cal
from calibrate._batching import (
    LAPACK_SERIAL_WORK,
    default_chunk_size,
    fit_kernel_flops,
    lanes_per_map,
    map_individuals,
    safe_chunk_size,
)


def test_safe_chunk_keeps_every_kernel_below_jaxlibs_threshold():
    assert safe_chunk_size(9**3) == 274  # 199999 // 729
    for flops in (1, 8, 729, 5000, 10**6):
        for lanes in (1, 4):
            chunk = safe_chunk_size(flops, lanes_per_individual=lanes)
            assert chunk >= 1
            assert chunk == 1 or chunk * flops * lanes < LAPACK_SERIAL_WORK
    assert safe_chunk_size(10, 729, 50) == safe_chunk_size(729)  # the worst kernel rules
    assert default_chunk_size(100, 729) is None  # 100 × 729 flops: one batch is safe
    assert default_chunk_size(1000, 729) == 274
    # A minimiser runs no least-squares QR: the 4-tier chain's 17 unknowns and 192
    # residuals allow one lane per chunk under Levenberg–Marquardt, 40 under BFGS.
    assert fit_kernel_flops(4, 192, 17, tangent_solves=False) == (64, 2 * 192 * 17**2)
    assert fit_kernel_flops(4, 192, 17, False, least_squares=False) == (64, 17**3)
    assert safe_chunk_size(*fit_kernel_flops(4, 192, 17, False)) == 1
    assert safe_chunk_size(*fit_kernel_flops(4, 192, 17, False, least_squares=False)) == 40


def test_lanes_per_map_count_what_one_vmap_runs_together(monkeypatch):
    """What `Automatic` picks by: an equal share per device, at most a chunk of it,
    times each individual's starts or conditions."""
    from calibrate import _batching

    monkeypatch.setattr(_batching, "individual_devices", lambda: [None])
    assert lanes_per_map(100, None) == 100
    assert lanes_per_map(100, 8, lanes_per_individual=3) == 24
    assert lanes_per_map(5, 8, lanes_per_individual=2) == 10
    monkeypatch.setattr(_batching, "individual_devices", lambda: [None] * 4)
    assert lanes_per_map(1000, None) == 250
    assert lanes_per_map(1001, None) == 251
    assert lanes_per_map(1000, 64, lanes_per_individual=2) == 128
    assert lanes_per_map(3, None) == 1


@pytest.mark.parametrize("chunk", [None, 3, 4, 10])
def test_chunked_map_equals_vmap(chunk):
    """Including chunks that do not divide the population (10 individuals in chunks of
    at most 3 or 4: balanced and padded) and a shared argument. `fn` is traced once:
    no second copy is compiled for a remainder."""
    a = jnp.arange(30.0).reshape(10, 3)
    b = jnp.linspace(1, 2, 10)
    shared = {"scale": jnp.array(2.0)}
    traces = []

    def fn(a, b, shared):
        traces.append(a.shape)
        return {"sum": shared["scale"] * jnp.sum(a) + b, "solve": jnp.linalg.solve(
            jnp.eye(3) * (1 + b) + 0.1, a)}

    expected = jax.vmap(fn, in_axes=(0, 0, None))(a, b, shared)
    traces.clear()
    result = map_individuals(fn, (a, b, shared), (0, 0, None), chunk)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-14), result, expected)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="0 or None"):
        map_individuals(fn, (a, b, shared), (1, 0, None), chunk)


def test_large_cpu_population_is_chunked():
    """1000 cascade individuals on CPU: the 9-state LU alone would pass jaxlib's
    threshold in one batch (and can deadlock the 2-thread pool), so evaluations run in
    chunks that keep it on one thread."""
    model = cal.zoo_model("mapk_cascade")
    frame = pd.DataFrame({"individual": [f"i{j}" for j in range(1000)], "time": 1.0,
                          "observable": model.observable_names[0], "value": 0.1})
    data = cal.dataset_for_model(model, frame)
    setup = cal.population_setup(model, data, hierarchy=cal.Hierarchy(random=["k3"]))
    assert setup.chunk_size is not None
    assert setup.chunk_size * len(model.states) ** 3 < LAPACK_SERIAL_WORK
    small = cal.population_setup(model, data.select(range(20)),
                                 hierarchy=cal.Hierarchy(random=["k3"]))
    assert small.chunk_size is None
    with pytest.raises(ValueError, match="chunk_size"):
        cal.population_setup(model, data, hierarchy=cal.Hierarchy(random=["k3"]),
                             chunk_size=0)


_SHARDED_RUN = """
import json, os, sys
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", os.environ["CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
import jax.numpy as jnp
import numpy as np
import calibrate as cal
from calibrate._batching import individual_devices, map_individuals
sys.path.insert(0, os.environ["TESTS"])
from test_batching import (_collectives_in_loops, _evaluation_compiles_once, _lane_loop,
                           _lane_minimum, _lane_slope, _population_evaluation)
assert len(jax.devices()) == 4
x = jnp.linspace(2.0, 100.0, 6)
mapped = jax.jit(lambda x, s: map_individuals(_lane_loop, (x, s), (0, None), None))
program = mapped.lower(x, 0.5).compile().as_text()
result = _population_evaluation(chunk_size=2)
result["loop"] = np.asarray(mapped(x, 0.5)).tolist()
result["minima"] = np.asarray(jax.jit(lambda x: map_individuals(_lane_minimum, (x,), (0,),
                                                                None))(x)).tolist()
result["slopes"] = np.asarray(jax.jit(lambda x: map_individuals(_lane_slope, (x,), (0,),
                                                               None))(x)).tolist()
result["collectives"] = _collectives_in_loops(program)
result["compiled_again"] = _evaluation_compiles_once()
result["devices"] = [len(individual_devices())]
os.environ["CALIBRATE_SHARD"] = "0"
result["devices"].append(len(individual_devices()))
print(json.dumps(result))
"""


def _collectives_in_loops(hlo: str) -> dict:
    """How many while loops an HLO module has, and how many collectives run inside
    their bodies or conditions (or anything those call)."""
    import re

    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    loops = [line for lines in computations.values() for line in lines if " while(" in line]
    reached = set()
    pending = [name for line in loops
               for name in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending.extend(c for line in computations[name]
                           for c in re.findall(r"%([\w.\-]+)", line)
                           if c in computations and c != name)
    collectives = r"(all-reduce|all-gather|collective-permute|all-to-all)\("
    return {"loops": len(loops), "in_loops": sum(
        1 for name in reached for line in computations[name] if re.search(collectives, line))}


def _lane_minimum(x):
    """The minimiser of (y - x)² + y⁴/10 by optimistix's BFGS, whose symmetric
    inverse-Hessian operator lineax checks for matching structures."""
    import optimistix as optx

    solution = optx.minimise(lambda y, x: (y - x) ** 2 + 0.1 * y**4, optx.BFGS(1e-10, 1e-10),
                             jnp.zeros(()), x, max_steps=100)
    return solution.value


def _lane_slope(rate):
    """d y(1) / d rate for y' = -rate y, y(0) = 1, in reverse mode through diffrax's
    checkpointed loop (equinox closure-converts its body), i.e. -exp(-rate)."""
    import diffrax as dfx

    def end(rate):
        return dfx.diffeqsolve(dfx.ODETerm(lambda t, y, r: -r * y), dfx.Tsit5(), 0.0, 1.0,
                               0.1, 1.0, rate, stepsize_controller=dfx.PIDController(
                                   rtol=1e-10, atol=1e-12)).ys[-1]

    return jax.grad(end)(rate / 50)


def _lane_loop(x, factor):
    """A while loop whose number of iterations differs between lanes."""
    return jax.lax.while_loop(lambda c: c[0] > 1.0, lambda c: (c[0] * factor, c[1] + 1),
                              (x, 0))[1]


def _population_setup(chunk_size):
    module = cal.zoo_module("reference")
    data = module.synthetic_data(jax.random.key(3), n_individuals=6, variability=0.2)
    return cal.population_setup(module.MODEL(), data, chunk_size=chunk_size,
                                hierarchy=cal.Hierarchy(random=["p"], fixed=["q"]))


def _population_evaluation(chunk_size):
    """Outer objective, hypergradient and inner solutions of a 6-individual population
    (on several devices: 6 padded to 8, two chunks of 2 per device)."""
    setup = _population_setup(chunk_size)
    e = setup.evaluate(cal.Implicit(curvature=cal.ForwardHessian()), setup.theta,
                       setup.starts)
    return {"value": float(e.value),
            "gradient": {k: np.asarray(v).tolist() for k, v in e.gradient.items()},
            "inner": np.asarray(e.hypergradients.inner_solution).tolist(),
            "stationarity": np.asarray(e.hypergradients.stationarity).tolist()}


def _evaluation_compiles_once() -> int:
    """Functions compiled by a second population evaluation and an outer BFGS run
    that start from the first evaluation's results (replicated over the devices
    when several), after a first run from fresh arrays."""
    from calibrate._compilation import compilation

    setup = _population_setup(chunk_size=2)
    method = cal.Implicit(curvature=cal.ForwardHessian())
    first = setup.evaluate(method, setup.theta, setup.starts)
    outer = cal.QuasiNewton(max_steps=2)

    def evaluate(theta, starts):
        return setup.evaluate(method, theta, starts)

    outer.run(evaluate, setup.theta, setup.starts, lambda *_: None)
    theta = jax.tree.map(lambda t, g: t - 1e-3 * g, setup.theta, first.gradient)
    with compilation() as log:
        setup.evaluate(method, theta, first.hypergradients.inner_solution)
        outer.run(evaluate, theta, first.hypergradients.inner_solution, lambda *_: None)
    return log.lowered


def _run_script(script, env, processes=1):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TESTS": str(Path(__file__).parent),
           "CACHE": str(jax.config.jax_compilation_cache_dir), **env}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for rank in range(processes)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _assert_same_evaluation(sharded, single):
    np.testing.assert_allclose(sharded["value"], single["value"], rtol=1e-12)
    for key in single["gradient"]:
        np.testing.assert_allclose(sharded["gradient"][key], single["gradient"][key],
                                   rtol=1e-10)
    np.testing.assert_allclose(sharded["inner"], single["inner"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sharded["stationarity"], single["stationarity"],
                               rtol=1e-6, atol=1e-14)


def test_individuals_sharded_over_four_devices_give_the_unsharded_result():
    """With four (CPU) devices the individual axis is split over them by `shard_map`;
    every number is the one-device result, also of a BFGS minimisation per lane
    (lineax checks its operators' structures) and of a gradient through diffrax's
    checkpointed loop (equinox checks its closure conversions' arguments). Each
    device runs its own while loops:
    in the compiled program of a map whose lanes loop different numbers of times no
    collective runs inside a loop (XLA's SPMD partitioner all-reduced every loop's
    stop condition across devices, which made an evaluation 7x slower on two CPU
    devices; this check finds that one). Results come back replicated over the
    devices, and evaluations and outer steps that start from them compile nothing
    new. `CALIBRATE_SHARD=0` uses one device."""
    (sharded,) = _run_script(_SHARDED_RUN, {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    _assert_same_evaluation(sharded, _population_evaluation(chunk_size=None))
    x = jnp.linspace(2.0, 100.0, 6)
    assert sharded["loop"] == jax.vmap(_lane_loop, (0, None))(x, 0.5).tolist()
    np.testing.assert_allclose(sharded["minima"], jax.vmap(_lane_minimum)(x), rtol=1e-10)
    np.testing.assert_allclose(sharded["slopes"], -np.exp(-np.asarray(x) / 50), rtol=1e-8)
    assert sharded["collectives"] == {"loops": 1, "in_loops": 0}
    assert sharded["compiled_again"] == 0
    assert sharded["devices"] == [4, 1]


_DISTRIBUTED_RUN = """
import json, os, sys
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=os.environ["COORDINATOR"], num_processes=2,
                           process_id=int(sys.argv[1]))
jax.config.update("jax_compilation_cache_dir", os.environ["CACHE"])
sys.path.insert(0, os.environ["TESTS"])
from test_batching import _population_evaluation
assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1
print(json.dumps(_population_evaluation(chunk_size=2)))
"""


@pytest.mark.slow
def test_two_processes_on_loopback_give_the_one_process_result():
    """`jax.distributed` with two CPU processes (one device each, gloo collectives):
    both processes read the one-process result."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = _run_script(_DISTRIBUTED_RUN, {"COORDINATOR": f"127.0.0.1:{port}"},
                          processes=2)
    single = _population_evaluation(chunk_size=None)
    for result in results:
        _assert_same_evaluation(result, single)
