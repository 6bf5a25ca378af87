"""Generated worked math problems with step-by-step solutions (the built-in ``math`` domain).

Each document is a short worksheet of problems drawn from a seeded ``random.Random``; document
``i`` depends only on ``(seed, i)``, so the stream is reproducible and can be extended without
changing what came before. All arithmetic is exact (integers and ``fractions.Fraction``).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable, Iterator

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jun", "Kemi", "Luis", "Mira", "Noor", "Omar", "Priya"]
_ITEMS = [("apples", "apple"), ("books", "book"), ("marbles", "marble"), ("stamps", "stamp"), ("pencils", "pencil"), ("tickets", "ticket"), ("cookies", "cookie"), ("shells", "shell")]
_VARS = ["x", "y", "z", "n", "t", "a", "k", "m"]


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _signed(term: int, first: bool = False) -> str:
    if first:
        return str(term)
    return f"+ {term}" if term >= 0 else f"- {-term}"


def _linear_term(coef: int, var: str) -> str:
    return {1: var, -1: f"-{var}"}.get(coef, f"{coef}{var}")


def _arithmetic_chain(rng: random.Random) -> tuple[str, list[str], str]:
    value = rng.randint(10, 999)
    expr = str(value)
    steps = []
    for _ in range(rng.randint(2, 5)):
        op = rng.choice("+-*")
        operand = rng.randint(2, 99) if op != "*" else rng.randint(2, 12)
        new = value + operand if op == "+" else value - operand if op == "-" else value * operand
        symbol = {"+": "+", "-": "-", "*": "×"}[op]
        steps.append(f"{value} {symbol} {operand} = {new}.")
        expr = f"({expr}) {symbol} {operand}" if op == "*" else f"{expr} {symbol} {operand}"
        value = new
    return f"Compute {expr}.", ["Work from left to right, respecting the parentheses."] + steps, str(value)


def _long_multiplication(rng: random.Random) -> tuple[str, list[str], str]:
    a, b = rng.randint(12, 999), rng.randint(12, 99)
    tens, ones = divmod(b, 10)
    steps = [
        f"Split {b} into {tens * 10} + {ones}.",
        f"{a} × {tens * 10} = {a * tens * 10}.",
        f"{a} × {ones} = {a * ones}.",
        f"Add the partial products: {a * tens * 10} + {a * ones} = {a * b}.",
    ]
    return f"Multiply {a} by {b}.", steps, str(a * b)


def _division(rng: random.Random) -> tuple[str, list[str], str]:
    divisor = rng.randint(3, 25)
    quotient = rng.randint(5, 400)
    remainder = rng.randint(0, divisor - 1)
    dividend = divisor * quotient + remainder
    steps = [
        f"Find the largest multiple of {divisor} not exceeding {dividend}: {divisor} × {quotient} = {divisor * quotient}.",
        f"The remainder is {dividend} - {divisor * quotient} = {remainder}.",
    ]
    answer = f"{quotient} remainder {remainder}" if remainder else str(quotient)
    return f"Divide {dividend} by {divisor}.", steps, answer


def _fractions(rng: random.Random) -> tuple[str, list[str], str]:
    p = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    q = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    op = rng.choice(["+", "-", "×", "÷"])
    steps = []
    if op in "+-":
        lcd = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
        pn, qn = p.numerator * (lcd // p.denominator), q.numerator * (lcd // q.denominator)
        raw = pn + qn if op == "+" else pn - qn
        steps.append(f"The least common denominator of {p.denominator} and {q.denominator} is {lcd}.")
        steps.append(f"Rewrite: {_frac(p)} = {pn}/{lcd} and {_frac(q)} = {qn}/{lcd}.")
        steps.append(f"{'Add' if op == '+' else 'Subtract'} the numerators: {pn} {op} {qn} = {raw}, giving {raw}/{lcd}.")
        result = Fraction(raw, lcd)
    elif op == "×":
        result = p * q
        steps.append(f"Multiply numerators and denominators: ({p.numerator} × {q.numerator})/({p.denominator} × {q.denominator}) = {p.numerator * q.numerator}/{p.denominator * q.denominator}.")
    else:
        result = p / q
        steps.append(f"Dividing by {_frac(q)} is multiplying by its reciprocal {q.denominator}/{q.numerator}.")
        steps.append(f"({p.numerator} × {q.denominator})/({p.denominator} × {q.numerator}) = {p.numerator * q.denominator}/{p.denominator * q.numerator}.")
    steps.append(f"In lowest terms the result is {_frac(result)}.")
    return f"Simplify {_frac(p)} {op} {_frac(q)}.", steps, _frac(result)


def _linear_equation(rng: random.Random) -> tuple[str, list[str], str]:
    var = rng.choice(_VARS)
    a = rng.choice([i for i in range(-9, 13) if i not in (0, 1)])
    solution = rng.randint(-20, 20)
    b = rng.randint(-50, 50)
    c = a * solution + b
    steps = [
        (f"Subtract {b} from both sides: {_linear_term(a, var)} = {c} - {b} = {c - b}." if b >= 0
         else f"Add {-b} to both sides: {_linear_term(a, var)} = {c} + {-b} = {c - b}."),
        f"Divide both sides by {a}: {var} = {c - b}/{a} = {solution}.",
        f"Check: {a} × ({solution}) {_signed(b)} = {c}.",
    ]
    return f"Solve {_linear_term(a, var)} {_signed(b)} = {c} for {var}.", steps, f"{var} = {solution}"


def _system(rng: random.Random) -> tuple[str, list[str], str]:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a1, b1 = rng.randint(1, 6), rng.randint(1, 6)
    a2, b2 = rng.randint(1, 6), rng.randint(-6, -1)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    det = a1 * b2 - a2 * b1
    steps = [
        f"Multiply the first equation by {a2} and the second by {a1}: {a1 * a2}x + {b1 * a2}y = {c1 * a2} and {a1 * a2}x {_signed(b2 * a1)}y = {c2 * a1}.",
        f"Subtract to eliminate x: ({b1 * a2} - ({b2 * a1}))y = {c1 * a2} - ({c2 * a1}), so {b1 * a2 - b2 * a1}y = {c1 * a2 - c2 * a1} and y = {y}.",
        f"Substitute into the first equation: {a1}x + {b1} × ({y}) = {c1}, so {a1}x = {c1 - b1 * y} and x = {x}.",
    ]
    assert det != 0
    return (
        f"Solve the system {a1}x + {b1}y = {c1} and {a2}x {_signed(b2)}y = {c2}.",
        steps,
        f"x = {x}, y = {y}",
    )


def _expand(rng: random.Random) -> tuple[str, list[str], str]:
    var = rng.choice(_VARS)
    a, b, c, d = rng.randint(1, 7), rng.randint(-9, 9), rng.randint(1, 7), rng.randint(-9, 9)
    quad, lin, const = a * c, a * d + b * c, b * d
    steps = [
        f"First terms: {a}{var} × {c}{var} = {quad}{var}^2.",
        f"Outer and inner terms: {a}{var} × {d} + {b} × {c}{var} = {lin}{var}.",
        f"Last terms: {b} × {d} = {const}.",
    ]
    answer = f"{quad}{var}^2 {_signed(lin)}{var} {_signed(const)}"
    return f"Expand ({a}{var} {_signed(b)})({c}{var} {_signed(d)}).", steps, answer


def _factor_quadratic(rng: random.Random) -> tuple[str, list[str], str]:
    var = rng.choice(_VARS)
    r, s = rng.randint(-12, 12), rng.randint(-12, 12)
    b, c = -(r + s), r * s
    steps = [
        f"Look for two numbers whose product is {c} and whose sum is {b}.",
        f"{-r} and {-s} work: {-r} × {-s} = {c} and {-r} + {-s} = {b}.",
        f"So {var}^2 {_signed(b)}{var} {_signed(c)} = ({var} {_signed(-r)})({var} {_signed(-s)}).",
        f"Setting each factor to zero gives {var} = {r} or {var} = {s}.",
    ]
    return f"Solve {var}^2 {_signed(b)}{var} {_signed(c)} = 0 by factoring.", steps, f"{var} = {min(r, s)} or {var} = {max(r, s)}"


def _evaluate_polynomial(rng: random.Random) -> tuple[str, list[str], str]:
    coefs = [rng.randint(-6, 6) for _ in range(rng.randint(2, 4))]
    coefs[0] = coefs[0] or 1
    point = rng.randint(-4, 5)
    degree = len(coefs) - 1
    terms = " ".join(_signed(c, i == 0) + (f"x^{degree - i}" if degree - i > 1 else "x" if degree - i == 1 else "") for i, c in enumerate(coefs))
    steps, total = [], 0
    for i, c in enumerate(coefs):
        power = degree - i
        value = c * point**power
        total += value
        steps.append(f"{c} × ({point})^{power} = {value}.")
    steps.append(f"Sum: {total}.")
    return f"Evaluate p(x) = {terms} at x = {point}.", steps, str(total)


def _percent(rng: random.Random) -> tuple[str, list[str], str]:
    name = rng.choice(_NAMES)
    plural, _ = rng.choice(_ITEMS)
    whole = rng.randint(2, 40) * 20
    pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
    part = whole * pct // 100
    steps = [
        f"{pct}% means {pct}/100.",
        f"{pct}/100 × {whole} = {pct * whole}/100 = {part}.",
        f"{name} keeps {whole} - {part} = {whole - part} {plural}.",
    ]
    return (
        f"{name} has {whole} {plural} and gives away {pct}% of them. How many are given away, and how many are left?",
        steps,
        f"{part} given away, {whole - part} left",
    )


def _word_problem(rng: random.Random) -> tuple[str, list[str], str]:
    a, b = rng.sample(_NAMES, 2)
    plural, singular = rng.choice(_ITEMS)
    start = rng.randint(10, 90)
    more = rng.randint(2, 9)
    groups = rng.randint(2, 6)
    total_b = start + more
    steps = [
        f"{b} has {more} more than {a}: {start} + {more} = {total_b} {plural}.",
        f"Together they have {start} + {total_b} = {start + total_b} {plural}.",
        f"Shared equally among {groups} friends: {start + total_b} ÷ {groups} = {(start + total_b) // groups} each, with {(start + total_b) % groups} left over.",
    ]
    return (
        f"{a} has {start} {plural}. {b} has {more} more {plural if more != 1 else singular} than {a}. They pool them and share them equally among {groups} friends. How many does each friend get?",
        steps,
        f"{(start + total_b) // groups} each, remainder {(start + total_b) % groups}",
    )


PROBLEM_KINDS: list[Callable[[random.Random], tuple[str, list[str], str]]] = [
    _arithmetic_chain,
    _long_multiplication,
    _division,
    _fractions,
    _linear_equation,
    _system,
    _expand,
    _factor_quadratic,
    _evaluate_polynomial,
    _percent,
    _word_problem,
]

_TITLES = ["Worked examples", "Practice set", "Exercises with solutions", "Review problems", "Homework solutions"]


def math_document(seed: int, index: int) -> str:
    """The ``index``-th worksheet of the stream for ``seed``."""
    rng = random.Random(f"btx-math-{seed}-{index}")
    lines = [f"{rng.choice(_TITLES)} {index + 1}", ""]
    for number in range(1, rng.randint(3, 8) + 1):
        question, steps, answer = rng.choice(PROBLEM_KINDS)(rng)
        lines.append(f"Problem {number}. {question}")
        lines.append("Solution.")
        lines.extend(f"Step {i}: {step}" for i, step in enumerate(steps, start=1))
        lines.append(f"Answer: {answer}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def math_documents(seed: int) -> Iterator[str]:
    """An endless, reproducible stream of worksheets."""
    index = 0
    while True:
        yield math_document(seed, index)
        index += 1
