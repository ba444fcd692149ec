"""Every source of randomness cmkit uses, and the one rule deriving seeds from keys.

- :func:`derive_seed` turns keys (the run seed, a stream name, a step, an epoch) into a 63-bit seed: the
  only way cmkit derives one seed from another, so nearby keys give unrelated streams.
- :class:`BatchNoise` (training: rows of a global batch, the same at any world size) and
  :class:`GlobalNoise` (torch's global generators) share the :data:`RowNoise` interface that losses take.
- :class:`SeededNoise` (sampling and editing: one generator per image seed) is a :data:`NoiseSource`, the
  zero-argument callable samplers take.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NoiseSource = Callable[[], Tensor]  # a fresh standard-normal batch [N, C, H, W] on each call


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed hashed from ``keys`` (e.g. the run seed, a stream name, the step), unrelated for near keys."""
    digest = hashlib.sha256(":".join(map(str, ("cmkit", *keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchNoise:
    """Random numbers for rows ``[start, start + n)`` of a global batch of ``total`` samples.

    Each draw generates values for all ``total`` rows from generators seeded with ``seed`` (one per device,
    created on first use) and returns this process's rows, so sample i gets the same numbers however the
    batch is split over processes and micro-batches, provided every split makes the same sequence of draws.
    """

    def __init__(self, seed: int, *, start: int, total: int) -> None:
        if not 0 <= start < total:
            raise ValueError(f"BatchNoise: start {start} outside a batch of {total}")
        self.seed, self.start, self.total = seed, start, total
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _rows(self, values: Tensor, n: int) -> Tensor:
        if self.start + n > self.total:
            raise ValueError(f"BatchNoise: rows {self.start}..{self.start + n} outside a batch of {self.total}")
        return values[self.start:self.start + n]

    def randn(self, n: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Standard normal float32 [n, *shape]."""
        return self._rows(torch.randn((self.total, *shape), generator=self._generator(device), device=device), n)

    def rand(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform [0, 1) float32 [n]."""
        return self._rows(torch.rand(self.total, generator=self._generator(device), device=device), n)

    def randint(self, high: int, n: int) -> Tensor:
        """Uniform integers in [0, high), int64 [n] on the CPU."""
        return self._rows(torch.randint(0, high, (self.total,), generator=self._generator("cpu")), n)

    def multinomial(self, probs: Tensor, n: int) -> Tensor:
        """Indices drawn with replacement from the CPU weights ``probs`` [K], int64 [n] on the CPU."""
        return self._rows(torch.multinomial(probs, self.total, replacement=True, generator=self._generator("cpu")),
                          n)


class GlobalNoise:
    """The :class:`BatchNoise` interface drawing ``n`` rows from torch's global generators (a whole batch)."""

    def randn(self, n: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.randn((n, *shape), device=device)

    def rand(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.rand(n, device=device)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,))

    def multinomial(self, probs: Tensor, n: int) -> Tensor:
        return torch.multinomial(probs, n, replacement=True)


RowNoise = BatchNoise | GlobalNoise


class SeededNoise:
    """Noise for a batch of seeds: sample i always draws from its own generator seeded with seeds[i].

    So a seed identifies an image whatever the batch size or the batch it falls in. Call it for the next
    standard-normal batch [N, *shape], float32 on ``device``.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device

    def labels(self, num_classes: int) -> Tensor:
        """One class label per seed, int64 [N], drawn from each seed's generator (call before any noise)."""
        picks = [torch.randint(num_classes, (1,), generator=g) for g in self.generators]
        return torch.cat(picks).to(self.device)

    def __call__(self) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)
