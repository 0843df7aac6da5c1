"""Write this example: an SBML model and PEtab tables with the population extension.

x' = -x + dose · p · u(t), x(0) = q, u = 1 on [0, 5) and 0 after; twelve subjects
whose gain is log-normal across the population (median 1.5, sd 0.3 on the log
scale) and whose x(0) = 2 is shared. Subjects 1-6 were measured after a single dose,
subjects 7-12 after a single and, in a second experiment, a double dose. Run
`python generate.py` to rewrite the files (seeded, so they come out the same).
"""

from pathlib import Path

import libsbml
import numpy as np

HERE = Path(__file__).parent
MEDIAN_GAIN, GAIN_SD, X0, SIGMA = 1.5, 0.3, 2.0, 0.05
TIMES = np.arange(1.0, 11.0)
DOSES = {"single": 1.0, "double": 2.0}


def closed_form(t, p, q, dose, t_off=5.0):
    before = q * np.exp(-t) + dose * p * (1 - np.exp(-t))
    after = q * np.exp(-t) + dose * p * (1 - np.exp(-t_off)) * np.exp(-(t - t_off))
    return np.where(t < t_off, before, after)


def sbml() -> str:
    document = libsbml.SBMLDocument(3, 2)
    model = document.createModel()
    model.setId("driven_decay")
    compartment = model.createCompartment()
    compartment.setId("cell")
    compartment.setSize(1.0)
    compartment.setConstant(True)
    species = model.createSpecies()
    species.setId("x")
    species.setCompartment("cell")
    species.setInitialConcentration(0.0)
    species.setHasOnlySubstanceUnits(False)
    species.setBoundaryCondition(False)
    species.setConstant(False)
    for pid, value in (("p", MEDIAN_GAIN), ("q", X0), ("dose", 1.0)):
        parameter = model.createParameter()
        parameter.setId(pid)
        parameter.setValue(value)
        parameter.setConstant(True)
    start = model.createInitialAssignment()
    start.setSymbol("x")
    start.setMath(libsbml.parseL3Formula("q"))
    for rid, formula, reactant, product in (
        ("input", "cell * dose * p * piecewise(1, lt(time, 5), 0)", None, "x"),
        ("decay", "cell * x", "x", None),
    ):
        reaction = model.createReaction()
        reaction.setId(rid)
        reaction.setReversible(False)
        for sid, create in ((reactant, reaction.createReactant),
                            (product, reaction.createProduct)):
            if sid:
                reference = create()
                reference.setSpecies(sid)
                reference.setStoichiometry(1.0)
                reference.setConstant(True)
        law = reaction.createKineticLaw()
        law.setMath(libsbml.parseL3Formula(formula))
    return libsbml.writeSBMLToString(document)


def tsv(name, header, rows):
    lines = ["\t".join(header), *("\t".join(map(str, row)) for row in rows)]
    (HERE / name).write_text("\n".join(lines) + "\n")


def subjects(seed=20261123):
    """Each subject's true gain and measurement rows."""
    rng = np.random.default_rng(seed)
    gains, rows = [], []
    for i in range(12):
        gain = MEDIAN_GAIN * np.exp(GAIN_SD * rng.standard_normal())
        gains.append(gain)
        for condition in ("single", "double") if i >= 6 else ("single",):
            values = closed_form(TIMES, gain, X0, DOSES[condition])
            values = values + SIGMA * rng.standard_normal(TIMES.size)
            rows += [[f"subject{i + 1:02d}", "x_obs", condition, f"{t:g}", f"{y:.6f}"]
                     for t, y in zip(TIMES, values, strict=True)]
    return np.array(gains), rows


def main():
    (HERE / "model.xml").write_text(sbml())
    tsv("conditions.tsv", ["conditionId", "dose"], [[c, d] for c, d in DOSES.items()])
    tsv("observables.tsv", ["observableId", "observableFormula", "noiseFormula"],
        [["x_obs", "x", "sigma_x"]])
    tsv("parameters.tsv",
        ["parameterId", "parameterScale", "lowerBound", "upperBound", "nominalValue",
         "estimate", "populationDistribution", "populationSd"],
        [["p", "log", 0.001, 1000, MEDIAN_GAIN, 1, "logNormal", 0.3],
         ["q", "lin", 0, 10, X0, 1, "fixed", ""],
         ["sigma_x", "lin", 0.001, 1, SIGMA, 0, "", ""]])
    _, rows = subjects()
    tsv("measurements.tsv", ["individualId", "observableId", "simulationConditionId",
                             "time", "measurement"], rows)
    (HERE / "problem.yaml").write_text(
        "format_version: 1\n"
        "parameter_file: parameters.tsv\n"
        "problems:\n"
        "  - sbml_files: [model.xml]\n"
        "    condition_files: [conditions.tsv]\n"
        "    measurement_files: [measurements.tsv]\n"
        "    observable_files: [observables.tsv]\n")


if __name__ == "__main__":
    main()
