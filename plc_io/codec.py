"""Modbus codec: tag values to and from registers and bits, and the read plan for a tag table.

The read plan coalesces tags per Modbus table into as few requests as the protocol allows
(125 registers, 2000 bits), reading across holes of up to `gap` addresses: one longer request
is cheaper than two round trips, but a huge hole might cross addresses the PLC refuses.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from plc_io.image import kind_error
from plc_io.tags import Encoding, ModbusTable, Tag, Value

MAX_REGISTERS = 125
MAX_BITS = 2000


class CodecError(ValueError):
    """A value cannot be encoded, or a reply cannot be decoded."""


@dataclass(frozen=True)
class Block:
    """One read request: a contiguous span of one Modbus table and the tags inside it."""

    table: ModbusTable
    start: int
    count: int
    tags: tuple[Tag, ...]

    @property
    def is_bits(self) -> bool:
        return self.table in (ModbusTable.COIL, ModbusTable.DISCRETE)


def plan_reads(
    tags: Iterable[Tag], gap_registers: int = 8, gap_bits: int = 32
) -> tuple[Block, ...]:
    """Group tags into the fewest requests per table, within the protocol's size limits."""
    by_table: dict[ModbusTable, list[Tag]] = {}
    for t in tags:
        by_table.setdefault(t.modbus.table, []).append(t)
    blocks: list[Block] = []
    for table in ModbusTable:  # a fixed order keeps the plan stable
        group = sorted(by_table.get(table, []), key=lambda t: t.modbus.address)
        bits = table in (ModbusTable.COIL, ModbusTable.DISCRETE)
        limit, gap = (MAX_BITS, gap_bits) if bits else (MAX_REGISTERS, gap_registers)
        cur: list[Tag] = []
        start = end = 0
        for t in group:
            a, w = t.modbus.address, t.modbus.width
            if cur and (a - end <= gap) and (max(end, a + w) - start <= limit):
                cur.append(t)
                end = max(end, a + w)
                continue
            if cur:
                blocks.append(Block(table, start, end - start, tuple(cur)))
            cur, start, end = [t], a, a + w
        if cur:
            blocks.append(Block(table, start, end - start, tuple(cur)))
    return tuple(blocks)


def _words_to_u32(words: Sequence[int], order: str) -> int:
    hi, lo = (words[0], words[1]) if order == "big" else (words[1], words[0])
    return ((hi & 0xFFFF) << 16) | (lo & 0xFFFF)


def _u32_to_words(u: int, order: str) -> list[int]:
    hi, lo = (u >> 16) & 0xFFFF, u & 0xFFFF
    return [hi, lo] if order == "big" else [lo, hi]


def decode(tag: Tag, raw: Sequence[int] | Sequence[bool]) -> Value:
    """Decode one tag from its registers (or its single bit)."""
    m = tag.modbus
    if len(raw) < m.width:
        raise CodecError(f"{tag.name}: got {len(raw)} registers, expected {m.width}")
    if m.encoding is Encoding.BIT:
        return bool(raw[0])
    if m.encoding is Encoding.FLOAT32:
        u = _words_to_u32([int(r) for r in raw], m.word_order)
        return float(struct.unpack(">f", struct.pack(">I", u))[0])
    if m.encoding is Encoding.INT32:
        u = _words_to_u32([int(r) for r in raw], m.word_order)
        n = u - (1 << 32) if u & 0x80000000 else u
    elif m.encoding is Encoding.INT16:
        r = int(raw[0]) & 0xFFFF
        n = r - 0x10000 if r & 0x8000 else r
    else:  # UINT16
        n = int(raw[0]) & 0xFFFF
    if tag.is_bool:
        # a flag in a register is 0 or 1; anything else is handed on as the integer it is,
        # and the kind check (plc_io.image.kind_error) makes it bad_reply, never True
        return n == 1 if n in (0, 1) else n
    return n * m.scale


def encode(tag: Tag, value: Value) -> list[int] | bool:
    """Encode one value as registers, or as a bit for coils and discrete inputs.

    Refuses NaN, values of the wrong kind (a float or NaN for a boolean, a boolean or a string
    for a number) and values the encoding cannot hold, rather than writing a coerced or wrapped
    number.
    """
    m = tag.modbus
    if (why := kind_error(tag, value)) is not None:
        raise CodecError(why)  # never bool(nan) = True on a coil, nor float(True) = 1.0
    if m.encoding is Encoding.BIT:
        return bool(value)
    v = float(value)
    if not math.isfinite(v):
        raise CodecError(f"{tag.name}: value {value!r} is not a finite number")
    if m.encoding is Encoding.FLOAT32:
        u = struct.unpack(">I", struct.pack(">f", v))[0]
        return _u32_to_words(u, m.word_order)
    n = round(v / m.scale)
    lo, hi = {
        Encoding.INT16: (-0x8000, 0x7FFF),
        Encoding.UINT16: (0, 0xFFFF),
        Encoding.INT32: (-0x80000000, 0x7FFFFFFF),
    }[m.encoding]
    if not lo <= n <= hi:
        raise CodecError(f"{tag.name}: value {value!r} does not fit {m.encoding.value}")
    if m.encoding is Encoding.INT32:
        return _u32_to_words(n & 0xFFFFFFFF, m.word_order)
    return [n & 0xFFFF]


def encode_or_none(tag: Tag, value: Value) -> list[int] | bool | None:
    """`encode`, or None for a value that cannot be encoded (a read-back of the wrong kind
    compares unequal to anything that was sent)."""
    try:
        return encode(tag, value)
    except CodecError:
        return None


def decode_block(block: Block, raw: Sequence[int] | Sequence[bool]) -> dict[str, Value]:
    """Decode every tag of a block from the reply. A short reply is a CodecError, never padded."""
    if len(raw) < block.count:
        raise CodecError(
            f"{block.table.value} {block.start}+{block.count}: reply has {len(raw)} values"
        )
    out: dict[str, Value] = {}
    for t in block.tags:
        off = t.modbus.address - block.start
        out[t.name] = decode(t, raw[off : off + t.modbus.width])
    return out
