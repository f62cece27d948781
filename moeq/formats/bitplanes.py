"""Bit-planes of unsigned b-bit codes, most significant first: the layout of nested precisions.

Plane k (k = 0 .. b-1) of a b-bit code c is its bit ``b - 1 - k``: plane 0 is the MSB. The top r planes of b-bit
codes are the r-bit codes ``c >> (b - r)``, so an r-bit model is a PREFIX of the planes (``join_planes`` of the
first r planes) and reading it touches r/b of the code bytes.

One plane of a row of ``n`` codes is ``ceil(n / 8)`` bytes, one bit a code, in input order: bit ``i % 8`` of byte
``i // 8`` (least significant bit first; the kernel's 1-bit "bits plane" order, ``moeq.kernels.lut``); the pad bits
of the last byte are zero. Example, one row of 8 inputs with 3-bit codes [5, 0, 7, 1, 2, 3, 6, 4]::

  code (binary)   101 000 111 001 010 011 110 100
  plane0 (MSB)    1   0   1   0   0   0   1   1    -> bits of inputs 7..0: 1100 0101 = 0xC5
  plane1          0   0   1   0   1   1   1   0    -> 0111 0100 = 0x74
  plane2 (LSB)    1   0   1   1   0   1   0   0    -> 0010 1101 = 0x2D

and the 2-bit prefix (plane0, plane1) decodes to [2, 0, 3, 0, 1, 1, 3, 2] = codes >> 1.
"""

from __future__ import annotations

import torch


def plane_bytes(n: int) -> int:
    """Bytes of one packed plane row of ``n`` codes."""
    return -(-n // 8)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n] of 0/1 -> uint8 [rows, ceil(n/8)], bit i % 8 of byte i // 8 (layout above)."""
    rows, n = b.shape
    g = plane_bytes(n)
    v = torch.nn.functional.pad(b, (0, 8 * g - n)).view(rows, g, 8)
    out = v[..., 0].clone()
    for k in range(1, 8):
        out |= v[..., k] << k
    return out


def unpack_bits(p: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [rows, ceil(n/8)] -> uint8 [rows, n] of 0/1 (the pad bits dropped)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=p.device)
    return ((p[..., None] >> shifts) & 1).view(p.shape[0], -1)[:, :n]


def split_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 [rows, n] codes < 2^bits -> ``bits`` packed planes, MSB first."""
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be 2-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits!r}")
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    return [pack_bits((codes >> (bits - 1 - k)) & 1) for k in range(bits)]


def join_planes(planes: list[torch.Tensor], n: int) -> torch.Tensor:
    """The first r packed planes (MSB first) -> uint8 [rows, n] r-bit codes."""
    r = len(planes)
    codes = unpack_bits(planes[0], n).clone()
    for k in range(1, r):
        codes <<= 1
        codes |= unpack_bits(planes[k], n)
    return codes


def pad_bits_clear(p: torch.Tensor, n: int) -> bool:
    """Whether the pad bits (inputs n .. 8*ceil(n/8) - 1) of a packed plane are all zero."""
    if n % 8 == 0 or p.shape[-1] == 0:
        return True
    return not bool((p[:, -1] >> (n % 8)).any())
