"""Converters: a recipe value as written (YAML or `--set`) -> its typed value, or ValueError saying
what was expected. `key` declares a recipe key with its default, converter and one-line doc."""

from __future__ import annotations

import math
import re
from dataclasses import field

# What a recipe may ask for: beyond these no value can be meant (a typo, an extra zero), and the rule
# (hyperrule/rule.py) checks them too.
MAX_STEPS = 10**9
MAX_BATCH = 2**20
MAX_RESOLUTION = 16_384


# ---------------------------------------------------------------- converters (value -> typed value)
class Converter:
    """A converter: checks one YAML value and returns it typed; `describe` goes into the docs."""

    describe = "any"

    def __call__(self, v):  # pragma: no cover - abstract
        raise NotImplementedError


_NUMERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(v):
    """A string that is wholly a decimal number -> that number; anything else unchanged.

    PyYAML reads YAML 1.1, where `1e-3` (no dot) is a string, not a float; users mean the number.
    Words (`inf`, `nan`, `many`) stay strings and are refused by the converters.
    """
    if isinstance(v, str) and _NUMERAL.fullmatch(v.strip()):
        return int(v) if re.fullmatch(r"\s*[+-]?\d+\s*", v) else float(v)
    return v


class Int(Converter):
    def __init__(self, lo=None, hi=None, hi_why: str = ""):
        self.lo, self.hi, self.hi_why = lo, hi, hi_why
        self.describe = "int" + _range(lo, hi)

    def __call__(self, v):
        v = _number(v)
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ValueError(f"expected an integer, got {v!r}")
        if self.hi is not None and v > self.hi and self.hi_why:
            raise ValueError(f"{v} is {self.hi_why} (at most {self.hi})")
        _check_range(v, self.lo, self.hi)
        return v


class Float(Converter):
    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.describe = "float" + _range(lo, hi, lo_open, hi_open)

    def __call__(self, v):
        v = _number(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v}")
        _check_range(v, self.lo, self.hi, self.lo_open, self.hi_open)
        return v


class Bool(Converter):
    describe = "true/false"

    def __call__(self, v):
        if not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {v!r}")
        return v


class Str(Converter):
    def __init__(self, choices=None, fold_case=False):
        self.choices, self.fold_case = choices, fold_case
        self.describe = " | ".join(choices) if choices else "string"

    def __call__(self, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not self.choices:
            v = str(v)
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {v!r}")
        if self.choices:
            match = {c.lower(): c for c in self.choices} if self.fold_case else {c: c for c in self.choices}
            key = v.lower() if self.fold_case else v
            if key not in match:
                raise ValueError(f"expected one of {', '.join(self.choices)}, got {v!r}")
            v = match[key]
        return v


class Nullable(Converter):
    def __init__(self, inner: Converter):
        self.inner = inner
        self.describe = f"{inner.describe} or null"

    def __call__(self, v):
        return None if v is None else self.inner(v)


class OneOf(Converter):
    """The first converter that accepts the value wins (e.g. an int or the word 'auto')."""

    def __init__(self, *convs: Converter):
        self.convs = convs
        self.describe = " or ".join(c.describe for c in convs)

    def __call__(self, v):
        errors = []
        for c in self.convs:
            try:
                return c(v)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"expected {self.describe}, got {v!r}")


class IntList(Converter):
    def __init__(self, length=None, lo=None, item: Converter | None = None):
        self.length, self.item = length, item or Int(lo)
        self.describe = f"list of {length or 'N'} ints"

    def __call__(self, v):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"expected a list like [3, 4, 6, 3], got {v!r}")
        if self.length and len(v) != self.length:
            raise ValueError(f"expected {self.length} values, got {len(v)}")
        return [self.item(x) for x in v]


class ImageSize(Converter):
    describe = "HxW (e.g. 32x32) or [H, W]"

    def __call__(self, v):
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if isinstance(v, str):
            m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", v)
            if not m:
                raise ValueError(f"expected HxW such as 32x32, got {v!r}")
            v = [int(m.group(1)), int(m.group(2))]
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(f"expected HxW such as 32x32, got {v!r}")
        h, w = (Int(1)(x) for x in v)
        return (h, w)


def _range(lo, hi, lo_open=False, hi_open=False):
    if lo is None and hi is None:
        return ""
    a = "(" if lo_open else "["
    b = ")" if hi_open else "]"
    return f" in {a}{'' if lo is None else lo}, {'' if hi is None else hi}{b}"


def _check_range(v, lo, hi, lo_open=False, hi_open=False):
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"must be {'<' if hi_open else '<='} {hi}, got {v}")


def key(default, conv: Converter, doc: str):
    """Declare a recipe key: its default, converter and one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"conv": conv, "doc": doc})
    return field(default=default, metadata={"conv": conv, "doc": doc})
