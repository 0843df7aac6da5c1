r"""SBML models (Level 2 and 3 core) as `AbstractODEModel`s.

The document is read with python-libsbml, its MathML translated once to sympy, and
the equations compiled to JAX (`_codegen`). The state vector holds

- every species that reactions or a rate rule change (its *concentration* when the
  species has `hasOnlySubstanceUnits=false`, else its amount), and
- every parameter or compartment with a rate rule.

For a species $S$ in compartment $V$ (constant size),
$\dot S = \tfrac{1}{V}\sum_r \nu_{S r}\, v_r$ in concentration units and
$\dot S = \sum_r \nu_{S r}\, v_r$ in amounts, with $v_r$ the kinetic law
(extent per time). Assignment rules and initial assignments are substituted
symbolically; function definitions are expanded. Constant and boundary species
without rules become parameters, so experiment tables can set them.

Not supported, each refused with an error naming the element: events, algebraic
rules, delays, fast reactions, `rateOf`, conversion factors, variable stoichiometry,
and concentration species in compartments whose size changes in time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from . import _codegen
from ._model import AbstractODEModel, Observable
from ._noise import Gaussian
from ._parameters import Parameter


AVOGADRO = 6.02214179e23
TIME = sp.Symbol("time")


class SBMLError(ValueError):
    """An SBML document that cannot be imported; the message names the element.

    `location` is the file (with a line where libsbml gives one), `detail` the rest.
    """

    def __init__(self, detail: str, location: str = ""):
        self.detail = detail
        self.location = location
        super().__init__(f"{location}: {detail}" if location else detail)


def _libsbml():
    try:
        import libsbml
    except ImportError:  # pragma: no cover - a dependency, but name it if missing
        raise SBMLError(
            "reading SBML needs python-libsbml: pip install python-libsbml"
        ) from None
    return libsbml


@dataclass
class SymbolicModel:
    """An SBML model as sympy expressions.

    `rhs[i]` and `initial[i]` belong to `states[i]`; `expressions` maps every
    assignment-rule variable (and other derived quantities) to an expression in
    states, parameters and `TIME`; `parameters` maps parameter ids (including
    compartments, local parameters and constant species) to their values, `None`
    where the document sets none.
    """

    name: str
    source: str
    states: list[str]
    rhs: list[sp.Expr]
    initial: list[sp.Expr]
    parameters: dict[str, float | None]
    expressions: dict[str, sp.Expr]
    symbols: dict[str, sp.Symbol]
    species: dict[str, SpeciesInfo] = field(default_factory=dict)

    def symbol(self, name: str) -> sp.Symbol:
        return self.symbols[name]

    @property
    def state_symbols(self) -> list[sp.Symbol]:
        return [self.symbols[s] for s in self.states]

    @property
    def parameter_symbols(self) -> dict[str, sp.Symbol]:
        return {p: self.symbols[p] for p in self.parameters}

    def substitute(self, expression: sp.Expr) -> sp.Expr:
        """`expression` with every derived quantity replaced by states and parameters."""
        return expression.xreplace(
            {self.symbols[n]: e for n, e in self.expressions.items()}
        )

    def discontinuities(self) -> list[sp.Expr]:
        """Times (in parameters only) at which a piecewise of the right-hand side
        switches: conditions linear in time, `a·time + b <op> 0`."""
        found: list[sp.Expr] = []
        allowed = set(self.parameter_symbols.values())
        for expression in self.rhs:
            for relation in expression.atoms(sp.core.relational.Relational):
                difference = sp.expand(relation.lhs - relation.rhs)
                slope = difference.diff(TIME)
                rest = sp.expand(difference - slope * TIME)
                if (TIME in difference.free_symbols and slope.free_symbols <= allowed
                        and rest.free_symbols <= allowed and slope != 0):
                    time = sp.simplify(-rest / slope)
                    if time not in found:
                        found.append(time)
        return found


@dataclass(frozen=True)
class SpeciesInfo:
    compartment: str
    amount_units: bool  # hasOnlySubstanceUnits: the symbol means an amount
    initial_is_amount: bool  # the document gives initialAmount


class _Reader:
    def __init__(self, document, source: str):
        self.libsbml = _libsbml()
        self.source = source
        self.model = document.getModel()
        if self.model is None:
            raise SBMLError("the document has no model", source)
        self.symbols: dict[str, sp.Symbol] = {}
        self.functions: dict[str, sp.Lambda] = {}
        L = self.libsbml
        # MathML operators that map to a sympy function of their arguments.
        self.applied = {
            L.AST_FUNCTION_EXP: sp.exp, L.AST_FUNCTION_LN: sp.log,
            L.AST_FUNCTION_ABS: sp.Abs, L.AST_FUNCTION_FLOOR: sp.floor,
            L.AST_FUNCTION_CEILING: sp.ceiling, L.AST_FUNCTION_SIN: sp.sin,
            L.AST_FUNCTION_COS: sp.cos, L.AST_FUNCTION_TAN: sp.tan,
            L.AST_FUNCTION_ARCSIN: sp.asin, L.AST_FUNCTION_ARCCOS: sp.acos,
            L.AST_FUNCTION_ARCTAN: sp.atan, L.AST_FUNCTION_SINH: sp.sinh,
            L.AST_FUNCTION_COSH: sp.cosh, L.AST_FUNCTION_TANH: sp.tanh,
            L.AST_FUNCTION_SEC: sp.sec, L.AST_FUNCTION_CSC: sp.csc,
            L.AST_FUNCTION_COT: sp.cot, L.AST_LOGICAL_NOT: sp.Not,
            L.AST_LOGICAL_AND: sp.And, L.AST_LOGICAL_OR: sp.Or, L.AST_LOGICAL_XOR: sp.Xor,
        }
        self.relational = {
            L.AST_RELATIONAL_EQ: sp.Eq, L.AST_RELATIONAL_NEQ: sp.Ne,
            L.AST_RELATIONAL_LT: sp.Lt, L.AST_RELATIONAL_LEQ: sp.Le,
            L.AST_RELATIONAL_GT: sp.Gt, L.AST_RELATIONAL_GEQ: sp.Ge,
        }

    def error(self, element: str, message: str) -> SBMLError:
        return SBMLError(f"{element}: {message}", self.source)

    def sym(self, name: str) -> sp.Symbol:
        if name not in self.symbols:
            self.symbols[name] = sp.Symbol(name, real=True)
        return self.symbols[name]

    # MathML -> sympy

    def math(self, node, where: str, local: Mapping[str, sp.Expr] | None = None):
        if node is None:
            raise self.error(where, "has no math")
        return self._ast(node, where, local or {})

    def _ast(self, node, where, local):
        L = self.libsbml
        kind = node.getType()
        args = lambda: [self._ast(node.getChild(i), where, local)
                        for i in range(node.getNumChildren())]
        if kind == L.AST_INTEGER:
            return sp.Integer(node.getInteger())
        if kind == L.AST_RATIONAL:
            return sp.Rational(node.getNumerator(), node.getDenominator())
        if kind in (L.AST_REAL, L.AST_REAL_E):
            value = node.getReal()
            if math.isnan(value):
                return sp.nan
            if math.isinf(value):
                return sp.oo if value > 0 else -sp.oo
            return sp.Float(value)
        if kind == L.AST_NAME:
            name = node.getName()
            if name in local:
                return local[name]
            return self.sym(name)
        if kind == L.AST_NAME_TIME:
            return TIME
        if kind == L.AST_NAME_AVOGADRO:
            return sp.Float(AVOGADRO)
        if kind == L.AST_CONSTANT_E:
            return sp.E
        if kind == L.AST_CONSTANT_PI:
            return sp.pi
        if kind == L.AST_CONSTANT_TRUE:
            return sp.true
        if kind == L.AST_CONSTANT_FALSE:
            return sp.false
        if kind == L.AST_PLUS:
            return sp.Add(*args())
        if kind == L.AST_MINUS:
            a = args()
            return -a[0] if len(a) == 1 else a[0] - sp.Add(*a[1:])
        if kind == L.AST_TIMES:
            return sp.Mul(*args())
        if kind == L.AST_DIVIDE:
            a, b = args()
            return a / b
        if kind in (L.AST_POWER, L.AST_FUNCTION_POWER):
            a, b = args()
            return a**b
        if kind == L.AST_FUNCTION_ROOT:
            a = args()
            return sp.sqrt(a[0]) if len(a) == 1 else a[1] ** (1 / a[0])
        if kind == L.AST_FUNCTION_LOG:
            a = args()
            return sp.log(a[0], 10) if len(a) == 1 else sp.log(a[1], a[0])
        if kind == L.AST_FUNCTION_PIECEWISE:
            a = args()
            pieces = [(a[i], a[i + 1]) for i in range(0, len(a) - 1, 2)]
            otherwise = a[-1] if len(a) % 2 else sp.nan
            return sp.Piecewise(*pieces, (otherwise, True))
        if kind == L.AST_FUNCTION:
            name = node.getName()
            if name not in self.functions:
                raise self.error(where, f"calls unknown function {name!r}")
            return self.functions[name](*args())
        if kind in self.applied:
            return self.applied[kind](*args())
        if kind in self.relational:
            a = args()
            op = self.relational[kind]
            return sp.And(*(op(a[i], a[i + 1]) for i in range(len(a) - 1)))
        for name in ("AST_FUNCTION_MAX", "AST_FUNCTION_MIN", "AST_FUNCTION_QUOTIENT",
                     "AST_FUNCTION_REM"):
            if kind == getattr(L, name, None):
                a = args()
                if name == "AST_FUNCTION_MAX":
                    return sp.Max(*a)
                if name == "AST_FUNCTION_MIN":
                    return sp.Min(*a)
                if name == "AST_FUNCTION_QUOTIENT":
                    return sp.floor(a[0] / a[1])
                return a[0] - a[1] * sp.floor(a[0] / a[1])
        if kind == L.AST_FUNCTION_DELAY:
            raise self.error(where, "uses delay(), which is not supported (delay equations)")
        if kind == getattr(L, "AST_FUNCTION_RATE_OF", None):
            raise self.error(where, "uses rateOf(), which is not supported")
        description = L.formulaToL3String(node)
        raise self.error(where, f"uses unsupported MathML construct {description!r}")

    def function_definitions(self):
        for fd in self.model.getListOfFunctionDefinitions():
            lam = fd.getMath()
            where = f"function definition {fd.getId()!r}"
            if lam is None or lam.getType() != self.libsbml.AST_LAMBDA:
                raise self.error(where, "is not a lambda expression")
            names = [lam.getChild(i).getName() for i in range(lam.getNumBvars())]
            dummies = [sp.Dummy(n) for n in names]
            body = self._ast(lam.getChild(lam.getNumChildren() - 1), where,
                             dict(zip(names, dummies, strict=True)))
            self.functions[fd.getId()] = sp.Lambda(tuple(dummies), body)


def read_sbml(path: str | os.PathLike) -> SymbolicModel:
    """Read an SBML file into a `SymbolicModel` (raises `SBMLError`)."""
    libsbml = _libsbml()
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SBMLError("SBML file not found", source)
    document = libsbml.readSBMLFromFile(str(path))
    errors = [
        document.getError(i) for i in range(document.getNumErrors())
        if document.getError(i).getSeverity() >= libsbml.LIBSBML_SEV_ERROR
    ]
    if errors:
        first = errors[0]
        raise SBMLError(
            f"not valid SBML: {first.getMessage().strip()}"
            + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""),
            f"{source}, line {first.getLine()}",
        )
    return _build(_Reader(document, source))


def _build(reader: _Reader) -> SymbolicModel:
    model = reader.model
    source = reader.source
    reader.function_definitions()
    if model.getNumEvents():
        event = model.getEvent(0)
        raise reader.error(
            f"event {event.getId() or '#1'!r}",
            "events are not supported (the model has "
            f"{model.getNumEvents()}); encode timed changes as piecewise expressions "
            "or time-dependent inputs",
        )
    for species in model.getListOfSpecies():
        if species.isSetConversionFactor():
            raise reader.error(f"species {species.getId()!r}",
                               "conversion factors are not supported")
    if model.isSetConversionFactor():
        raise reader.error("model", "conversion factors are not supported")

    assignment: dict[str, sp.Expr] = {}
    rate: dict[str, sp.Expr] = {}
    for rule in model.getListOfRules():
        variable = rule.getVariable() if not rule.isAlgebraic() else ""
        where = f"{'assignment' if rule.isAssignment() else 'rate'} rule for {variable!r}"
        if rule.isAlgebraic():
            raise reader.error("algebraic rule", "algebraic rules (DAEs) are not supported")
        if rule.isAssignment():
            assignment[variable] = reader.math(rule.getMath(), where)
        elif rule.isRate():
            rate[variable] = reader.math(rule.getMath(), where)

    initial_assignments = {
        ia.getSymbol(): reader.math(ia.getMath(), f"initial assignment for {ia.getSymbol()!r}")
        for ia in model.getListOfInitialAssignments()
    }

    parameters: dict[str, float | None] = {}
    constants: dict[str, sp.Expr] = {}  # time-constant derived values (initial assignments)
    states: list[str] = []
    rhs: dict[str, sp.Expr] = {}
    initial: dict[str, sp.Expr] = {}
    species_info: dict[str, SpeciesInfo] = {}

    def declare_value(identifier: str, value: float | None, what: str):
        reader.sym(identifier)
        if identifier in assignment:
            return
        if identifier in rate:
            states.append(identifier)
            rhs[identifier] = rate[identifier]
            if identifier in initial_assignments:
                initial[identifier] = initial_assignments[identifier]
            elif value is None:
                raise reader.error(f"{what} {identifier!r}", "has a rate rule but no initial value")
            else:
                initial[identifier] = sp.Float(value)
            return
        if identifier in initial_assignments:
            constants[identifier] = initial_assignments[identifier]
            return
        parameters[identifier] = value

    for compartment in model.getListOfCompartments():
        cid = compartment.getId()
        size = compartment.getSize() if compartment.isSetSize() else None
        if size is None and cid not in initial_assignments and cid not in assignment:
            size = 1.0  # SBML Level 2 default for 3-d compartments
        declare_value(cid, size, "compartment")

    for parameter in model.getListOfParameters():
        pid = parameter.getId()
        value = parameter.getValue() if parameter.isSetValue() else None
        declare_value(pid, value, "parameter")

    changing_compartments = {c for c in rate} | {c for c in assignment}
    reaction_species: set[str] = set()
    for reaction in model.getListOfReactions():
        for reference in (*reaction.getListOfReactants(), *reaction.getListOfProducts()):
            reaction_species.add(reference.getSpecies())

    for species in model.getListOfSpecies():
        sid = species.getId()
        reader.sym(sid)
        compartment = species.getCompartment()
        amount_units = species.getHasOnlySubstanceUnits()
        where = f"species {sid!r}"
        if species.isSetInitialAmount():
            value, is_amount = species.getInitialAmount(), True
        elif species.isSetInitialConcentration():
            value, is_amount = species.getInitialConcentration(), False
        else:
            value, is_amount = None, amount_units
        species_info[sid] = SpeciesInfo(compartment, amount_units, is_amount)
        volume = reader.sym(compartment)
        if value is None:
            start = None
        elif is_amount and not amount_units:
            start = sp.Float(value) / volume
        elif not is_amount and amount_units:
            start = sp.Float(value) * volume
        else:
            start = sp.Float(value)
        if sid in initial_assignments:
            start = initial_assignments[sid]
        if sid in assignment:
            continue
        changed_by_reactions = sid in reaction_species and not species.getBoundaryCondition()
        if sid in rate or changed_by_reactions:
            if start is None:
                raise reader.error(where, "has no initial amount, concentration or assignment")
            if changed_by_reactions and species.getConstant():
                raise reader.error(where, "is constant but changed by reactions")
            if changed_by_reactions and not amount_units and compartment in changing_compartments:
                raise reader.error(
                    where,
                    f"is a concentration in compartment {compartment!r}, whose size changes "
                    "in time; this is not supported",
                )
            states.append(sid)
            initial[sid] = start
            rhs[sid] = rate.get(sid, sp.Integer(0))
        elif start is not None and start.is_Number:
            parameters[sid] = float(start)
        elif start is not None:
            constants[sid] = start
        else:
            raise reader.error(where, "has no initial amount, concentration or assignment")

    for reaction in model.getListOfReactions():
        rid = reaction.getId()
        where = f"reaction {rid!r}"
        if reaction.isSetFast() and reaction.getFast():
            raise reader.error(where, "fast reactions are not supported")
        law = reaction.getKineticLaw()
        if law is None:
            raise reader.error(where, "has no kinetic law")
        local: dict[str, sp.Expr] = {}
        local_list = (law.getListOfLocalParameters() if model.getLevel() >= 3
                      else law.getListOfParameters())
        for p in local_list:
            name = f"{rid}_{p.getId()}"
            while name in reader.symbols:
                name += "_"
            local[p.getId()] = reader.sym(name)
            parameters[name] = p.getValue() if p.isSetValue() else None
        velocity = reader.math(law.getMath(), f"kinetic law of {where}", local)
        for sign, references in ((-1, reaction.getListOfReactants()),
                                 (1, reaction.getListOfProducts())):
            for reference in references:
                sid = reference.getSpecies()
                if getattr(reference, "isSetStoichiometryMath", lambda: False)():
                    raise reader.error(where, f"stoichiometryMath of {sid!r} is not supported")
                if reference.isSetId() and (reference.getId() in rate
                                            or reference.getId() in assignment
                                            or reference.getId() in initial_assignments):
                    raise reader.error(where, f"variable stoichiometry of {sid!r} is not supported")
                stoichiometry = (reference.getStoichiometry()
                                 if reference.isSetStoichiometry() else 1.0)
                if sid not in rhs or sid in rate:
                    continue  # boundary or rule-driven species: reactions leave it alone
                info = species_info[sid]
                term = sign * _number(stoichiometry) * velocity
                if not info.amount_units:
                    term = term / reader.sym(info.compartment)
                rhs[sid] = rhs[sid] + term

    # Derived quantities: assignment rules (time-varying) and initial-assignment
    # constants, substituted until only states, parameters and time remain.
    derived = {**constants, **assignment}
    derived_symbols = {reader.sym(n): e for n, e in derived.items()}
    for name in list(derived):
        derived[name] = _substitute_until_fixed(
            derived[name], derived_symbols,
            reader.error(f"rule for {name!r}", "assignment rules form a cycle"))
    resolve = {reader.sym(n): e for n, e in derived.items()}

    # Initial values see species at their initial values (derived quantities resolved).
    initial_env = {**resolve, **{reader.sym(s): initial[s] for s in states}}
    initial_values = [
        _substitute_until_fixed(initial[s], initial_env,
                                reader.error(f"initial value of {s!r}", "depends on itself"))
        for s in states
    ]

    known = set(states) | set(parameters) | {str(TIME)}
    symbolic = SymbolicModel(
        name=model.getId() or Path(source).stem,
        source=source,
        states=states,
        rhs=[rhs[s].xreplace(resolve) for s in states],
        initial=initial_values,
        parameters=parameters,
        expressions=derived,
        symbols=reader.symbols,
        species=species_info,
    )
    for where, expressions in (("right-hand side", symbolic.rhs),
                               ("initial values", symbolic.initial)):
        for e in expressions:
            unknown = {str(s) for s in e.free_symbols} - known
            if unknown:
                raise SBMLError(f"{where} uses undefined identifiers {sorted(unknown)}",
                                source)
    for s, e in zip(states, symbolic.initial, strict=True):
        if TIME in e.free_symbols or set(symbolic.state_symbols) & e.free_symbols:
            raise SBMLError(f"initial value of {s!r} depends on time or states", source)
    return symbolic


def _number(value: float) -> sp.Expr:
    return sp.Integer(int(value)) if float(value).is_integer() else sp.Float(value)


def _substitute_until_fixed(expression, substitutions, cycle_error: SBMLError):
    """Apply `substitutions` until nothing changes; more rounds than substitutions
    means a cycle."""
    for _ in range(len(substitutions) + 1):
        substituted = expression.xreplace(substitutions)
        if substituted == expression:
            return expression
        expression = substituted
    raise cycle_error


class SBMLModel(AbstractODEModel):
    """Base of models generated from SBML (see `load_sbml`)."""

    def rhs(self, t, x, params, inputs):
        return type(self)._rhs_function(t, x, params)

    def initial_state(self, params):
        return type(self)._initial_function(params)

    def observe(self, t, x, params):
        return type(self)._observe_function(t, x, params)

    def discontinuities(self, params):
        return type(self)._discontinuity_function(params)


def model_arguments(symbolic: SymbolicModel, parameters: Mapping[str, sp.Symbol]):
    """Codegen arguments `(t, x, p)` of a model's functions."""
    return [
        _codegen.scalar("t", TIME),
        _codegen.vector("x", symbolic.state_symbols),
        _codegen.mapping("p", parameters),
    ]


def build_model(
    symbolic: SymbolicModel,
    *,
    values: Mapping[str, float] | None = None,
    observables: Mapping[str, sp.Expr] | None = None,
    class_name: str | None = None,
) -> SBMLModel:
    """Compile a `SymbolicModel` into an `AbstractODEModel` instance.

    `values` overrides parameter values; `observables` maps observable names to
    expressions in states, parameters, derived quantities and time (default: every
    state, with unit Gaussian noise).
    """
    values = dict(values or {})
    parameter_values = {}
    for name, value in symbolic.parameters.items():
        value = values.get(name, value)
        if value is None:
            raise SBMLError(f"parameter {name!r} has no value; give one", symbolic.source)
        parameter_values[name] = float(value)
    parameters = tuple(
        Parameter(name, value, estimate=False) for name, value in parameter_values.items()
    )
    if observables is None:
        observables = {s: symbolic.symbol(s) for s in symbolic.states}
    observable_exprs = [symbolic.substitute(_expression(symbolic, name, e))
                        for name, e in observables.items()]
    arguments = model_arguments(symbolic, symbolic.parameter_symbols)
    p_only = [_codegen.mapping("p", symbolic.parameter_symbols)]
    jumps = symbolic.discontinuities()
    rhs_function = _codegen.compile_function("rhs", arguments, symbolic.rhs)
    initial_function = _codegen.compile_function("initial_state", p_only, symbolic.initial)
    observe_function = _codegen.compile_function("observe", arguments, observable_exprs)
    jump_function = _codegen.compile_function("discontinuities", p_only, jumps)
    name = class_name or _class_name(symbolic.name)
    attributes = {
        "states": tuple(symbolic.states),
        "parameters": parameters,
        "observables": tuple(Observable(o, Gaussian(1.0)) for o in observables),
        "inputs": (),
        "t0": 0.0,
        "_rhs_function": staticmethod(rhs_function),
        "_initial_function": staticmethod(initial_function),
        "_observe_function": staticmethod(observe_function),
        "_discontinuity_function": staticmethod(jump_function),
        # Not the file: two files with the same model share this class.
        "__doc__": f"SBML model {symbolic.name}.",
        "__module__": __name__,
    }
    # One class per distinct model, so two imports of one model share compiled code
    # (jit caches key on the model's type).
    key = (name, attributes["states"], tuple(observables),
           tuple((p.name, p.default) for p in parameters),
           *(f.source for f in (rhs_function, initial_function, observe_function,
                                jump_function)))
    if key not in _MODEL_CLASSES:
        _MODEL_CLASSES[key] = type(name, (SBMLModel,), attributes)
    return _MODEL_CLASSES[key]()


_MODEL_CLASSES: dict[tuple, type] = {}


def _expression(symbolic: SymbolicModel, name: str, formula) -> sp.Expr:
    """A formula string or sympy expression over the model's identifiers."""
    if not isinstance(formula, str):
        return sp.sympify(formula)
    local = {**symbolic.symbols, "time": TIME}
    try:
        expression = _codegen.parse_formula(formula, local)
    except Exception as error:
        raise SBMLError(f"observable {name!r}: cannot parse {formula!r}: {error}") from None
    unknown = sorted(str(s) for s in expression.free_symbols - set(local.values()))
    if unknown:
        raise SBMLError(f"observable {name!r}: unknown identifiers {unknown} in {formula!r}")
    return expression


def _class_name(identifier: str) -> str:
    name = "".join(c if c.isalnum() else "_" for c in identifier) or "SBMLModel"
    return name if name[0].isalpha() else f"Model_{name}"


def load_sbml(path: str | os.PathLike, **overrides) -> SBMLModel:
    """An SBML file as an `AbstractODEModel` whose observables are its states.

    **Arguments:** `path`; keyword `values` (parameter values by id) and
    `observables` (name -> sympy expression or formula string) as in `build_model`.
    """
    return build_model(read_sbml(path), **overrides)
