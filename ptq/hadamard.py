"""Hadamard and random orthogonal matrices for rotating a network (QuaRot, Ashkboos et al. 2024, §2 and §4;
SpinQuant, Liu et al. 2024, §3), and the online Hadamard transform a rotated network keeps.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal. An orthogonal Q spreads a
vector's energy over all coordinates: a channel with an outlier becomes many moderate ones, which is what makes
4-bit per-token activations workable (QuaRot §3, "incoherence processing").

Orders come from three constructions, all computed here:

- Sylvester: H₁ = [1], H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]] — every power of two;
- Paley I (Paley 1933): for a prime q ≡ 3 (mod 4), order q + 1, from the Jacobsthal matrix Qᵢⱼ = χ(j − i) of the
  quadratic character χ mod q: H = I + [[0, 1ᵀ], [−1, Q]];
- Paley II: for a prime q ≡ 1 (mod 4), order 2(q + 1): the symmetric S = [[0, 1ᵀ], [1, Q]] with every 0 replaced by
  [[1, −1], [−1, −1]] and every ±1 by ±[[1, 1], [1, −1]];

and Kronecker products H_k ⊗ H_{2^m} with a Paley core k (``hadamard_order_factors`` picks the smallest core). This
covers every multiple of 4 up to 200 except 52, 92, 100, 116, 156, 172, 184 and 188 (whose known constructions need
prime-power fields or Williamson matrices), hence every hidden size of the form 64·k for k ≤ 32 (576 = 36·16 with
q = 17, 1536 = 12·128 with q = 11, 960 = 60·16, 3072 = 12·256, 5120 = 20·256, 11008 = 5504·2 with q = 5503).
For any other n, ``random_hadamard`` falls back to a random orthogonal matrix (Haar, from the QR decomposition of a
Gaussian matrix), and ``OnlineHadamard`` applies it as a dense n × n product.

Random Hadamard (QuaRot §4): Q = diag(s) H / √n with s a seeded random ±1 vector, still orthogonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def sylvester(order: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of a power-of-two ``order`` (float64 ±1)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"order={order}: Sylvester matrices exist for powers of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h


def is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def quadratic_character(q: int) -> torch.Tensor:
    """χ(a) for a = 0 … q − 1, q an odd prime: 0 at 0, +1 on the nonzero squares mod q, −1 elsewhere."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[torch.arange(1, q) ** 2 % q] = 1
    chi[0] = 0
    return chi


def jacobsthal(q: int) -> torch.Tensor:
    """Qᵢⱼ = χ(j − i) mod q: antisymmetric for q ≡ 3 (mod 4), symmetric for q ≡ 1 (mod 4)."""
    index = torch.arange(q)
    return quadratic_character(q)[(index[None, :] - index[:, None]) % q]


def _bordered(q: int, sign: float) -> torch.Tensor:
    """[[0, 1ᵀ], [sign·1, Q]] of order q + 1."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = sign
    s[1:, 1:] = jacobsthal(q)
    return s


def paley_i(order: int) -> torch.Tensor | None:
    """Paley's first construction, order q + 1 for a prime q ≡ 3 (mod 4); None when ``order`` is not of that form."""
    q = order - 1
    if q % 4 != 3 or not is_prime(q):
        return None
    return torch.eye(order, dtype=torch.float64) + _bordered(q, -1.0)


def paley_ii(order: int) -> torch.Tensor | None:
    """Paley's second construction, order 2(q + 1) for a prime q ≡ 1 (mod 4); None otherwise."""
    if order % 2:
        return None
    q = order // 2 - 1
    if q % 4 != 1 or not is_prime(q):
        return None
    s = _bordered(q, 1.0)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on_sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, on_sign) + torch.kron((s == 0).double(), on_zero)


def sylvester_core(order: int) -> torch.Tensor | None:
    return sylvester(order) if order in (1, 2) else None


CORES: tuple[Callable[[int], torch.Tensor | None], ...] = (sylvester_core, paley_i, paley_ii)
"""Constructions of a Hadamard matrix of one order (None where they do not apply); larger powers of two are
Kronecker factors, so a core of order 1 or 2 covers them."""


def hadamard_core(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of exactly ``order`` from one of ``CORES``, or None."""
    return next((h for build in CORES if (h := build(order)) is not None), None)


def hadamard_order_factors(n: int) -> tuple[int, int] | None:
    """(k, 2^m) with n = k · 2^m and a core of order k, k as small as possible; None when there is none."""
    power = 1
    candidates = []
    while n % power == 0:
        candidates.append((n // power, power))
        power *= 2
    for k, p in reversed(candidates):
        if hadamard_core(k) is not None:
            return k, p
    return None


def has_hadamard(n: int) -> bool:
    return hadamard_order_factors(n) is not None


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_k, H_p), float64 ±1, with H_n = H_k ⊗ H_p; ValueError when no construction covers n."""
    factors = hadamard_order_factors(n)
    if factors is None:
        raise ValueError(f"size {n}: no Hadamard construction here (Sylvester, Paley I/II times a power of two)")
    k, p = factors
    return hadamard_core(k), sylvester(p)


def hadamard(n: int) -> torch.Tensor:
    """The Hadamard matrix H_n = H_k ⊗ H_{2^m} (float64 ±1, H Hᵀ = n I)."""
    core, power = hadamard_factors(n)
    return torch.kron(core, power)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix: Q of the QR decomposition of a Gaussian matrix, columns' signs fixed by
    R's diagonal (Mezzadri 2007), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def normalized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """H_n / √n (deterministic; ``generator`` unused)."""
    return hadamard(n) / math.sqrt(n)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) H_n / √n with random signs s (QuaRot §4); a random orthogonal matrix when n has no Hadamard here."""
    if not has_hadamard(n):
        return random_orthogonal(n, generator)
    return random_signs(n, generator)[:, None] * hadamard(n) / math.sqrt(n)


ROTATIONS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "hadamard": normalized_hadamard,
    "random_hadamard": random_hadamard,
    "random_orthogonal": random_orthogonal,
}
"""Offline rotations by name: (size, generator) → a float64 orthogonal matrix."""


class OnlineHadamard(nn.Module):
    """x ↦ x · H_n / √n over the last dimension, at run time (QuaRot §4: before down_proj; on queries and keys).

    With H_n = H_k ⊗ H_p the product is two small ones: x viewed as [..., k, p] becomes H_kᵀ · X · H_p. The ±1
    factors are buffers (exact in every float dtype); the product runs in float32 or wider and returns x's dtype.
    A size with no Hadamard construction uses a seeded random orthogonal matrix instead (``left`` = Q in float64,
    ``right`` = [1], no scaling).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        self.n = n
        if has_hadamard(n):
            left, right = hadamard_factors(n)
            left, self.scale = left.float(), 1 / math.sqrt(n)
        else:
            left, right = random_orthogonal(n, torch.Generator().manual_seed(seed)), torch.ones(1, 1)
            self.scale = 1.0
        self.register_buffer("left", left)
        self.register_buffer("right", right.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        k, p = self.left.shape[0], self.right.shape[0]
        view = x.to(dtype).reshape(*x.shape[:-1], k, p)
        rotated = self.left.to(dtype).T @ (view @ self.right.to(dtype))
        return (rotated.reshape(x.shape) * self.scale).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """The n × n orthogonal matrix this module multiplies by (float64)."""
        return torch.kron(self.left.double(), self.right.double()) * self.scale

    def extra_repr(self) -> str:
        return f"{self.n} = {self.left.shape[0]}x{self.right.shape[0]}"
