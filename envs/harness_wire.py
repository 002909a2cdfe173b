"""The wire format between the sandbox's processes: frames and strictly typed values.

Stdlib only: this file is also loaded by path inside the sandbox's worker ("zygote") process, which must not
import the `envs` package (it would pull in the suites and their dependencies).

Frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON. Every reader caps the length.

Values (what a program's call returns, shipped from the untrusted child to the parent for judging) are plain
Python data only: `type(x)` is exactly one of int, float, complex, str, bytes, bool, NoneType, list, tuple,
set, frozenset, dict (recursively), plus collections.deque, fractions.Fraction and decimal.Decimal. They travel
as tagged JSON:

    None, bool, int (< 4000 digits), float (NaN and ±Infinity allowed), str, list -> JSON as is
    {"t": [...]} tuple    {"s": [...]} set     {"f": [...]} frozenset    {"d": [[k, v], ...]} dict
    {"i": "hex"} big int  {"c": [re, im]} complex  {"b": "base64"} bytes  {"q": [n, d]} Fraction
    {"D": "str"} Decimal  {"Q": [...]} deque (its maxlen is not kept: equality ignores it)

`canonical` (run in the child) turns honest look-alikes (a numpy integer, a Counter, a namedtuple, a str
subclass) into these plain types through the base types' own methods, and refuses anything else.
`decode_value` (run in the parent) rebuilds plain values from untrusted JSON and rejects anything malformed,
so an object with a forged `__eq__` can never reach the parent's comparison.
"""

from __future__ import annotations

import base64
import collections
# Bound here so that a program replacing builtins (it runs in the same process) cannot bend the codec.
from builtins import (TypeError, ValueError, bool, bytes, complex, dict, float, frozenset, int,  # noqa
                      isinstance, len, list, set, str, tuple, type)
import decimal
import fractions
import json
import numbers
from json.encoder import encode_basestring_ascii
import os
import struct

_quote = encode_basestring_ascii  # the C implementation when available
_INF = float("inf")
MAX_FRAME = 64 * 1024 * 1024
MAX_VALUE_NODES = 1_000_000
MAX_VALUE_DEPTH = 200
_BIG = 10 ** 3999
MAX_INT_BITS = 1 << 20  # about 315,000 digits: arithmetic on larger ints (`a // b`) could take the parent seconds
MAX_FRACTION_BITS = 1 << 16  # a Fraction part of about 20,000 digits: normalising (gcd) stays in milliseconds
MAX_HASH_PROBES = 1 << 20  # equality tests to rebuild one set or dict (an honest value needs almost none)


class WireError(ValueError):
    """A malformed frame or value: treated as tampering (the test is not passed)."""


class TooCostly(WireError):
    """A well-formed value too costly for the parent to rebuild or compare: the program's runtime error."""


class Unshippable(TypeError):
    """A value that is not plain data (or is too large) and so cannot be judged outside the child."""


# ---------------------------------------------------------------------------------------------- frames

def encode_frame(obj: object) -> bytes:
    data = _dumps(obj).encode("ascii")
    return struct.pack(">I", len(data)) + data


def _dumps(obj: object) -> str:
    """JSON text of plain frame data, without the json module's Python-level code (whose calls to
    builtins a program could have replaced)."""
    t = type(obj)
    if t is str:
        return _quote(obj)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if t is int:
        return int.__repr__(obj)
    if t is float:
        if obj != obj:
            return "NaN"
        if obj in (_INF, -_INF):
            return "Infinity" if obj > 0 else "-Infinity"
        return float.__repr__(obj)
    if t is list or t is tuple:
        return "[" + ",".join([_dumps(v) for v in obj]) + "]"
    if t is dict:
        return "{" + ",".join([_quote(k) + ":" + _dumps(v) for k, v in dict.items(obj)]) + "}"
    raise TypeError(f"cannot encode {t.__name__} in a frame")


def write_frame(fd: int, obj: object) -> None:
    write_all(fd, encode_frame(obj))


def write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def split_frames(buf: bytearray, max_frame: int = MAX_FRAME) -> list[bytes]:
    """Remove and return the complete frames at the start of `buf` (raw JSON bytes)."""
    out = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", bytes(buf[:4]))
        if n > max_frame:
            raise WireError(f"frame of {n} bytes exceeds the {max_frame}-byte cap")
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4:4 + n]))
        del buf[:4 + n]
    return out


def read_frame(fd: int, max_frame: int = MAX_FRAME) -> object | None:
    """Blocking read of one frame from `fd`; None at end of file."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > max_frame:
        raise WireError(f"frame of {n} bytes exceeds the {max_frame}-byte cap")
    body = _read_exact(fd, n)
    if body is None:
        raise WireError("end of file inside a frame")
    return json.loads(body)


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            if got == 0:
                return None
            raise WireError("end of file inside a frame")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- values

def canonical(x: object, _state: list | None = None, _depth: int = 0) -> object:
    """Encode `x` as tagged JSON data, converting look-alikes to plain types; raise Unshippable otherwise."""
    state = _state if _state is not None else [0]
    state[0] += 1
    t = type(x)
    if t is str or t is bytes:
        state[0] += len(x) // 16  # strings count by size: 16 characters weigh one element
    if state[0] > MAX_VALUE_NODES:
        raise Unshippable(f"value has more than {MAX_VALUE_NODES} elements (or 16 MB of text)")
    if _depth > MAX_VALUE_DEPTH:
        raise Unshippable(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -_BIG < x < _BIG else {"i": int.__format__(x, "x")}
    if t is float:
        return x
    d = _depth + 1
    if t is list:
        return [canonical(v, state, d) for v in list.__iter__(x)]
    if t is tuple:
        return {"t": [canonical(v, state, d) for v in tuple.__iter__(x)]}
    if t is dict:
        return {"d": [[canonical(k, state, d), canonical(v, state, d)] for k, v in dict.items(x)]}
    if t is set:
        return {"s": [canonical(v, state, d) for v in set.__iter__(x)]}
    if t is frozenset:
        return {"f": [canonical(v, state, d) for v in frozenset.__iter__(x)]}
    if t is complex:
        return {"c": [complex.__getattribute__(x, "real"), complex.__getattribute__(x, "imag")]}
    if t is bytes:
        return {"b": base64.b64encode(x).decode("ascii")}
    if t is fractions.Fraction:
        return {"q": [canonical(int(x.numerator), state, d), canonical(int(x.denominator), state, d)]}
    if t is decimal.Decimal:
        return {"D": decimal.Decimal.__str__(x)}
    if isinstance(x, collections.deque):  # an expected value may be one (`deque([1, 2])` != `[1, 2]`)
        return {"Q": [canonical(v, state, d) for v in collections.deque.__iter__(x)]}
    # Look-alikes: converted through the base types' own methods, then checked again.
    if isinstance(x, str):
        return canonical(str.__str__(x), state, d)
    if isinstance(x, int):
        return canonical(int.__index__(x), state, d)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, dict):
        return {"d": [[canonical(k, state, d), canonical(v, state, d)] for k, v in dict.items(x)]}
    if isinstance(x, tuple):
        return {"t": [canonical(v, state, d) for v in tuple.__iter__(x)]}
    if isinstance(x, list):
        return [canonical(v, state, d) for v in list.__iter__(x)]
    if isinstance(x, frozenset):
        return {"f": [canonical(v, state, d) for v in frozenset.__iter__(x)]}
    if isinstance(x, set):
        return {"s": [canonical(v, state, d) for v in set.__iter__(x)]}
    if isinstance(x, numbers.Integral):  # e.g. numpy.int64
        v = int(x)
        if type(v) is not int:
            raise Unshippable(f"int() of a {t.__name__} is not an int")
        return canonical(v, state, d)
    if isinstance(x, numbers.Real) and not isinstance(x, numbers.Rational):  # e.g. numpy.float64
        v = float(x)
        if type(v) is not float:
            raise Unshippable(f"float() of a {t.__name__} is not a float")
        return v
    raise Unshippable(f"a value of type {t.__module__}.{t.__qualname__} is not plain data")


def decode_value(j: object) -> object:
    """Rebuild a plain value from the untrusted tagged JSON `j` (parent side), within a budget: a value whose
    rebuilding or comparing would cost the parent more than a well-behaved answer could (too many elements, an
    int or a Fraction too large, set members or dict keys that share hash values) raises TooCostly."""
    return _decode(j, 0, [0])


def _decode(j: object, depth: int, budget: list[int]) -> object:
    if depth > MAX_VALUE_DEPTH + 2:
        raise WireError("value nested too deeply")
    t = type(j)
    budget[0] += 1 + (len(j) // 16 if t is str else 0)  # strings count by size, as in `canonical`
    if budget[0] > MAX_VALUE_NODES:
        raise TooCostly(f"more than {MAX_VALUE_NODES} elements (or 16 MB of text)")
    if j is None or t in (bool, int, float, str):
        return j
    d = depth + 1
    if t is list:
        return [_decode(v, d, budget) for v in j]
    if t is not dict or len(j) != 1:
        raise WireError(f"malformed value: {type(j).__name__}")
    ((tag, v),) = j.items()
    try:
        if tag in ("t", "s", "f", "Q"):
            items = [_decode(e, d, budget) for e in _as_list(v)]
            if tag in ("s", "f"):
                check_hashes(items)
            return {"t": tuple, "s": set, "f": frozenset, "Q": collections.deque}[tag](items)
        if tag == "d":
            pairs = [_decode_pair(kv, d, budget) for kv in _as_list(v)]
            check_hashes([k for k, _ in pairs])
            return dict(pairs)
        if tag == "i" and type(v) is str:
            return _decode_int(v)
        if tag == "c" and type(v) is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
            return complex(v[0], v[1])
        if tag == "b" and type(v) is str:
            budget[0] += len(v) // 16
            return base64.b64decode(v.encode("ascii"), validate=True)
        if tag == "q" and type(v) is list and len(v) == 2:
            return _decode_fraction(_decode(v[0], d, budget), _decode(v[1], d, budget))
        if tag == "D" and type(v) is str and len(v) < 10_000:
            return decimal.Decimal(v)
    except WireError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. an unhashable set element
        raise WireError(f"malformed {tag!r} value: {e}") from None
    raise WireError(f"malformed value tag {tag!r}")


def _decode_pair(kv: object, depth: int, budget: list[int]) -> tuple:
    if type(kv) is not list or len(kv) != 2:
        raise WireError("malformed dict item")
    return _decode(kv[0], depth, budget), _decode(kv[1], depth, budget)


def _decode_int(hex_digits: str) -> int:
    if len(hex_digits) * 4 > MAX_INT_BITS + 4:
        raise TooCostly(f"an int of more than {MAX_INT_BITS} bits")
    return int(hex_digits, 16)


def _decode_fraction(n: object, m: object) -> fractions.Fraction:
    if type(n) is not int or type(m) is not int or m == 0:
        raise WireError("malformed 'q' value")
    if max(n.bit_length(), m.bit_length()) > MAX_FRACTION_BITS:  # normalising it takes a gcd, quadratic
        raise TooCostly(f"a Fraction with a part of more than {MAX_FRACTION_BITS} bits")
    return fractions.Fraction(n, m)


def check_hashes(members: list) -> None:
    """Raise TooCostly if building a set or dict of `members` would take more than MAX_HASH_PROBES equality
    tests: distinct members whose hashes are equal (ints that differ by multiples of 2**61 - 1 do) share a
    probe chain, so n of them take n**2 / 2 tests (about an hour for a million). Equal members cost one test
    each, as in the set itself; the tests made here are those counted, so this check is bounded too."""
    chains: dict[int, list] = {}
    probes = 0
    for x in members:
        chain = chains.setdefault(hash(x), [])
        probes += len(chain)
        if probes > MAX_HASH_PROBES:
            raise TooCostly(f"set members or dict keys sharing hash values (over {MAX_HASH_PROBES} comparisons)")
        if x not in chain:
            chain.append(x)


def _as_list(v: object) -> list:
    if type(v) is not list:
        raise WireError("malformed container")
    return v
