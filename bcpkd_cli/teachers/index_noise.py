"""Uniform and normal noise that is a pure function of (seed, stream, example index, draw number).

A cache built in any batch layout, in any process, gets the same Monte Carlo draws for example i.
Counter-based: a 32-bit integer hash (lowbias32) feeds Box-Muller; no generator state.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32); products wrap modulo 2^64."""
    x = x ^ (x >> 16)  # a new tensor: the rest works in place on it (4x faster than fresh temporaries)
    x.mul_(0x7FEB352D).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_MASK)
    return x.bitwise_xor_(x >> 16)


def index_bits(seed: int, index: torch.Tensor, n_draws: int, stream: int = 0) -> torch.Tensor:
    """index [B] int64 -> uniform 32-bit integers [B, n_draws] (int64 in [0, 2^32)), reproducible per example.

    `stream` separates independent uses under one seed (e.g. a dropout layer and a sample number)."""
    row = hash32((index.long() + seed * 0x9E3779B9) & _MASK)  # [B]
    if stream:
        row = hash32(row ^ ((stream * 0x85EBCA6B) & _MASK))
    draws = torch.arange(n_draws, device=index.device, dtype=torch.long)
    return hash32(row[:, None] ^ draws)


def index_uniform(seed: int, index: torch.Tensor, n_draws: int, stream: int = 0) -> torch.Tensor:
    """index [B] int64 -> uniforms in (0, 1) [B, n_draws] (float64): (bits + 0.5) / 2^32."""
    return index_bits(seed, index, n_draws, stream).double().add_(0.5).div_(2.0**32)


def index_normal(seed: int, index: torch.Tensor, n_draws: int) -> torch.Tensor:
    """index [B] int64 -> standard normals [B, n_draws] (float64), reproducible per example (Box-Muller)."""
    uniforms = index_uniform(seed, index, 2 * n_draws)
    u1, u2 = uniforms[:, 0::2], uniforms[:, 1::2]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
