"""dtype=: a value is stored only if it is the same value in the target type, checked against an
exact oracle (Python ints and fractions.Fraction) for random values and pairs of dtypes."""
import bisect
import struct
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import picomap as pm

try:
    import ml_dtypes
except ImportError:  # the property test then runs over numpy's own types
    ml_dtypes = None

INTS = [np.dtype(f"{sign}{size}") for size in (1, 2, 4, 8) for sign in "iu"]
FLOATS = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
COMPLEXES = [np.dtype(np.complex64), np.dtype(np.complex128)]
# (has NaN, has infinity) of the floats without IEEE's specials; numpy's floats and bfloat16 have both
ML_FLOATS = {} if ml_dtypes is None else {np.dtype(ml_dtypes.bfloat16): (True, True),
                                          np.dtype(ml_dtypes.float8_e4m3fn): (True, False),
                                          np.dtype(ml_dtypes.float4_e2m1fn): (False, False)}
NUMBERS = [np.dtype(bool), *INTS, *FLOATS, *COMPLEXES, *ML_FLOATS]
UNITS = {"D": 86400 * 10**18, "h": 3600 * 10**18, "m": 60 * 10**18, "s": 10**18, "ms": 10**15, "us": 10**12,
         "ns": 10**9, "ps": 10**6, "fs": 10**3, "as": 1}


# ---------------------------------------------------------------- the oracle

def exact(value, dtype):
    """A scalar's value, exactly: a Fraction, "nan", ("inf", sign), or for complex a (real, imag) pair."""
    if dtype.kind == "c":
        return exact(value.real, np.dtype(np.float64)), exact(value.imag, np.dtype(np.float64))
    if dtype.kind in "biu":
        return Fraction(int(value))
    x = float(value)  # every float here converts to a Python float exactly
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return ("inf", x > 0)
    return Fraction(x)


def grid(dtype):
    """Every finite non-negative value of a float type of at most 16 bits, sorted, as Fractions, and
    their bit patterns, plus the value one step past the largest (pattern None): overflow."""
    codes = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}")
    with np.errstate(all="ignore"):
        values = codes.view(dtype).astype(np.float64)
    keep = np.isfinite(values) & ~np.signbit(values)
    pairs = sorted(zip(values[keep].tolist(), codes[keep].tolist()))
    (top, _), (below, _) = pairs[-1], pairs[-2]
    pairs.append((top + (top - below), None))
    return [Fraction(v) for v, _ in pairs], [c for _, c in pairs]


GRIDS = {}


def rounded(x: Fraction, dtype):
    """x rounded to the nearest value of the float type dtype (ties to an even last bit), or None
    if that overflows (or would clip at the largest finite value)."""
    if dtype == np.float64:
        return Fraction(float(x))  # the sources hold nothing beyond float64
    if dtype in (np.float16, np.float32):
        code = "<" + "ef"[dtype == np.float32]
        try:  # Python packs with IEEE rounding and raises on overflow
            return Fraction(struct.unpack(code, struct.pack(code, float(x)))[0])
        except OverflowError:
            return None
    if dtype not in GRIDS:
        GRIDS[dtype] = grid(dtype)
    values, codes = GRIDS[dtype]
    sign, magnitude = (-1 if x < 0 else 1), abs(x)
    k = bisect.bisect_left(values, magnitude)
    if k == len(values):
        return None
    if values[k] == magnitude or k == 0:
        pick = k
    else:
        a, b = values[k - 1], values[k]
        if magnitude - a != b - magnitude:
            pick = k - 1 if magnitude - a < b - magnitude else k
        else:
            pick = k - 1 if codes[k - 1] % 2 == 0 else k
    return None if codes[pick] is None else sign * values[pick]


def expected_real(value, target):
    """What a real value must become in a real target: a Fraction, "nan", ("inf", sign), or None (refused)."""
    if target.kind in "biu":
        if not isinstance(value, Fraction) or value.denominator != 1:
            return None
        low, high = (0, 1) if target.kind == "b" else (int(np.iinfo(target).min), int(np.iinfo(target).max))
        return value if low <= value <= high else None
    has_nan, has_inf = ML_FLOATS.get(target, (True, True))
    if value == "nan":
        return "nan" if has_nan else None
    if isinstance(value, tuple):
        return value if has_inf else None
    return rounded(value, target)


def expected(value, source, target):
    """What value (of dtype source) must be stored as, in target; None if it must be refused."""
    value = exact(value, source)
    if target.kind == "c":
        part = np.empty(0, target).real.dtype
        real, imag = value if source.kind == "c" else (value, Fraction(0))
        pair = expected_real(real, part), expected_real(imag, part)
        return None if None in pair else pair
    if source.kind == "c":
        real, imag = value
        if imag != 0:  # "nan" and infinities are not zero either
            return None
        value = real
    return expected_real(value, target)


def same(stored, want):
    return want == "nan" and stored == "nan" or stored == want


# ---------------------------------------------------------------- random values, random pairs

def values_of(dtype):
    """Values of dtype: every bit pattern, and the edges where conversions go wrong."""
    if dtype.kind == "b":
        return st.lists(st.booleans(), min_size=1, max_size=8).map(lambda v: np.array(v, bool))
    raw = st.binary(min_size=dtype.itemsize, max_size=8 * dtype.itemsize).map(
        lambda b: np.frombuffer(b[:len(b) - len(b) % dtype.itemsize], dtype).copy())
    edges = [0, 1, -1, 2, 0.5, -0.5, 1.5, 6.0, 6.5, 7.0, 100.0, 448.0, 464.0, 465.0, 65504.0, 65519.0, 65520.0,
             3.4028235e38, 1e39, 2.0**31, 2.0**32, 2.0**63, 2.0**64, -2.0**63, float("nan"), float("inf"),
             float("-inf"), 1e-30]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        numbers = st.one_of(st.integers(int(info.min), int(info.max)),
                            st.sampled_from([int(info.min), int(info.max), 0, -1 % (int(info.max) + 1), 127, 128,
                                             255, 256, 2**15, 2**31, 2**32 - 1, 2**63 - 1]).filter(
                                lambda v: info.min <= v <= info.max))
        return st.one_of(raw, st.lists(numbers, min_size=1, max_size=8).map(lambda v: np.array(v, dtype)))

    def cast(values):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.array(values, np.complex128 if dtype.kind == "c" else np.float64).astype(dtype)
    floats = st.one_of(st.sampled_from(edges), st.sampled_from(edges).map(lambda v: -v),
                       st.floats(allow_nan=True, allow_infinity=True))
    number = st.builds(complex, floats, floats) if dtype.kind == "c" else floats
    return st.one_of(raw, st.lists(number, min_size=1, max_size=8).map(cast))


@st.composite
def conversions(draw):
    source, target = draw(st.sampled_from(NUMBERS)), draw(st.sampled_from(NUMBERS))
    return draw(values_of(source)), target


@settings(max_examples=500, deadline=None)
@given(conversion=conversions())
def test_a_conversion_stores_each_value_unchanged_or_refuses_it(conversion):
    arr, target = conversion
    wants = [expected(v, arr.dtype, target) for v in arr]
    try:
        out = pm._converted(3, arr, target)
    except ValueError as e:
        assert None in wants, f"{arr.dtype} {arr.tolist()} -> {target} refused ({e}) but every value fits: {wants}"
        assert str(e).startswith("item 3: the value ") and str(target) in str(e)
        return
    assert None not in wants, f"{arr.dtype} {arr} -> {target} stored {out}, but expected {wants}"
    assert out.dtype == target and out.shape == arr.shape
    for got, want in zip(out, wants):
        got = exact(got, target)
        if target.kind == "c":
            assert same(got[0], want[0]) and same(got[1], want[1]), (arr, target, out, wants)
        else:
            assert same(got, want), (arr, target, out, wants)


@settings(max_examples=300, deadline=None)
@given(unit=st.sampled_from(list(UNITS)), to_unit=st.sampled_from(list(UNITS)), kind=st.sampled_from("Mm"),
       ticks=st.lists(st.one_of(st.integers(-2**63 + 1, 2**63 - 1), st.integers(-10**6, 10**6),
                                st.just(-2**63)), min_size=1, max_size=6))
def test_a_time_converts_exactly_or_is_refused(unit, to_unit, kind, ticks):
    arr = np.array(ticks, np.int64).view(f"{kind}8[{unit}]")
    target = np.dtype(f"{kind}8[{to_unit}]")
    wants = []
    for t in ticks:  # NaT (the lowest int64) stays NaT; others exactly, within int64 less NaT
        if t == -2**63:
            wants.append(-2**63)
            continue
        value = Fraction(t * UNITS[unit], UNITS[to_unit])
        wants.append(int(value) if value.denominator == 1 and abs(value) <= 2**63 - 1 else None)
    try:
        out = pm._converted(0, arr, target)
    except ValueError:
        assert None in wants
        return
    assert None not in wants and out.dtype == target and out.view(np.int64).tolist() == wants


# ---------------------------------------------------------------- the cases, one by one

@pytest.mark.parametrize("item, dtype, shown", [
    (np.array([5, -1], np.int32), np.uint32, "-1"),
    (np.array([-1]), np.uint64, "-1"),
    (np.array([2**63], np.uint64), np.int64, "9223372036854775808"),
    (np.array([2**64 - 1], np.uint64), np.int64, "18446744073709551615"),
    (np.array([3, -1], np.int8), np.uint8, "-1"),
    (np.array([1 + 2j], np.complex128), np.float32, "(1+2j)"),
    (np.array([1 - 0.5j], np.complex128), np.float64, "(1-0.5j)"),
    (np.array([complex(0, np.nan)], np.complex128), np.int32, "nanj"),
    (np.array(["2000-01-01", "2300-01-01"], "M8[D]"), "M8[ns]", "2300-01-01"),
    (np.array(["2300"], "M8[Y]"), "M8[ns]", "2300"),
    (np.array(["2000-01-01T00:00:01"], "M8[s]"), "M8[D]", "2000-01-01T00:00:01"),
    (np.array([1.5], np.float64), np.int64, "1.5"),
    (np.array([2.0**63], np.float64), np.int64, "9.223372036854776e+18"),
    (np.array([70000], np.int64), np.float16, "70000"),
])
def test_dtype_refuses_a_value_that_would_change_naming_the_item_and_value(in_tmp, item, dtype, shown):
    with pytest.raises(ValueError) as caught:
        pm.build_map([np.zeros(1, item.dtype), item], "toy", progress=False, dtype=dtype)
    assert str(caught.value).startswith("item 1: the value ") and shown in str(caught.value)
    assert "never wraps" in str(caught.value)


def test_dtype_refuses_saturating_and_losing_specials_in_ml_dtypes_floats(in_tmp):
    ml = pytest.importorskip("ml_dtypes")
    for value, dtype in [(100.0, ml.float4_e2m1fn), (7.0, ml.float4_e2m1fn), (np.nan, ml.float4_e2m1fn),
                         (np.inf, ml.float4_e2m1fn), (100.0, ml.float6_e2m3fn), (1e3, ml.float6_e3m2fn),
                         (465.0, ml.float8_e4m3fn), (np.inf, ml.float8_e4m3fn)]:
        with pytest.raises(ValueError, match=r"item 0: the value .* does not fit"):
            pm.build_map([np.array([1.0, value])], "toy", progress=False, dtype=dtype)
    # what rounds to the largest finite value is kept, rounded: 6.9 to 6, 464 (a tie, to even) to 448
    pm.build_map([np.array([6.9, -0.2]), np.array([np.nan, 464.0])], "ok", progress=False,
                 dtype={"x": ml.float8_e4m3fn}["x"])
    load, _ = pm.get_loader_fn("ok")
    assert load(0).astype(float).tolist() == [7.0, -0.203125] and load(1).astype(float)[1] == 448.0
    assert np.isnan(load(1).astype(float)[0])


def test_dtype_converts_what_keeps_its_value(in_tmp):
    items = [np.array(["NaT", "2000-01-01"], "M8[D]"), np.array(["2262-04-11"], "M8[D]")]
    pm.build_map(items, "times", progress=False, dtype="M8[ns]")
    load, _ = pm.get_loader_fn("times")
    assert load(0).astype("M8[D]").tolist() == items[0].tolist() and np.isnat(load(0)[0])
    assert pm.build_map([np.array([1 + 0j, -2.5 - 0j])], "re", progress=False, dtype=np.float32)["count"] == 1
    assert pm.get_loader_fn("re")[0](0).tolist() == [1.0, -2.5]
    big_endian = np.array(["2000-01-02", "NaT"], ">M8[D]")
    pm.build_map([big_endian], "be", progress=False, dtype=">M8[s]")
    assert pm.get_loader_fn("be")[0](0).astype("M8[D]").tolist() == big_endian.tolist()
    with pytest.raises(ValueError, match="item 0: the value .*2300-01-01"):
        pm.build_map([np.array(["2300-01-01"], ">M8[D]")], "be2", progress=False, dtype="<M8[ns]")
    pm.build_map([np.array([2**63 - 1], np.uint64), np.array([True])], "i64", progress=False, dtype=np.int64)
    assert pm.get_loader_fn("i64")[0](0).tolist() == [2**63 - 1]


@pytest.mark.parametrize("item, dtype, words", [
    (np.array([1, 2]), "U5", "int64 values cannot become <U5"),
    (np.array(["2000-01-01"], "M8[D]"), np.int64, "cannot become int64"),
    (np.array([1], "m8[Y]"), "m8[D]", "no exact length in days"),
    (np.array([(1, 2)], [("a", "i4"), ("b", "i4")]), [("b", "i4"), ("a", "i4")], "same field names"),
])
def test_dtype_refuses_conversions_between_kinds_of_value(in_tmp, item, dtype, words):
    with pytest.raises(ValueError, match="item 0: ") as caught:
        pm.build_map([item], "toy", progress=False, dtype=dtype)
    assert words in str(caught.value)


def test_records_convert_field_by_field(in_tmp):
    items = [np.array([(1, 2.5)], [("a", "i4"), ("b", "f8")])]
    pm.build_map(items, "ok", progress=False, dtype=[("a", "u1"), ("b", "f4")])
    assert pm.get_loader_fn("ok")[0](0).tolist() == [(1, 2.5)]
    with pytest.raises(ValueError, match=r"item 0: the value .*-1, 2\.5.* does not fit"):
        pm.build_map([np.array([(-1, 2.5)], items[0].dtype)], "bad", progress=False,
                     dtype=[("a", "u1"), ("b", "f4")])
