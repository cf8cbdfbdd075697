"""``raymask model check``: measure, on the network itself, what tiling it allows.

Two measurements on random inputs (the network's own input space: after raymask's scale and
normalisation), in float32 on the CPU:

- **Translation equivariance at the stride**: the output of a window shifted by the stride must be
  the shifted output, away from the borders. Plain convolutions, pooling, upsampling and BatchNorm
  in eval mode pass; InstanceNorm (statistics of the whole input), attention over the whole input
  and global pooling fail, and no halo makes their tiles equal the whole image: they need blending.
- **Effective receptive radius**: one input pixel is changed, and the farthest output pixel that
  changes is found (Chebyshev distance), over several positions (every alignment to the stride)
  and seeds; the largest is the radius. A change that reaches the window's border means "global".

The suggested halo is the radius rounded up to the stride plus one stride of margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CheckResult:
    equivariant: bool
    shift_error: float  # the largest |difference| between the shifted output and the output of the shift
    receptive_radius: int | None  # None: global (a change reaches the window's border)
    window: int
    trials: int
    suggested_halo: int | None
    stitch: str  # "exact" or "blend"

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        if not self.equivariant:
            return (
                f"not translation-equivariant (shifted output differs by up to {self.shift_error:.3g}): "
                "no halo makes tiles equal the whole image; stitch: blend"
            )
        if self.receptive_radius is None:
            return f"translation-equivariant, but one pixel changes outputs {self.window // 2}+ px away: stitch: blend"
        return (
            f"translation-equivariant; receptive radius {self.receptive_radius} px (measured); "
            f"halo {self.suggested_halo} makes tiles exact; stitch: exact"
        )


def check_network(
    network: Network, *, bands: int, dims: int = 2, stride: int = 1, window: int | None = None, seeds: int = 2,
    positions: int = 4,
) -> CheckResult:  # fmt: skip
    side = window or (128 if dims == 2 else 40)
    side = math.ceil(side / stride) * stride
    shape = (1, bands) + (side,) * dims
    with torch.inference_mode():
        error = _shift_error(network, shape, stride)
        scale = 1.0
        radius: int | None = 0
        trials = 0
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
            base = network(x)
            scale = max(scale, float(base.abs().max()))
            for _ in range(positions):
                centre = tuple(int(c) for c in rng.integers(side // 2 - stride, side // 2 + stride, size=dims))
                reach = _reach(network, x, base, centre)
                trials += 1
                if reach is None or reach >= side // 2 - stride:
                    radius = None
                    break
                radius = max(radius or 0, reach)
            if radius is None:
                break
    equivariant = error <= 1e-4 * max(1.0, scale)
    halo = None if radius is None else math.ceil(radius / stride) * stride + stride
    stitch = "exact" if equivariant and radius is not None else "blend"
    return CheckResult(equivariant, error, radius, side, trials, halo if stitch == "exact" else None, stitch)


def _shift_error(network: Network, shape: tuple[int, ...], stride: int) -> float:
    """max |f(x)[shifted] - f(shifted x)| in the central region (a quarter of the window from each border)."""
    dims = len(shape) - 2
    side = shape[-1]
    big = torch.from_numpy(np.random.default_rng(7).normal(size=shape[:2] + (side + stride,) * dims).astype(np.float32))
    plain = network(big[_spatial(0, side, dims)])
    shifted = network(big[_spatial(stride, side + stride, dims)])
    margin = side // 4
    a = plain[_spatial(margin + stride, side - margin, dims)]
    b = shifted[_spatial(margin, side - margin - stride, dims)]
    return float((a - b).abs().max())


def _spatial(start: int, stop: int, dims: int) -> tuple[Any, ...]:
    """``[..., start:stop, start:stop(, start:stop)]``: the same range on every spatial axis."""
    return (Ellipsis, *[slice(start, stop)] * dims)


def _reach(network: Network, x: torch.Tensor, base: torch.Tensor, centre: tuple[int, ...]) -> int | None:
    """How far (Chebyshev, in pixels) the output changes when the input pixel at ``centre`` changes."""
    changed = x.clone()
    index: tuple[Any, ...] = (0, slice(None), *centre)
    changed[index] += 5.0
    diff = (network(changed) - base).abs().amax(dim=(0, 1))
    tolerance = 1e-6 * max(1.0, float(base.abs().max()))
    hits = torch.nonzero(diff > tolerance)
    if hits.numel() == 0:
        return 0
    return int((hits - torch.tensor(centre)).abs().amax())
