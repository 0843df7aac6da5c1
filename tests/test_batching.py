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


@pytest.mark.parametrize("chunk", [None, 3, 4, 10])
def test_chunked_map_equals_vmap(chunk):
    """Including a remainder chunk (10 = 3 × 3 + 1) and a shared argument."""
    a = jnp.arange(30.0).reshape(10, 3)
    b = jnp.linspace(1, 2, 10)
    shared = {"scale": jnp.array(2.0)}

    def fn(a, b, shared):
        return {"sum": shared["scale"] * jnp.sum(a) + b, "solve": jnp.linalg.solve(
            jnp.eye(3) * (1 + b) + 0.1, a)}

    expected = jax.vmap(fn, in_axes=(0, 0, None))(a, b, shared)
    result = map_individuals(fn, (a, b, shared), (0, 0, None), chunk)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-14), result, expected)
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
