"""Tests for `schemas.codec`: the sensor decoders (fast path and pydantic) and the encoders.

The key property: for any payload, the fast path (orjson + numpy) and the pydantic contract give
the same verdict, and the same array when both accept. The fast path must never accept a payload
the contract rejects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.codec import (
    DecodedSamples,
    DecodedWindow,
    InputRejectedError,
    _fast_samples,
    _fast_window,
    decode_binary_window,
    decode_samples,
    decode_window,
    encode,
    encode_dict,
    is_binary_window,
)
from schemas.limits import (
    BINARY_CONTENT_TYPE,
    BINARY_WINDOW_BYTES,
    CHANNELS,
    FLOAT32_MAX,
    LATENT_DIM,
    MAX_SAMPLES_BYTES,
    MAX_SAMPLES_PER_MESSAGE,
    MAX_WINDOW_BYTES,
    MOTIF_COUNT,
    WINDOW_LENGTH,
)
from schemas.messages import ErrorKind, ModelRef, MotifResult, SamplesMessage, WindowMessage

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------------------------
# Payload building: JSON text with control over raw tokens (NaN, 1e400, huge ints) and layout.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A token written verbatim into the JSON text (e.g. `NaN`, `1e400`)."""

    token: str


def to_json(obj: Any, layout: str = "compact") -> bytes:
    """Serialise `obj` to JSON bytes; `Raw` values are spliced in as bare tokens."""
    raws: list[str] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.token)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    tree = walk(obj)
    if layout == "compact":
        text = json.dumps(tree, separators=(",", ":"))
    elif layout == "spaced":
        text = json.dumps(tree)
    else:
        text = "\n  " + json.dumps(tree, indent=1) + "\n"
    for index, token in enumerate(raws):
        text = text.replace(f'"@@RAW{index}@@"', token, 1)
    return text.encode()


def rows_of(n: int, seed: int = 0, style: str = "floats") -> list[list[Any]]:
    """`n` rows of 9 JSON numbers in one of several styles."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 20.0, size=(n, CHANNELS))
    if style == "floats":
        return base.tolist()
    if style == "short":  # what most sensors send: a few decimals
        return np.round(base, 3).tolist()
    if style == "float32":  # float32 values printed in full
        return base.astype(np.float32).astype(np.float64).tolist()
    if style == "ints":
        return rng.integers(-4096, 4096, size=(n, CHANNELS)).tolist()
    if style == "mixed":
        ints = rng.integers(-100, 100, size=(n, CHANNELS))
        pick = rng.random((n, CHANNELS)) < 0.5
        return [
            [int(ints[r, c]) if pick[r, c] else float(base[r, c]) for c in range(CHANNELS)]
            for r in range(n)
        ]
    if style == "extreme":  # huge and tiny but in range; -0.0; subnormals
        scale = 10.0 ** rng.integers(-60, 38, size=(n, CHANNELS))
        values = np.clip(base * scale, -FLOAT32_MAX, FLOAT32_MAX)
        values[0, 0] = -0.0
        values[-1, -1] = 5e-324
        return values.tolist()
    raise AssertionError(style)


STYLES = ("floats", "short", "float32", "ints", "mixed", "extreme")


def as_f32(rows: list[list[Any]]) -> np.ndarray:
    """What the contract says a row list decodes to: each value as a Python float, then float32."""
    return np.asarray([[float(v) for v in row] for row in rows], dtype=np.float64).astype(
        np.float32
    )


def window_payload(rows: list[list[Any]] | None = None, **fields: Any) -> bytes:
    return to_json({"x": rows_of(WINDOW_LENGTH) if rows is None else rows, **fields})


def rejection(payload: bytes, decoder: Any = decode_window) -> InputRejectedError:
    with pytest.raises(InputRejectedError) as info:
        decoder(payload)
    assert info.value.reason == str(info.value)
    assert info.value.reason.strip()
    return info.value


# ---------------------------------------------------------------------------------------------
# decode_window: accepted inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_decode_window_valid_styles(style: str) -> None:
    rows = rows_of(WINDOW_LENGTH, seed=7, style=style)
    decoded = decode_window(window_payload(rows))
    assert isinstance(decoded, DecodedWindow)
    assert decoded.x.shape == (WINDOW_LENGTH, CHANNELS)
    assert decoded.x.dtype == np.float32
    np.testing.assert_array_equal(decoded.x, as_f32(rows))
    assert decoded.seq is None
    assert decoded.t0 is None


def test_decode_window_ints_and_floats_mixed_in_one_row() -> None:
    rows = [[1, 2.5, -3, 0, 0.0, 7, -8.25, 9, 1e-3] for _ in range(WINDOW_LENGTH)]
    decoded = decode_window(window_payload(rows))
    np.testing.assert_array_equal(decoded.x, np.asarray(rows, dtype=np.float32))


def test_decode_window_optional_seq_and_t0() -> None:
    decoded = decode_window(window_payload(seq=42, t0=1_700_000_000.25))
    assert decoded.seq == 42
    assert decoded.t0 == 1_700_000_000.25
    assert isinstance(decoded.t0, float)
    decoded = decode_window(window_payload(seq=0, t0=0))
    assert decoded.seq == 0
    assert decoded.t0 == 0.0
    assert isinstance(decoded.t0, float)
    assert decode_window(window_payload(seq=2**63 - 1)).seq == 2**63 - 1


def test_decode_window_ignores_unknown_fields() -> None:
    rows = rows_of(WINDOW_LENGTH, seed=3)
    for extra in (
        {"sensor": "wrist-left", "unit": "m/s2", "flags": [True, False, None]},  # has u/f
        {"k": {"nested": [1, 2, {"a": "b"}]}, "gain": 2.5},
        {"ids": [1, 2, 3], "name": "abc"},  # no u/f: the fast path judges it
    ):
        decoded = decode_window(window_payload(rows, seq=1, **extra))
        np.testing.assert_array_equal(decoded.x, as_f32(rows))
        assert decoded.seq == 1


def test_decode_window_accepts_float32_extremes_and_whitespace() -> None:
    rows = rows_of(WINDOW_LENGTH, seed=1)
    rows[0][0] = FLOAT32_MAX
    rows[0][1] = -FLOAT32_MAX
    rows[0][2] = 1e-45
    rows[0][3] = -0.0
    payload = b"\n\t " + to_json({"x": rows, "t0": 5}, layout="indented") + b" \r\n"
    decoded = decode_window(payload)
    np.testing.assert_array_equal(decoded.x, as_f32(rows))
    assert np.isfinite(decoded.x).all()
    assert decoded.t0 == 5.0


# ---------------------------------------------------------------------------------------------
# decode_window: rejected inputs, each with its kind and a reason a person can act on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"",
        b"{",
        b'{"x": [[1, 2, 3',
        window_payload()[:-1],  # truncated: closing brace missing
        window_payload()[: len(window_payload()) // 2],
        b'{"x": [[1,2,3,4,5,6,7,8,9]],}',  # trailing comma
        b"{'x': []}",  # single quotes
        b"\xff\xfe{}",
    ],
)
def test_decode_window_malformed(payload: bytes) -> None:
    error = rejection(payload)
    assert error.kind is ErrorKind.MALFORMED
    assert "not valid JSON" in error.reason


@pytest.mark.parametrize("payload", [b"[1, 2]", b"[]", b"5", b'"x"', b"null", b"true"])
def test_decode_window_top_level_non_object(payload: bytes) -> None:
    # Valid JSON of the wrong type: the schema is broken, so INVALID, and the reason says an
    # object was expected.
    error = rejection(payload)
    assert error.kind is ErrorKind.INVALID
    assert "object" in error.reason


@pytest.mark.parametrize(
    ("count", "expected"), [(99, ["99", "100"]), (101, ["101", "100"]), (0, ["0", "100"])]
)
def test_decode_window_wrong_row_count(count: int, expected: list[str]) -> None:
    error = rejection(window_payload(rows_of(count)))
    assert error.kind is ErrorKind.INVALID
    assert "rows" in error.reason
    for word in expected:
        assert word in error.reason


@pytest.mark.parametrize("length", [8, 10, 0, 1])
def test_decode_window_ragged_row(length: int) -> None:
    rows = rows_of(WINDOW_LENGTH)
    rows[3] = list(range(length))
    error = rejection(window_payload(rows))
    assert error.kind is ErrorKind.INVALID
    assert "row 3" in error.reason
    assert f"{length} values" in error.reason
    assert "9" in error.reason


@pytest.mark.parametrize("bad", ["1.5", "abc", True, False, None, [1], {"v": 1}])
def test_decode_window_non_number_in_rows(bad: Any) -> None:
    rows = rows_of(WINDOW_LENGTH)
    rows[3][4] = bad
    error = rejection(window_payload(rows))
    assert error.kind is ErrorKind.INVALID
    assert "x[3][4]" in error.reason


def test_decode_window_counts_further_problems() -> None:
    rows = rows_of(WINDOW_LENGTH)
    rows[3][4] = "a"
    rows[7][2] = True
    rows[8][1] = None
    error = rejection(window_payload(rows))
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith("x[3][4]")
    assert "2 more problems" in error.reason


@pytest.mark.parametrize(
    "payload",
    [
        orjson.dumps({"y": rows_of(WINDOW_LENGTH)}),
        b"{}",
        orjson.dumps({"seq": 1}),
    ],
)
def test_decode_window_missing_x(payload: bytes) -> None:
    error = rejection(payload)
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith("x")
    assert "required" in error.reason


@pytest.mark.parametrize("x", [5, "abc", {}, [1.0] * 900, [[[1.0] * 9] * 100]])
def test_decode_window_x_of_wrong_shape(x: Any) -> None:
    error = rejection(orjson.dumps({"x": x}))
    assert error.kind is ErrorKind.INVALID
    assert "x" in error.reason


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": False}, "seq"),
        ({"seq": "5"}, "seq"),
        ({"seq": 1.0}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"seq": 2**63}, "seq"),
        ({"seq": [1]}, "seq"),
        ({"t0": -1}, "t0"),
        ({"t0": -0.5}, "t0"),
        ({"t0": "yesterday"}, "t0"),
        ({"t0": [0]}, "t0"),
    ],
)
def test_decode_window_bad_seq_or_t0(fields: dict[str, Any], field: str) -> None:
    error = rejection(window_payload(**fields))
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith(f"{field}:")


@pytest.mark.parametrize(
    "token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400]
)
def test_decode_window_non_finite_tokens(token: str) -> None:
    rows: list[list[Any]] = rows_of(WINDOW_LENGTH)
    rows[3][5] = Raw(token)
    error = rejection(to_json({"x": rows}))
    assert error.kind is ErrorKind.NON_FINITE
    assert "x[3][5]" in error.reason
    assert "finite" in error.reason


def test_decode_window_non_finite_wins_over_other_problems() -> None:
    rows: list[list[Any]] = rows_of(WINDOW_LENGTH)
    rows[1][0] = "text"
    rows[6][2] = Raw("NaN")
    error = rejection(to_json({"x": rows}))
    assert error.kind is ErrorKind.NON_FINITE
    assert "x[6][2]" in error.reason


@pytest.mark.parametrize("value", [1e39, -1e39, 3.5e38, 1e300, -1.7976931348623157e308, 10**39])
def test_decode_window_beyond_float32_range(value: float) -> None:
    rows = rows_of(WINDOW_LENGTH)
    rows[2][7] = value
    error = rejection(window_payload(rows))
    assert error.kind is ErrorKind.INVALID
    assert "x[2][7]" in error.reason


def test_decode_window_oversized() -> None:
    payload = window_payload(pad="0" * MAX_WINDOW_BYTES)
    assert len(payload) > MAX_WINDOW_BYTES
    error = rejection(payload)
    assert error.kind is ErrorKind.OVERSIZED
    assert str(len(payload)) in error.reason
    assert str(MAX_WINDOW_BYTES) in error.reason
    # Oversize is judged before parsing: even garbage is OVERSIZED, not MALFORMED.
    assert rejection(b"\x00" * (MAX_WINDOW_BYTES + 1)).kind is ErrorKind.OVERSIZED


def test_decode_window_exactly_at_the_limit_is_parsed() -> None:
    payload = window_payload()
    payload = payload[:-1] + b',"pad":"' + b"0" * (MAX_WINDOW_BYTES - len(payload) - 9) + b'"}'
    assert len(payload) == MAX_WINDOW_BYTES
    assert decode_window(payload).x.shape == (WINDOW_LENGTH, CHANNELS)


# --- Disagreements between the fast path and the contract (bugs; see the report) -------------
# These assert agreement only, not which verdict is right, so they pass whichever side is fixed.


def verdict(decoder: Any, payload: bytes) -> str | np.ndarray:
    """The decoded array, or the error kind."""
    try:
        decoded = decoder(payload)
    except InputRejectedError as exc:
        return str(exc.kind)
    return decoded.x if isinstance(decoded, DecodedWindow) else decoded.samples


def contract_verdict(model: Any, payload: bytes) -> str | np.ndarray:
    try:
        message = model.model_validate_json(payload)
    except ValidationError:
        return "rejected"
    return np.asarray(message.x if model is WindowMessage else message.samples, np.float32)


BEYOND_F32 = [3.4028235e38, -3.4028235e38, float(np.nextafter(FLOAT32_MAX, 1e39))]


@pytest.mark.parametrize("value", BEYOND_F32)
def test_window_values_just_beyond_float32_max_get_one_verdict(value: float) -> None:
    # `3.4028235e+38` is how float32 max is usually printed, yet as a double it is above
    # FLOAT32_MAX, so WindowMessage rejects it (le=FLOAT32_MAX). The fast path casts to float32
    # first, which rounds it to the finite max, and accepts it. So the verdict depends on whether
    # an unrelated extra field happens to contain a 'u' or an 'f'.
    rows = rows_of(WINDOW_LENGTH)
    rows[0][0] = value
    plain = window_payload(rows)
    with_unit = window_payload(rows, unit="g")  # the 'u' sends it down the pydantic path
    contract = contract_verdict(WindowMessage, plain)
    fast = _fast_window(plain)
    assert fast is None or not isinstance(contract, str), "fast path accepts, contract rejects"
    a, b = verdict(decode_window, plain), verdict(decode_window, with_unit)
    assert type(a) is type(b)
    if isinstance(a, str):
        assert a == b
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", BEYOND_F32)
def test_samples_values_just_beyond_float32_max_get_one_verdict(value: float) -> None:
    rows = rows_of(4)
    rows[2][8] = value
    plain = orjson.dumps({"seq": 0, "samples": rows})
    with_unit = orjson.dumps({"seq": 0, "samples": rows, "unit": "g"})
    contract = contract_verdict(SamplesMessage, plain)
    assert _fast_samples(plain) is None or not isinstance(contract, str)
    assert type(verdict(decode_samples, plain)) is type(verdict(decode_samples, with_unit))


@pytest.mark.parametrize("big", [2**60 + 2**36 + 1, 2**62 + 2**38 + 1, -(2**60 + 2**36 + 1)])
def test_large_integers_round_like_the_contract(big: int) -> None:
    # All-integer rows: numpy casts int64 straight to float32 while the contract goes through a
    # Python float (float64) first; for 2**60 + 2**36 + 1 the two roundings differ by 2**37.
    rows = [[big] * CHANNELS for _ in range(WINDOW_LENGTH)]
    payload = window_payload(rows)
    np.testing.assert_array_equal(
        verdict(decode_window, payload), contract_verdict(WindowMessage, payload)
    )
    payload = orjson.dumps({"seq": 0, "samples": rows[:3]})
    np.testing.assert_array_equal(
        verdict(decode_samples, payload), contract_verdict(SamplesMessage, payload)
    )


@pytest.mark.parametrize("depth", [199, 201, 250, 1000])
def test_deeply_nested_extra_field_gets_one_verdict(depth: int) -> None:
    # pydantic's JSON parser stops at ~200 levels of nesting (json_invalid: recursion limit);
    # orjson allows 1024. An ignored extra field nested 201-1023 deep is MALFORMED for the
    # contract but accepted by the fast path.
    nested = b"[" * depth + b"]" * depth
    payload = window_payload()[:-1] + b',"e":' + nested + b"}"
    contract = contract_verdict(WindowMessage, payload)
    assert _fast_window(payload) is None or not isinstance(contract, str)
    payload = b'{"seq":0,"samples":[[1,2,3,4,5,6,7,8,9]],"e":' + nested + b"}"
    contract = contract_verdict(SamplesMessage, payload)
    assert _fast_samples(payload) is None or not isinstance(contract, str)


# ---------------------------------------------------------------------------------------------
# THE property: fast path and contract agree
# ---------------------------------------------------------------------------------------------

BIG_NUMBERS: list[Any] = [
    FLOAT32_MAX,
    -FLOAT32_MAX,
    3.4028235e38,
    -3.4028235e38,
    float(np.nextafter(FLOAT32_MAX, 1e39)),
    3.5e38,
    1e39,
    -1e39,
    1e300,
    1.7976931348623157e308,
    2**53 + 1,
    2**60 + 2**36 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64,
    10**39,
    -(10**39),
    5e-324,
    1e-45,
    -0.0,
]
NON_FINITE_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400]
WEIRD_VALUES: list[Any] = ["1.5", "", "abc", True, False, None, [], [1.0], {}, {"v": 1}]
NO_UF_TEXT = st.text(alphabet="abcdeghijklmnopqrstvwxyz0123456789_-", min_size=1, max_size=6)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([-1, 0, 2**63 - 1, 2**63, 1.0, 0.0, -0.0, 1e308, "5", "abc", [], {}]),
    st.sampled_from([Raw(t) for t in NON_FINITE_TOKENS]),
)
NUMBER = st.one_of(
    st.sampled_from(BIG_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.integers(-(2**64), 2**64),
)


MUTATIONS = (
    "rows",
    "ragged",
    "weird",
    "number",
    "token",
    "fields",
    "extra",
    "drop",
    "nested",
    "not_object",
    "truncate",
    "shape",
)
NOT_A_ROW: list[Any] = [5, 1.5, {}, [[1.0]] * CHANNELS, [[1.0] * CHANNELS], [], "row"]


def _mutate_rows(draw: st.DrawFn, rows: list[Any], mutation: str) -> list[Any]:
    """Rows with one change: a new count, a ragged row, a row that is none, or one cell replaced."""
    if mutation == "rows":
        new_count = draw(st.sampled_from([0, 1, 99, 100, 101, 999, 1000, 1001]))
        repeated = (rows * (new_count // max(len(rows), 1) + 1))[:new_count]
        return [list(r) if isinstance(r, list) else r for r in repeated]
    if not rows:
        return rows
    index = draw(st.integers(0, len(rows) - 1))
    if mutation in ("shape", "ragged"):
        if mutation == "shape":  # one row that is not a row of numbers
            rows[index] = draw(st.sampled_from(NOT_A_ROW))
        elif isinstance(rows[index], list):
            rows[index] = (list(rows[index]) * 3)[: draw(st.sampled_from([0, 1, 8, 10, 18]))]
        return rows
    if not isinstance(rows[index], list) or not rows[index]:  # no row (an earlier "shape")
        return rows
    column = draw(st.integers(0, len(rows[index]) - 1))
    if mutation == "weird":
        rows[index][column] = draw(st.sampled_from(WEIRD_VALUES))
    elif mutation == "number":
        rows[index][column] = draw(NUMBER)
    else:
        rows[index][column] = Raw(draw(st.sampled_from(NON_FINITE_TOKENS)))
    return rows


def _mutate_fields(draw: st.DrawFn, message: dict[str, Any], field: str, mutation: str) -> None:
    """One change to the fields around the rows: wrong types, unknown keys, a missing key."""
    if mutation == "fields":
        message[draw(st.sampled_from(["seq", "t0", "rate_hz"]))] = draw(FIELD_VALUE)
    elif mutation == "extra":
        key = draw(st.one_of(NO_UF_TEXT, st.text(max_size=6)))
        if key not in (field, "seq", "t0", "rate_hz"):
            message[key] = draw(JSON_VALUE)
    elif mutation == "drop":
        message.pop(draw(st.sampled_from([field, "seq", "t0", "rate_hz"])), None)
    elif mutation == "nested":  # an ignored field nested deeper than some parsers allow
        nested: Any = []
        for _ in range(draw(st.sampled_from([1, 50, 190, 199, 200, 201, 250, 600])) - 1):
            nested = [nested]
        message["deep"] = nested


@st.composite
def payloads(draw: st.DrawFn, field: str, extra_fields: dict[str, Any]) -> bytes:
    """A `field`-rows message (valid, or with up to three mutations) as JSON bytes."""
    count = WINDOW_LENGTH if field == "x" else draw(st.integers(1, 120))
    rows = rows_of(count, seed=draw(st.integers(0, 2**16)), style=draw(st.sampled_from(STYLES)))
    message: dict[str, Any] = {field: rows, **extra_fields}
    truncate = False
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "not_object":
            return to_json(draw(st.sampled_from([rows, [message], 5, "x", None, True])))
        if mutation == "truncate":
            truncate = True
        elif mutation in ("rows", "ragged", "weird", "number", "token", "shape"):
            if isinstance(message.get(field), list):
                message[field] = _mutate_rows(draw, message[field], mutation)
        else:
            _mutate_fields(draw, message, field, mutation)
    payload = to_json(message, layout=draw(st.sampled_from(["compact", "spaced", "indented"])))
    if truncate:
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    return payload


def _check_agreement(payload: bytes, decode: Any, fast: Any, model: Any, field: str) -> None:
    limit = MAX_WINDOW_BYTES if field == "x" else MAX_SAMPLES_BYTES
    if len(payload) > limit:
        assert rejection(payload, decode).kind is ErrorKind.OVERSIZED
        return
    try:
        message = model.model_validate_json(payload)
    except ValidationError as exc:
        # Safety: the fast path never accepts what the contract rejects ...
        assert fast(payload) is None, "fast path accepted a payload the contract rejects"
        # ... and the public decoder rejects it with a kind that matches the contract's reason.
        error = rejection(payload, decode)
        types = {e["type"] for e in exc.errors()}
        if "json_invalid" in types:
            assert error.kind is ErrorKind.MALFORMED
        elif "finite_number" in types:
            assert error.kind is ErrorKind.NON_FINITE
        else:
            assert error.kind is ErrorKind.INVALID
        return
    decoded = decode(payload)
    expected = np.asarray(getattr(message, field), dtype=np.float32)
    got = decoded.x if field == "x" else decoded.samples
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert decoded.seq == message.seq
    assert type(decoded.seq) is type(message.seq)
    assert decoded.t0 == message.t0
    if field == "samples":
        assert decoded.rate_hz == message.rate_hz
    shortcut = fast(payload)
    if shortcut is not None:
        np.testing.assert_array_equal(shortcut.x if field == "x" else shortcut.samples, expected)


@PROPERTY
@given(
    payload=payloads(
        "x",
        {"seq": 12, "t0": 1_700_000_000.5},
    )
    | payloads("x", {})
)
@example(payload=window_payload(seq=1, t0=2))
@example(payload=window_payload(rows_of(WINDOW_LENGTH, style="ints")))
@example(payload=window_payload([[3.4028235e38] * CHANNELS] * WINDOW_LENGTH))
@example(payload=window_payload([[2**60 + 2**36 + 1] * CHANNELS] * WINDOW_LENGTH))
@example(payload=window_payload()[:-1] + b',"e":' + b"[" * 250 + b"]" * 250 + b"}")
@example(payload=window_payload([["1.5"] * CHANNELS] * WINDOW_LENGTH))  # numbers as strings
@example(payload=window_payload([[[1.0]] * CHANNELS] * WINDOW_LENGTH))  # 100 x 9 x 1
@example(payload=window_payload([*rows_of(WINDOW_LENGTH - 1), 7]))  # a number for a row
@example(payload=window_payload([*rows_of(WINDOW_LENGTH - 1), [{}] * CHANNELS]))
@example(payload=b'{"x":' + to_json(rows_of(WINDOW_LENGTH)) + b',"x":[]}')  # repeated key
@example(payload=window_payload([[10**400] * CHANNELS] * WINDOW_LENGTH))  # beyond a double
def test_window_fast_path_agrees_with_contract(payload: bytes) -> None:
    _check_agreement(payload, decode_window, _fast_window, WindowMessage, "x")


@PROPERTY
@given(
    payload=payloads("samples", {"seq": 0})
    | payloads("samples", {"seq": 7, "t0": 3.5, "rate_hz": 100})
)
@example(payload=orjson.dumps({"seq": 0, "samples": rows_of(MAX_SAMPLES_PER_MESSAGE)}))
@example(payload=orjson.dumps({"seq": 0, "samples": [[-3.4028235e38] * CHANNELS]}))
@example(payload=orjson.dumps({"seq": 0, "samples": [[1e39] * CHANNELS]}))
@example(payload=b'{"seq":0,"samples":[["1",2,3,4,5,6,7,8,9]]}')
def test_samples_fast_path_agrees_with_contract(payload: bytes) -> None:
    _check_agreement(payload, decode_samples, _fast_samples, SamplesMessage, "samples")


# ---------------------------------------------------------------------------------------------
# Binary frames
# ---------------------------------------------------------------------------------------------


def frame(seed: int = 0) -> tuple[np.ndarray, bytes]:
    x = np.random.default_rng(seed).normal(0, 50, (WINDOW_LENGTH, CHANNELS)).astype(np.float32)
    return x, x.astype("<f4").tobytes(order="C")


def test_binary_frame_size_constant() -> None:
    assert BINARY_WINDOW_BYTES == 3600


def test_is_binary_window_content_type_decides() -> None:
    _, body = frame()
    json_body = window_payload()
    assert is_binary_window(body, BINARY_CONTENT_TYPE)
    assert is_binary_window(json_body, BINARY_CONTENT_TYPE)  # declared binary: it is binary
    assert is_binary_window(b"{" + body[1:], BINARY_CONTENT_TYPE)
    assert not is_binary_window(body, "application/json")
    assert not is_binary_window(body, "text/plain")


def test_is_binary_window_without_content_type() -> None:
    _, body = frame()
    assert body[:1] != b"{"
    assert is_binary_window(body, None)
    assert is_binary_window(body, "")  # an empty content type counts as absent
    assert is_binary_window(b"\x00" * BINARY_WINDOW_BYTES, None)
    assert not is_binary_window(b"{" + body[1:], None)  # JSON always starts with '{'
    assert not is_binary_window(body[:-1], None)
    assert not is_binary_window(body + b"\x00", None)
    assert not is_binary_window(window_payload(), None)
    assert not is_binary_window(b"", None)


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_decode_binary_window_round_trip(seed: int) -> None:
    x, body = frame(seed)
    decoded = decode_binary_window(body)
    assert decoded.x.dtype == np.float32
    assert decoded.x.shape == (WINDOW_LENGTH, CHANNELS)
    np.testing.assert_array_equal(decoded.x, x)
    assert decoded.x[2, 3] == np.frombuffer(body, "<f4")[2 * CHANNELS + 3]  # row-major
    assert decoded.seq is None
    assert decoded.t0 is None
    decoded.x[0, 0] = 1.0  # a private, writable copy


def test_decode_binary_window_is_little_endian() -> None:
    x = np.zeros((WINDOW_LENGTH, CHANNELS), dtype=np.float32)
    x[1, 2] = 1.5
    assert np.array_equal(decode_binary_window(x.astype("<f4").tobytes()).x, x)
    big_endian = x.astype(">f4").tobytes()
    assert decode_binary_window(big_endian).x[1, 2] != 1.5


@pytest.mark.parametrize("size", [0, 1, 3599, 3601, 7200, 3596])
def test_decode_binary_window_wrong_size(size: int) -> None:
    error = rejection(b"\x01" * size, decode_binary_window)
    assert error.kind is ErrorKind.MALFORMED
    assert str(size) in error.reason
    assert "3600" in error.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("row", "channel"), [(0, 0), (57, 4), (99, 8)])
def test_decode_binary_window_non_finite(bad: float, row: int, channel: int) -> None:
    x, _ = frame()
    x[row, channel] = bad
    error = rejection(x.astype("<f4").tobytes(), decode_binary_window)
    assert error.kind is ErrorKind.NON_FINITE
    assert f"row {row}" in error.reason
    assert f"channel {channel}" in error.reason


def test_decode_binary_window_names_the_first_non_finite_value() -> None:
    x, _ = frame()
    x[80, 1] = np.nan
    x[12, 7] = np.inf
    error = rejection(x.astype("<f4").tobytes(), decode_binary_window)
    assert "row 12, channel 7" in error.reason


# ---------------------------------------------------------------------------------------------
# decode_samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 37, 100, 999, MAX_SAMPLES_PER_MESSAGE])
@pytest.mark.parametrize("style", ["short", "mixed"])
def test_decode_samples_valid_runs(count: int, style: str) -> None:
    rows = rows_of(count, seed=count, style=style)
    decoded = decode_samples(orjson.dumps({"seq": 5, "samples": rows}))
    assert isinstance(decoded, DecodedSamples)
    assert decoded.samples.dtype == np.float32
    assert decoded.samples.shape == (count, CHANNELS)
    np.testing.assert_array_equal(decoded.samples, as_f32(rows))
    assert decoded.seq == 5
    assert decoded.t0 is None
    assert decoded.rate_hz is None


@pytest.mark.parametrize("rate", [0.001, 1, 100, 100.5, 9999.99, 10_000, 10_000.0])
def test_decode_samples_rate_in_bounds(rate: float) -> None:
    payload = orjson.dumps({"seq": 0, "t0": 12, "rate_hz": rate, "samples": rows_of(3)})
    decoded = decode_samples(payload)
    assert decoded.rate_hz == float(rate)
    assert isinstance(decoded.rate_hz, float)
    assert decoded.t0 == 12.0


@pytest.mark.parametrize("rate", [0, 0.0, -0.0, -1, -100.5, 10_000.001, 1e6, "fast"])
def test_decode_samples_rate_out_of_bounds(rate: Any) -> None:
    error = rejection(
        orjson.dumps({"seq": 0, "rate_hz": rate, "samples": rows_of(3)}), decode_samples
    )
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith("rate_hz:")


def test_decode_samples_rate_non_finite() -> None:
    error = rejection(
        to_json({"seq": 0, "rate_hz": Raw("NaN"), "samples": rows_of(3)}), decode_samples
    )
    assert error.kind is ErrorKind.NON_FINITE
    assert "rate_hz" in error.reason


def test_decode_samples_too_many_rows() -> None:
    rows = rows_of(MAX_SAMPLES_PER_MESSAGE + 1, style="ints")
    payload = orjson.dumps({"seq": 0, "samples": rows})
    assert len(payload) <= MAX_SAMPLES_BYTES
    error = rejection(payload, decode_samples)
    assert error.kind is ErrorKind.INVALID
    assert "samples" in error.reason
    assert str(MAX_SAMPLES_PER_MESSAGE) in error.reason


def test_decode_samples_empty() -> None:
    error = rejection(orjson.dumps({"seq": 0, "samples": []}), decode_samples)
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith("samples:")


@pytest.mark.parametrize("fields", [{}, {"seq": None}, {"seq": -1}, {"seq": True}, {"seq": "1"}])
def test_decode_samples_seq_required(fields: dict[str, Any]) -> None:
    error = rejection(orjson.dumps({**fields, "samples": rows_of(3)}), decode_samples)
    assert error.kind is ErrorKind.INVALID
    assert error.reason.startswith("seq:")


def test_decode_samples_ragged_and_bad_values() -> None:
    rows: list[list[Any]] = rows_of(10)
    rows[4] = rows[4][:8]
    error = rejection(orjson.dumps({"seq": 0, "samples": rows}), decode_samples)
    assert error.kind is ErrorKind.INVALID
    assert "samples row 4 has 8 values" in error.reason
    rows = rows_of(10)
    rows[2][1] = Raw("Infinity")
    error = rejection(to_json({"seq": 0, "samples": rows}), decode_samples)
    assert error.kind is ErrorKind.NON_FINITE
    assert "samples[2][1]" in error.reason


def test_decode_samples_oversized_and_malformed() -> None:
    payload = orjson.dumps({"seq": 0, "samples": rows_of(3), "pad": "0" * MAX_SAMPLES_BYTES})
    error = rejection(payload, decode_samples)
    assert error.kind is ErrorKind.OVERSIZED
    assert str(MAX_SAMPLES_BYTES) in error.reason
    assert rejection(b'{"seq": 0, "samples": [[', decode_samples).kind is ErrorKind.MALFORMED
    assert rejection(b"[]", decode_samples).kind is ErrorKind.INVALID


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def result_dict(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=MOTIF_COUNT)
    scores = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
    return {
        "schema_version": 1,
        "sensor_id": "sensor-01",
        "node_id": "node-a",
        "seq": 17,
        "t0": 1_700_000_000.0,
        "t1": 1_700_000_000.99,
        "model": {"name": "tcn-vae", "version": "1.4.0"},
        "latent": rng.normal(size=LATENT_DIM).astype(np.float32),
        "motif_scores": scores,
        "top_motif": np.int64(np.argmax(scores)),
        "latency_ms": np.float32(3.25),
        "ts": 1_700_000_001.5,
    }


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_encode_dict_numpy_result_is_a_valid_motif_result(seed: int) -> None:
    payload = result_dict(seed)
    body = encode_dict(payload)
    assert b"\n" not in body  # one line, readable in mosquitto_sub
    result = MotifResult.model_validate_json(body)
    np.testing.assert_allclose(result.latent, payload["latent"].astype(np.float64), rtol=1e-6)
    assert result.top_motif == int(payload["top_motif"])
    assert result.seq == 17
    assert result.model == ModelRef(name="tcn-vae", version="1.4.0")
    assert math.isclose(sum(result.motif_scores), 1.0, abs_tol=1e-3)
    # And the model encoder round-trips it.
    assert MotifResult.model_validate_json(encode(result)) == result


def test_encode_dict_plain_values() -> None:
    assert orjson.loads(encode_dict({"a": np.arange(3, dtype=np.int32), "b": None})) == {
        "a": [0, 1, 2],
        "b": None,
    }
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert orjson.loads(encode_dict({"m": matrix})) == {"m": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}


def test_encode_is_compact_json_of_the_model() -> None:
    result = MotifResult.model_validate_json(encode_dict(result_dict(3)))
    body = encode(result)
    assert body.startswith(b"{")
    assert b" " not in body
    decoded = orjson.loads(body)
    assert decoded["schema_version"] == 1
    assert set(decoded) == set(MotifResult.model_fields)
