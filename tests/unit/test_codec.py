"""Codec and read plan: every encoding round-trips, nothing wrong is ever sent or decoded."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plc_io.codec import (
    MAX_BITS,
    MAX_REGISTERS,
    CodecError,
    decode,
    decode_block,
    encode,
    plan_reads,
)
from plc_io.site import demo_site
from plc_io.tags import ModbusTable, Tag

ORDERS = st.sampled_from(["big", "little"])


def tag(
    name: str = "t",
    *,
    encoding: str = "int16",
    table: str = "input",
    address: int = 0,
    scale: float = 1.0,
    order: str = "big",
    type_: str = "float",
    rng: tuple[float, float] = (-1e12, 1e12),
) -> Tag:
    return Tag.model_validate(
        {
            "name": name,
            "direction": "input",
            "type": type_,
            "unit": "bool" if type_ == "bool" else "°C",
            "range": rng,
            "modbus": {
                "table": table,
                "address": address,
                "encoding": encoding,
                "scale": scale,
                "word_order": order,
            },
        }
    )


@given(st.integers(-0x8000, 0x7FFF), st.sampled_from([1.0, 0.1, 0.01, 0.001]))
def test_int16_round_trip(n: int, scale: float) -> None:
    t = tag(encoding="int16", scale=scale)
    regs = encode(t, n * scale)
    assert isinstance(regs, list) and len(regs) == 1 and 0 <= regs[0] <= 0xFFFF
    assert decode(t, regs) == pytest.approx(n * scale)
    assert encode(t, decode(t, regs)) == regs


@given(st.integers(0, 0xFFFF), st.sampled_from([1.0, 0.01]))
def test_uint16_round_trip(n: int, scale: float) -> None:
    t = tag(encoding="uint16", scale=scale)
    regs = encode(t, n * scale)
    assert regs == [n]
    assert decode(t, regs) == pytest.approx(n * scale)


@given(st.integers(-0x80000000, 0x7FFFFFFF), ORDERS, st.sampled_from([1.0, 0.1]))
def test_int32_round_trip_either_word_order(n: int, order: str, scale: float) -> None:
    t = tag(encoding="int32", scale=scale, order=order)
    regs = encode(t, n * scale)
    assert isinstance(regs, list) and len(regs) == 2
    hi, lo = (n & 0xFFFFFFFF) >> 16, n & 0xFFFF
    assert regs == ([hi, lo] if order == "big" else [lo, hi])
    assert decode(t, regs) == pytest.approx(n * scale)


@given(st.floats(allow_nan=False, allow_infinity=False, width=32), ORDERS)
def test_float32_round_trip_either_word_order(x: float, order: str) -> None:
    t = tag(encoding="float32", order=order)
    regs = encode(t, x)
    assert isinstance(regs, list) and len(regs) == 2
    u = struct.unpack(">I", struct.pack(">f", x))[0]
    assert regs == ([u >> 16, u & 0xFFFF] if order == "big" else [u & 0xFFFF, u >> 16])
    assert decode(t, regs) == x


@given(st.booleans(), st.sampled_from(["coil", "discrete"]))
def test_bit_round_trip(b: bool, table: str) -> None:
    t = tag(encoding="bit", table=table, type_="bool", rng=(0, 1))
    assert encode(t, b) is b
    assert decode(t, [b]) is b


@pytest.mark.parametrize("encoding", ["int16", "uint16", "int32", "float32"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_nan_and_infinity(encoding: str, bad: float) -> None:
    with pytest.raises(CodecError):
        encode(tag(encoding=encoding), bad)


@pytest.mark.parametrize(
    ("encoding", "scale", "value"),
    [
        ("int16", 0.01, 327.68),
        ("int16", 1.0, -32769),
        ("uint16", 1.0, -1),
        ("uint16", 0.01, 655.36),
        ("int32", 1.0, 2**31),
    ],
)
def test_encode_refuses_values_the_encoding_cannot_hold(
    encoding: str, scale: float, value: float
) -> None:
    with pytest.raises(CodecError, match="does not fit"):
        encode(tag(encoding=encoding, scale=scale), value)


def test_short_replies_raise_codec_error() -> None:
    with pytest.raises(CodecError):
        decode(tag(encoding="float32"), [0x4120])
    with pytest.raises(CodecError):
        decode(tag(encoding="int16"), [])
    site = demo_site()
    for block in plan_reads(site.tags):
        raw = [0] * (block.count - 1) if not block.is_bits else [False] * (block.count - 1)
        with pytest.raises(CodecError):
            decode_block(block, raw)


def test_demo_site_reads_in_four_requests_two_for_the_inputs() -> None:
    site = demo_site()
    plan = plan_reads(site.tags, site.plc.gap_registers, site.plc.gap_bits)
    assert [b.table for b in plan] == [
        ModbusTable.HOLDING,
        ModbusTable.INPUT,
        ModbusTable.COIL,
        ModbusTable.DISCRETE,
    ]
    inputs = plan_reads(site.inputs, site.plc.gap_registers, site.plc.gap_bits)
    assert len(inputs) == 2
    assert sum(len(b.tags) for b in inputs) == len(site.inputs)
    every = {t.name for b in plan for t in b.tags}
    assert every == {t.name for t in site.tags}


def test_a_130_register_span_splits_at_125() -> None:
    tags = [tag(f"t{i}", address=i) for i in range(130)]
    plan = plan_reads(tags)
    assert [(b.start, b.count) for b in plan] == [(0, MAX_REGISTERS), (125, 5)]
    # a two-register value is never cut in half across requests
    f = [tag(f"f{i}", encoding="float32", address=2 * i) for i in range(65)]
    assert all(b.count <= MAX_REGISTERS and b.count % 2 == 0 for b in plan_reads(f))


def test_a_bit_span_splits_at_2000() -> None:
    tags = [
        tag(f"b{i}", encoding="bit", table="coil", type_="bool", rng=(0, 1), address=i)
        for i in range(0, 2100, 10)
    ]
    plan = plan_reads(tags, gap_bits=32)
    assert all(b.count <= MAX_BITS for b in plan) and len(plan) == 2


@pytest.mark.parametrize(("gap", "requests"), [(0, 2), (8, 2), (9, 1), (20, 1)])
def test_gaps_beyond_the_threshold_split(gap: int, requests: int) -> None:
    # tags at 0 and 10 leave a hole of 9 registers (1 … 9): read across it only if gap >= 9
    tags = [tag("a", address=0), tag("b", address=10)]
    assert len(plan_reads(tags, gap_registers=gap)) == requests
    bits = [
        tag(n, encoding="bit", table="discrete", type_="bool", rng=(0, 1), address=a)
        for n, a in (("x", 0), ("y", 40))
    ]
    assert len(plan_reads(bits, gap_bits=32)) == 2
    assert len(plan_reads(bits, gap_bits=39)) == 1


def test_decode_block_places_every_tag_at_its_offset() -> None:
    a = tag("a", address=3, scale=0.01)
    b = tag("b", address=5, encoding="float32", order="little")
    (block,) = plan_reads([a, b])
    assert (block.start, block.count) == (3, 4)
    raw = [*encode(a, 12.34), 0, *encode(b, 1.5)]  # type: ignore[misc]
    assert decode_block(block, raw) == {"a": pytest.approx(12.34), "b": 1.5}


@pytest.mark.parametrize(
    ("type_", "encoding", "table", "value"),
    [
        ("bool", "bit", "coil", math.nan),  # bool(nan) is True: a pump started by a NaN
        ("bool", "bit", "coil", 0.0),
        ("bool", "bit", "coil", "false"),  # bool("false") is True
        ("bool", "uint16", "holding", math.nan),
        ("float", "uint16", "holding", True),  # float(True) is 1.0
        ("float", "float32", "holding", False),
        ("float", "int16", "holding", "12"),  # float("12") is 12.0
        ("float", "int16", "holding", None),
    ],
)
def test_encode_refuses_a_value_of_the_wrong_kind(
    type_: str, encoding: str, table: str, value: object
) -> None:
    t = tag(
        encoding=encoding, table=table, type_=type_, rng=(0, 1) if type_ == "bool" else (0, 100)
    )
    with pytest.raises(CodecError, match=r"t: got .*expected a (boolean|number)"):
        encode(t, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [2, 0xFFFF, 0x8000])
def test_a_flag_register_that_is_neither_0_nor_1_is_bad_reply(raw: int) -> None:
    from plc_io.image import Quality, judge

    t = tag(encoding="uint16", table="holding", type_="bool", rng=(0, 1))
    assert decode(t, [0]) is False and decode(t, [1]) is True
    value = decode(t, [raw])
    assert value is not True and value is not False  # handed on as the integer it is
    assert judge(t, value, 0.0).quality is Quality.BAD_REPLY
