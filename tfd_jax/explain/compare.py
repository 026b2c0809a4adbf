"""Reading the course's printed numbers and deciding whether a recomputation agrees with them.

The rule is the one stated in the shipped ``worked_examples.json``: a printed number agrees when it
lies within one unit of its last printed decimal of the recomputed value. The course rounds as it
goes and reuses its rounded numbers in the next step, so a printed value also counts as correct when
it follows, within the same tolerance, from the course's own earlier printed numbers (the "carried"
value). Everything else is a course error.

How many decimals a number was printed with is read from the number itself, with three refinements:

- a list printed as one vector or table shares one precision (the finest among its members), since
  JSON drops the trailing zeros of a value like ``0.200``; a calculator marks the few lists the
  course prints with mixed precision;
- a whole number that ends in three or more zeros (``5,000``, ``500,000``) is a round figure, good
  to its last non-zero digit;
- strings such as ``"614 million"``, ``"~21x"`` or ``"9.4 GB"`` are parsed, units included.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

AGREES = "agrees"  # matches the recomputation
CARRIED = "carried"  # matches only what follows from the course's own earlier printed numbers
DIFFERS = "differs"  # a course error
UNCHECKED = "unchecked"  # not computable from what the course prints

_UNITS = {
    "": 1.0,
    "x": 1.0,
    "×": 1.0,
    "%": 1.0,
    "k": 1e3,
    "thousand": 1e3,
    "million": 1e6,
    "m": 1e6,
    "billion": 1e9,
    "b": 1e9,
    "trillion": 1e12,
    "t": 1e12,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
}
_NUMBER_WITH_UNIT = re.compile(r"^\s*[~≈]?\s*([-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?)\s*([A-Za-z%×]*)\s*$")


def decimals_of(value: Any) -> int | None:
    """Decimals the course printed for ``value`` (negative for round figures); None if not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if value == 0:
            return 0
        zeros = len(str(abs(value))) - len(str(abs(value)).rstrip("0"))
        return -zeros if zeros >= 3 else 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            places = len(mantissa.split(".")[1]) if "." in mantissa else 0
            return places - int(exponent)
        return len(text.split(".")[1])
    if isinstance(value, str):
        parsed = parse_printed(value)
        return None if parsed is None else parsed.decimals
    return None


class Printed(NamedTuple):
    """A number as the course printed it."""

    value: float
    decimals: int  # tolerance is unit * 10**-decimals
    unit: float = 1.0  # multiplier of a unit word ("million", "GB")
    suffix: str = ""  # the unit text as printed (" million", "x", " GB")
    sci: int | None = None  # mantissa decimals when printed in e-notation


def _sci_digits(text: str) -> int | None:
    if "e" not in text.lower():
        return None
    mantissa = text.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def parse_printed(value: Any) -> Printed | None:
    """A printed quantity as a :class:`Printed`; None if it is not a number.

    Numbers are taken as they are. Strings like ``"614 million"``, ``"~21x"``, ``"9.4 GB"`` (bytes,
    decimal units) and ``"-inf"`` are understood.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        d = decimals_of(value)
        sci = _sci_digits(repr(value)) if isinstance(value, float) else None
        return Printed(float(value), 0 if d is None else d, sci=sci)
    if not isinstance(value, str):
        return None
    s = value.strip()
    if s.lower() in ("inf", "+inf", "-inf", "infinity", "-infinity"):
        return Printed(float(s.lower().replace("inity", "")), 0)
    m = _NUMBER_WITH_UNIT.match(s)
    if not m:
        return None
    number, unit = m.group(1), m.group(2)
    if unit.lower() not in _UNITS:
        return None
    plain = number.replace(",", "")
    if "e" in plain.lower() or "." in plain:
        d = decimals_of(float(plain))
    else:
        d = decimals_of(int(plain))
    scale = _UNITS[unit.lower()]
    suffix = unit if unit in ("x", "×", "%") else (" " + unit if unit else "")
    return Printed(float(plain) * scale, 0 if d is None else d, scale, suffix, _sci_digits(plain))


@dataclass
class Value:
    """What a calculator says about one printed quantity of an example.

    Attributes:
      ours: the recomputation from the example's inputs (a number, bool, or a list/dict shaped like
        the course's value). Lists may be shorter than the course's: the rest is unchecked.
      carried: the same quantity recomputed from the course's own earlier printed (rounded) numbers,
        where the course carries them; same shape as ``ours`` or None.
      decimals: printed precision to use instead of the one read from the course's value (when the
        JSON lost it); None reads it from the value.
      mixed: the course printed this list with mixed precision: each member keeps its own.
      stored: a claim about what a number format stores: zero and infinity must match exactly.
      note: one line shown beside the value.
      unchecked: why entries beyond ``ours`` (or the whole value) cannot be checked.
    """

    ours: Any
    carried: Any = None
    decimals: int | None = None
    mixed: bool = False
    stored: bool = False
    note: str = ""
    unchecked: str = ""


@dataclass
class Check:
    """One printed number of the course and our number for it."""

    path: str
    course: Any
    ours: Any
    carried: Any
    decimals: int | None
    unit: float
    status: str
    reason: str = ""
    key: str = ""  # the course output this number belongs to
    suffix: str = ""  # unit text of the printed value (" million", "x")
    sci: int | None = None  # mantissa decimals when the course used e-notation

    def show_course(self) -> str:
        """The course's number as printed (trailing zeros restored)."""
        if isinstance(self.course, (str, bool)) or self.decimals is None:
            return str(self.course)
        return fmt(self.course, self.decimals, sci=self.sci)

    def show_ours(self, keep_tiny: bool | None = None, extra_digits: int = 0) -> str:
        """Our number at the course's precision (plus ``extra_digits``); tiny values stay visible
        when they matter."""
        if self.status == UNCHECKED:
            return "?"
        if keep_tiny is None:
            keep_tiny = self.status == DIFFERS
        if isinstance(self.ours, bool) or self.decimals is None:
            return str(self.ours)
        x = self.ours / self.unit
        decimals, sci = self.decimals + extra_digits, self.sci
        if sci is not None:
            sci += extra_digits
        if extra_digits and math.isfinite(x) and x == round(x) and abs(x) < 1e15:
            decimals, sci = 0, None
        return fmt(x, decimals, sci=sci, keep_tiny=keep_tiny) + self.suffix

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "path": self.path,
            "course": to_jsonable(self.course),
            "ours": to_jsonable(self.ours),
            "carried": to_jsonable(self.carried),
            "decimals": self.decimals,
            "status": self.status,
            "reason": self.reason,
        }


def to_jsonable(x: Any) -> Any:
    """Plain JSON types: arrays become lists, infinities the strings "inf" / "-inf"."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    return x


def _close(ours: float, course: float, tol: float, stored: bool) -> bool:
    if math.isinf(course) or math.isinf(ours):
        return ours == course
    if stored and (course == 0.0) != (ours == 0.0):
        return False
    return abs(ours - course) <= tol * (1 + 1e-9) + 1e-12 * max(1.0, abs(course))


def _leaves(x: Any) -> list:
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def _group_decimals(course: Any) -> int | None:
    ds = [decimals_of(v) for v in _leaves(course) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    ds = [d for d in ds if d is not None]
    return max(ds) if ds else None


def compare(path: str, course: Any, spec: Value) -> list[Check]:
    """Walk the course's value and ``spec.ours`` in parallel and judge every printed number."""
    group = None
    is_table = isinstance(course, dict) and course and all(isinstance(v, list) for v in course.values())
    if (isinstance(course, list) or is_table) and not spec.mixed:
        group = _group_decimals(course)
    checks = _walk(path, course, spec.ours, spec.carried, spec, group)
    for c in checks:
        c.key = path
    return checks


def _walk(path, course, ours, carried, spec: Value, group) -> list[Check]:
    if isinstance(course, dict):
        out = []
        for k, c in course.items():
            o = ours.get(k, _MISSING) if isinstance(ours, dict) else _MISSING
            r = carried.get(k) if isinstance(carried, dict) else None
            out += _walk(f"{path}.{k}", c, o, r, spec, group)
        return out
    if isinstance(course, list):
        out = []
        for i, c in enumerate(course):
            o = ours[i] if isinstance(ours, (list, tuple)) and i < len(ours) else _MISSING
            r = carried[i] if isinstance(carried, (list, tuple)) and i < len(carried) else None
            out += _walk(f"{path}[{i}]", c, o, r, spec, group)
        return out
    return [_judge(path, course, ours, carried, spec, group)]


class _Missing:
    def __repr__(self):
        return "<not computed>"


_MISSING = _Missing()


def _judge(path, course, ours, carried, spec: Value, group) -> Check:
    if ours is _MISSING or ours is None:
        reason = spec.unchecked or "not computable from the printed inputs"
        return Check(path, course, None, None, None, 1.0, UNCHECKED, reason)
    if isinstance(course, bool) or isinstance(ours, bool):
        status = AGREES if bool(course) == bool(ours) else DIFFERS
        return Check(path, course, bool(ours), None, None, 1.0, status)
    parsed = parse_printed(course)
    if parsed is None:
        reason = spec.unchecked or f"the course's value {course!r} is not a number"
        return Check(path, course, ours, carried, None, 1.0, UNCHECKED, reason)
    value, decimals, unit, suffix, sci = parsed
    if spec.decimals is not None:
        decimals = spec.decimals
    elif group is not None and not isinstance(course, str) and (decimals is None or decimals < group):
        # A vector printed at one precision: trailing zeros count (but round figures stay round).
        if decimals is None or decimals >= 0:
            decimals = group
    tol = unit * 10.0 ** (-decimals)
    ours_f = float(ours)
    carried_f = None if carried is None else float(carried)
    if _close(ours_f, value, tol, spec.stored):
        status = AGREES
    elif carried_f is not None and _close(carried_f, value, tol, spec.stored):
        status = CARRIED
    else:
        status = DIFFERS
    return Check(path, course, ours_f, carried_f, decimals, unit, status, suffix=suffix, sci=sci)


def fmt(
    x: Any, decimals: int | None, unit: float = 1.0, *, sci: int | None = None, keep_tiny: bool = False
) -> str:
    """``x / unit`` with ``decimals`` decimals (or ``sci`` mantissa decimals in e-notation).

    With ``keep_tiny``, a non-zero value that would print as zero is shown in e-notation instead.
    """
    if x is None:
        return "-"
    if isinstance(x, (bool, str)):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    x = x / unit
    if sci is not None:
        return f"{x:.{sci}e}"
    if decimals is None:
        decimals = 4
    if keep_tiny and x != 0 and abs(x) < 0.5 * 10.0 ** (-max(decimals, 0)):
        return f"{x:.3g}"
    return f"{x:.{max(decimals, 0)}f}"


__all__ = [
    "AGREES",
    "CARRIED",
    "DIFFERS",
    "UNCHECKED",
    "Check",
    "Printed",
    "Value",
    "compare",
    "decimals_of",
    "fmt",
    "parse_printed",
    "to_jsonable",
]
