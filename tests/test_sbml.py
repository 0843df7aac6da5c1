"""SBML import: semantics against closed forms, and clear refusals of what is unsupported."""

import math

import equinox as eqx
import jax.numpy as jnp
import libsbml
import numpy as np
import pytest

import calibrate as cal
from calibrate._sbml import read_sbml


def _math(formula):
    node = libsbml.parseL3Formula(formula)
    assert node is not None, libsbml.getLastParseL3Error()
    return node


def _add_reaction(model, rid, *, reactant=None, product=None):
    """An irreversible reaction with one reactant or product; returns its kinetic law."""
    reaction = model.createReaction()
    reaction.setId(rid)
    reaction.setReversible(False)
    reaction.setFast(False)
    for species, create in ((reactant, reaction.createReactant),
                            (product, reaction.createProduct)):
        if species is not None:
            reference = create()
            reference.setSpecies(species)
            reference.setStoichiometry(1.0)
            reference.setConstant(True)
    return reaction.createKineticLaw()


def build_document(*, extra=None):
    """A model exercising compartments, units, rules and function definitions.

    Closed forms (V = 2, k = 2·kk = 0.5):
    A (concentration, law k·A·V in amounts/time):    A = 3 e^{-k t}
    B (amount only, local kin = 0.5, zero order):     B = 1 + 0.5 t
    C (initialAmount 4 in V -> concentration 2, rate rule decay(C) = -C): C = 2 e^{-t}
    p (rate rule piecewise(1, t < 1, 0)):             p = min(t, 1)
    D = A + B (assignment rule).
    """
    document = libsbml.SBMLDocument(3, 1)
    model = document.createModel()
    model.setId("feature_model")
    fd = model.createFunctionDefinition()
    fd.setId("decay")
    fd.setMath(_math("lambda(x, -x)"))
    compartment = model.createCompartment()
    compartment.setId("V")
    compartment.setSize(2.0)
    compartment.setConstant(True)
    for sid, attributes in {
        "A": dict(initialConcentration=3.0, only_substance=False),
        "B": dict(initialAmount=1.0, only_substance=True),
        "C": dict(initialAmount=4.0, only_substance=False),
        "D": dict(initialConcentration=0.0, only_substance=False),
    }.items():
        species = model.createSpecies()
        species.setId(sid)
        species.setCompartment("V")
        species.setHasOnlySubstanceUnits(attributes["only_substance"])
        species.setBoundaryCondition(False)
        species.setConstant(False)
        if "initialAmount" in attributes:
            species.setInitialAmount(attributes["initialAmount"])
        else:
            species.setInitialConcentration(attributes["initialConcentration"])
    for pid, value, constant in (("kk", 0.25, True), ("k", 0.0, True), ("p", 0.0, False),
                                 ("t_switch", 1.0, True)):
        parameter = model.createParameter()
        parameter.setId(pid)
        parameter.setValue(value)
        parameter.setConstant(constant)
    assignment = model.createInitialAssignment()
    assignment.setSymbol("k")
    assignment.setMath(_math("2 * kk"))
    for kind, variable, formula in (("rate", "C", "decay(C)"),
                                    ("rate", "p", "piecewise(1, time < t_switch, 0)"),
                                    ("assignment", "D", "A + B")):
        rule = model.createRateRule() if kind == "rate" else model.createAssignmentRule()
        rule.setVariable(variable)
        rule.setMath(_math(formula))
    _add_reaction(model, "degradation", reactant="A").setMath(_math("k * A * V"))
    law = _add_reaction(model, "production", product="B")
    local = law.createLocalParameter()
    local.setId("kin")
    local.setValue(0.5)
    law.setMath(_math("kin"))
    if extra is not None:
        extra(model)
    return document


def write(document, path):
    assert libsbml.writeSBMLToFile(document, str(path)) == 1
    return path


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return write(build_document(), tmp_path_factory.mktemp("sbml") / "features.xml")


def test_import_matches_closed_forms(feature_file):
    model = cal.load_sbml(feature_file, observables={"D": "D", "A_amount": "A * V"})
    assert sorted(model.states) == ["A", "B", "C", "p"]
    order = [model.states.index(s) for s in ("A", "B", "C", "p")]
    params = model.parameter_space.complete()
    # The local parameter is renamed after its reaction; k came from its initial assignment.
    assert float(params["production_kin"]) == 0.5
    assert "k" not in params and float(params["kk"]) == 0.25
    np.testing.assert_allclose(model.discontinuities(params), [1.0])
    times = jnp.linspace(0.0, 3.0, 13)
    trajectory = eqx.filter_jit(cal.simulate)(
        model, params, times, integrator=cal.Integrator(rtol=1e-10, atol=1e-12)
    )
    assert cal.result_name(trajectory.result) == "successful"
    t = np.asarray(times)
    a = 3 * np.exp(-0.5 * t)
    b = 1 + 0.5 * t
    expected = np.stack([a, b, 2 * np.exp(-t), np.minimum(t, 1.0)], axis=1)
    np.testing.assert_allclose(trajectory.states[:, order], expected, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(trajectory.observables[:, 0], a + b, rtol=1e-7)
    np.testing.assert_allclose(trajectory.observables[:, 1], 2 * a, rtol=1e-7)


def test_generated_code_shares_subexpressions(feature_file):
    import sympy as sp

    from calibrate import _codegen

    x, y = sp.symbols("x y")
    expensive = sp.exp(x * y)
    source = _codegen.generate_source(
        "f", [_codegen.vector("v", [x, y])], [expensive + 1, expensive * 2]
    )
    assert source.count("exp(") == 1
    function = _codegen.compile_function("f", [_codegen.vector("v", [x, y])],
                                         [expensive + 1, expensive * 2])
    np.testing.assert_allclose(function(jnp.array([0.5, 2.0])), [math.e + 1, 2 * math.e])


def test_condition_values_reach_the_model(feature_file):
    model = cal.load_sbml(feature_file, values={"kk": 0.5})
    params = model.parameter_space.complete()
    trajectory = cal.simulate(model, params, jnp.array([2.0]),
                              integrator=cal.Integrator(rtol=1e-10, atol=1e-12))
    np.testing.assert_allclose(trajectory.states[0, model.states.index("A")], 3 * math.exp(-2.0), rtol=1e-7)


def _add_event(model):
    event = model.createEvent()
    event.setId("dose")
    event.setUseValuesFromTriggerTime(True)
    trigger = event.createTrigger()
    trigger.setMath(_math("time > 1"))
    trigger.setInitialValue(False)
    trigger.setPersistent(True)
    assignment = event.createEventAssignment()
    assignment.setVariable("kk")
    assignment.setMath(_math("1"))


def _add_algebraic(model):
    model.createAlgebraicRule().setMath(_math("kk - 1"))


def _add_delay(model):
    model.getReaction("degradation").getKineticLaw().setMath(_math("delay(A, 1) * k"))


def _add_fast(model):
    model.getReaction("degradation").setFast(True)


@pytest.mark.parametrize("extra, words", [
    (_add_event, "event 'dose': events are not supported"),
    (_add_algebraic, "algebraic rules"),
    (_add_delay, "delay()"),
    (_add_fast, "reaction 'degradation': fast reactions are not supported"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, extra, words):
    path = write(build_document(extra=extra), tmp_path / "model.xml")
    with pytest.raises(cal.SBMLError) as info:
        read_sbml(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_file_names_the_line(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<sbml><model><listOfSpecies><species id='A'/></model></sbml>")
    with pytest.raises(cal.SBMLError, match=r"broken.xml, line \d+: not valid SBML"):
        read_sbml(path)
    with pytest.raises(cal.SBMLError, match="SBML file not found"):
        read_sbml(tmp_path / "missing.xml")


def test_sbml_file_is_a_model_spec(feature_file):
    resolved = cal.resolve_model(str(feature_file))
    assert sorted(resolved.model.observable_names) == ["A", "B", "C", "p"]
