import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import calibrate as cal


def test_bad_parameter_specifications_name_the_parameter():
    with pytest.raises(cal.ParameterError, match="'k1'.*lower bound 2.0 is not below"):
        cal.Parameter("k1", 1.0, 2.0, 1.0)
    with pytest.raises(cal.ParameterError, match="'k2'.*positive lower bound"):
        cal.Parameter("k2", 1.0, 0.0, 10.0, scale="log")
    with pytest.raises(cal.ParameterError, match="'k3'.*outside its bounds"):
        cal.Parameter("k3", 20.0, 1.0, 10.0)
    with pytest.raises(cal.ParameterError, match="scale 'ln'"):
        cal.Parameter("k4", 1.0, 0.1, 10.0, scale="ln")
    with pytest.raises(cal.ParameterError, match="duplicate parameter names: a"):
        cal.ParameterSpace([cal.Parameter("a", 1.0), cal.Parameter("a", 2.0)])
    space = cal.ParameterSpace([cal.Parameter("a", 1.0, 0.0, 2.0)])
    with pytest.raises(cal.ParameterError, match="unknown parameter.*'b'|unknown parameter.*b"):
        space.with_estimated(["b"])
    with pytest.raises(cal.ParameterError, match="'a': value 3.0 lies outside"):
        space.complete({"a": 3.0})


bounded = st.tuples(
    st.sampled_from(["lin", "log", "log10"]),
    st.floats(1e-3, 1e2),
    st.floats(1.5, 1e3),
    st.floats(0.0, 1.0),
)


@settings(max_examples=80, deadline=None)
@given(bounded)
def test_vector_round_trip_stays_inside_bounds(spec):
    scale, lower, factor, fraction = spec
    upper = lower * factor
    value = lower + fraction * (upper - lower)
    value = min(max(value, lower * (1 + 1e-9)), upper * (1 - 1e-9))
    p = cal.Parameter("k", value, lower, upper, scale=scale)
    space = cal.ParameterSpace([p])
    z = space.to_vector({"k": value})
    back = float(space.from_vector(z)["k"])
    assert math.isclose(back, value, rel_tol=1e-6)
    # Any unconstrained vector maps inside the bounds.
    for zz in (-50.0, -5.0, 0.0, 5.0, 50.0):
        v = float(space.from_vector(jnp.array([zz]))["k"])
        assert lower <= v <= upper


def test_one_sided_and_unbounded_parameters():
    space = cal.ParameterSpace(
        [
            cal.Parameter("free", 0.3),
            cal.Parameter("positive", 2.0, 0.0, math.inf),
            cal.Parameter("capped", -1.0, -math.inf, 5.0),
        ]
    )
    values = {"free": -7.5, "positive": 1e-3, "capped": -40.0}
    z = space.to_vector(values)
    back = space.from_vector(z)
    for name, v in values.items():
        assert math.isclose(float(back[name]), v, rel_tol=1e-9)
    big = space.from_vector(jnp.array([100.0, -100.0, 100.0]))
    assert float(big["positive"]) > 0 and float(big["capped"]) < 5.0


def test_fixed_parameters_keep_values_and_estimated_order_follows_model():
    space = cal.ParameterSpace(
        [cal.Parameter("a", 1.0, 0.1, 10, scale="log"), cal.Parameter("b", 2.0),
         cal.Parameter("c", 3.0, estimate=False)],
    )
    assert space.estimated == ("a", "b")
    assert space.with_estimated(["b", "a"]).estimated == ("a", "b")
    params = space.from_vector(space.to_vector({"a": 4.0, "b": -1.0}), {"c": 7.0})
    np.testing.assert_allclose([params["a"], params["b"], params["c"]], [4.0, -1.0, 7.0])
