"""Bit packing of unsigned b-bit codes (b = 1..8) into bytes, one layout for every width, driven by one table.

Layout of one row of ``n`` codes, ``G = ceil(n / 8)``, packed into ``8 * G * b / 8 = G * b`` bytes:

  1. The row is padded with zero codes to ``8 * G`` and cut into 8 *code planes* of ``G`` consecutive codes:
     plane j = codes[j*G : (j+1)*G].
  2. Column i of the planes, the 8 codes (plane0[i], ..., plane7[i]), forms one little-endian bit string of
     ``8 * b`` bits: code j occupies bits [b*j, b*j + b).
  3. Its byte k (k = 0..b-1) is stored at ``packed[row, k*G + i]``: the packed row is ``b`` *byte planes* of
     ``G`` bytes each.

Examples (b = 4): packed[r, i] = plane0[i] | plane1[i] << 4 (the low nibble is the earlier plane), so
``0x76`` holds codes 6 (plane 0) and 7 (plane 1). b = 3, one column of planes [1, 2, 3, 4, 5, 6, 7, 0]:
  bit string (bit 0 on the right)  000 111 110 101 100 011 010 001
  bytes, byte 0 first              11 010 001 | 0 101 100 0 | 000 111 11   = 0xD1, 0x58, 0x1F
A code straddles at most two bytes (b <= 8), so unpacking code j is ``(byte_k >> s) | (byte_k+1 << (8 - s))``
masked to b bits. Plane-major order keeps every operation a contiguous [rows, G] slice: unpacking a 4096x4096
4-bit matrix is one pass of 8 shifts/masks over contiguous memory, no gathers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Slot(NamedTuple):
    """Where code plane j lives in the ``b`` byte planes: its low bits in byte ``byte`` from bit ``shift`` up;
    ``spill``: its top bits continue in byte ``byte + 1`` (from bit 0)."""

    byte: int
    shift: int
    spill: bool


def _slots(bits: int) -> tuple[Slot, ...]:
    return tuple(Slot((bits * j) // 8, (bits * j) % 8, (bits * j) % 8 + bits > 8) for j in range(8))


# THE table: bit width -> the 8 slots of a group of 8 codes in its b bytes
LAYOUT: dict[int, tuple[Slot, ...]] = {b: _slots(b) for b in range(1, 9)}


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes."""
    return -(-n // 8) * bits


def _layout(bits: int) -> tuple[Slot, ...]:
    try:
        return LAYOUT[bits]
    except KeyError:
        raise ValueError(f"bits must be 1..8, got {bits!r}") from None


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [rows, n], every value < 2**bits -> uint8 [rows, ceil(n/8) * bits] (layout above)."""
    slots = _layout(bits)
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be 2-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    rows, n = codes.shape
    g = -(-n // 8)
    planes = torch.nn.functional.pad(codes, (0, 8 * g - n)).view(rows, 8, g)
    out = torch.zeros(bits, rows, g, dtype=torch.uint8, device=codes.device)  # byte planes first: contiguous ORs
    for j, s in enumerate(slots):
        out[s.byte] |= planes[:, j] << s.shift          # low part; bits above 8 fall off (uint8)
        if s.spill:
            out[s.byte + 1] |= planes[:, j] >> (8 - s.shift)
    return out.transpose(0, 1).reshape(rows, bits * g)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [rows, ceil(n/8) * bits] -> codes uint8 [rows, n] (a view of a padded buffer when n % 8 != 0)."""
    slots = _layout(bits)
    rows = packed.shape[0]
    g = -(-n // 8)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, bits * g):
        raise ValueError(f"packed must be uint8 [rows, {bits * g}], got {packed.dtype} {tuple(packed.shape)}")
    src = packed.view(rows, bits, g)
    out = torch.empty(rows, 8, g, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for j, s in enumerate(slots):
        v = src[:, s.byte] >> s.shift if s.shift else src[:, s.byte]
        if s.spill:
            v = v | (src[:, s.byte + 1] << (8 - s.shift))  # only the low bits survive the mask
        if bits == 8:
            out[:, j] = v
        else:
            torch.bitwise_and(v, mask, out=out[:, j])
    out = out.view(rows, 8 * g)
    return out if n == 8 * g else out[:, :n]
