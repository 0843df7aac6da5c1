"""Symbolic expressions (sympy) compiled once into JAX functions.

Imported models (SBML, PEtab observables) arrive as formulas. They are translated to
sympy once, common subexpressions are eliminated across all outputs of a function
(`sympy.cse`), and the result is written as straight-line Python over `jax.numpy`
and `exec`-ed. The generated function has no Python-level loops or pytree traffic, so
tracing it is cheap and XLA sees one fused expression graph.
"""

from __future__ import annotations

import functools
import itertools
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import sympy as sp
from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations
from sympy.printing.numpy import JaxPrinter


class _Printer(JaxPrinter):
    """`jax.numpy` code with exact float literals and `where` chains for piecewise."""

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Piecewise(self, expr):
        *pieces, (last_value, last_condition) = expr.args
        if last_condition == sp.true:
            code = self._print(last_value)
        else:
            # sympy leaves a Piecewise without `otherwise` undefined outside its pieces.
            code = (
                f"jax.numpy.where({self._print(last_condition)}, "
                f"{self._print(last_value)}, jax.numpy.nan)"
            )
        for value, condition in reversed(pieces):
            code = f"jax.numpy.where({self._print(condition)}, {self._print(value)}, {code})"
        return code

    def _print_And(self, expr):
        return self._fold("logical_and", expr.args)

    def _print_Or(self, expr):
        return self._fold("logical_or", expr.args)

    def _print_Xor(self, expr):
        return self._fold("logical_xor", expr.args)

    def _print_Not(self, expr):
        return f"jax.numpy.logical_not({self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Max(self, expr):
        return self._fold("maximum", expr.args)

    def _print_Min(self, expr):
        return self._fold("minimum", expr.args)

    def _fold(self, op, args):
        """`op(op(a0, a1), a2) ...` for a binary `jax.numpy` function `op`."""
        code = self._print(args[0])
        for arg in args[1:]:
            code = f"jax.numpy.{op}({code}, {self._print(arg)})"
        return code


@dataclass(frozen=True)
class Argument:
    """One argument of a generated function and the symbols it binds.

    `kind="vector"`: an array whose element `i` is `symbols[i]`;
    `kind="mapping"`: a dict whose entry `keys[i]` is `symbols[i]`;
    `kind="scalar"`: a scalar bound to the single symbol.
    """

    name: str
    symbols: tuple[sp.Symbol, ...]
    kind: str = "vector"
    keys: tuple[str, ...] = ()


def vector(name: str, symbols: Sequence[sp.Symbol]) -> Argument:
    return Argument(name, tuple(symbols), "vector")


def mapping(name: str, entries: Mapping[str, sp.Symbol]) -> Argument:
    return Argument(name, tuple(entries.values()), "mapping", tuple(entries))


def scalar(name: str, symbol: sp.Symbol) -> Argument:
    return Argument(name, (symbol,), "scalar")


def generate_source(
    name: str, arguments: Sequence[Argument], outputs: Sequence[sp.Expr]
) -> str:
    """Python source of `def name(*arguments)` returning the outputs as one 1-d array."""
    bound = [s for a in arguments for s in a.symbols]
    duplicates = {s for s in bound if bound.count(s) > 1}
    if duplicates:
        raise ValueError(f"{name}: symbols bound twice: {sorted(map(str, duplicates))}")
    outputs = [sp.sympify(o) for o in outputs]
    free = set().union(*(o.free_symbols for o in outputs)) if outputs else set()
    unbound = free - set(bound)
    if unbound:
        raise ValueError(f"{name}: unbound symbols {sorted(map(str, unbound))}")
    # Generated local names cannot collide with SBML/PEtab identifiers or keywords.
    local = {s: sp.Symbol(f"_v{i}") for i, s in enumerate(bound)}
    outputs = [o.xreplace(local) for o in outputs]
    temporaries, reduced = sp.cse(
        outputs, symbols=(sp.Symbol(f"_c{i}") for i in itertools.count())
    )
    printer = _Printer()
    arg_names = [a.name for a in arguments]
    for a in arg_names:
        if not a.isidentifier() or keyword.iskeyword(a):
            raise ValueError(f"{name}: bad argument name {a!r}")
    lines = [f"def {name}({', '.join(arg_names)}):"]
    for argument in arguments:
        for i, symbol in enumerate(argument.symbols):
            if symbol not in free:
                continue
            target = local[symbol]
            if argument.kind == "vector":
                lines.append(f"    {target} = {argument.name}[{i}]")
            elif argument.kind == "mapping":
                lines.append(f"    {target} = {argument.name}[{argument.keys[i]!r}]")
            else:
                lines.append(f"    {target} = {argument.name}")
    for symbol, expression in temporaries:
        lines.append(f"    {symbol} = {printer.doprint(expression)}")
    items = ", ".join(
        f"jax.numpy.asarray({printer.doprint(o)}, dtype=float)" for o in reduced
    )
    lines.append(f"    return jax.numpy.stack([{items}])" if reduced else
                 "    return jax.numpy.zeros((0,))")
    return "\n".join(lines) + "\n"


class GeneratedFunction:
    """Generated code as a callable that is equal (and hashes equal) to any other
    compiled from the same source, so that jit caches keyed on it (static fields of
    models and problems) are shared between two imports of one model."""

    def __init__(self, name: str, source: str):
        namespace = {"jax": jax, "functools": functools}
        exec(compile(source, f"<calibrate generated {name}>", "exec"), namespace)
        self.function = namespace[name]
        self.name = name
        self.source = source

    def __call__(self, *args):
        return self.function(*args)

    def __eq__(self, other):
        return (isinstance(other, GeneratedFunction) and self.name == other.name
                and self.source == other.source)

    def __hash__(self):
        return hash((self.name, self.source))

    def __repr__(self):
        return f"GeneratedFunction({self.name!r})"


def compile_function(name: str, arguments: Sequence[Argument],
                     outputs: Sequence[sp.Expr]) -> GeneratedFunction:
    """A JAX function of `arguments` returning `outputs` (shape `(len(outputs),)`)."""
    return GeneratedFunction(name, generate_source(name, arguments, outputs))


def _piecewise(*args):
    if len(args) % 2 == 0:
        raise ValueError("piecewise needs value, condition, ..., otherwise")
    pieces = [(args[i], args[i + 1]) for i in range(0, len(args) - 1, 2)]
    return sp.Piecewise(*pieces, (args[-1], True))


# Functions of PEtab's math (also accepted in formula strings for SBML observables).
FORMULA_FUNCTIONS = {
    "exp": sp.exp, "log": lambda x, b=None: sp.log(x) if b is None else sp.log(x, b),
    "ln": sp.log, "log10": lambda x: sp.log(x, 10), "log2": lambda x: sp.log(x, 2),
    "sqrt": sp.sqrt, "abs": sp.Abs, "sign": sp.sign, "min": sp.Min, "max": sp.Max,
    "pow": lambda a, b: a**b, "piecewise": _piecewise, "floor": sp.floor,
    "ceil": sp.ceiling, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan,
    "true": sp.true, "false": sp.false, "inf": sp.oo, "pi": sp.pi,
}


def parse_formula(text: str, symbols: Mapping[str, object]) -> sp.Expr:
    """A math expression (`^` is power, `&&`/`||` logical) as sympy, with `symbols`
    bound by name; names not in `symbols` become fresh symbols for the caller to flag."""
    local = {**FORMULA_FUNCTIONS, **symbols}
    text = text.replace("&&", "&").replace("||", "|")
    expression = parse_expr(
        text, local_dict=local, transformations=(*standard_transformations, convert_xor),
        evaluate=True,
    )
    return expression if isinstance(expression, sp.Basic) else sp.sympify(expression)
