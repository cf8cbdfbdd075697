"""What a model call gives a worker: labels, where they are near-ties, and (on request) probabilities.

A *near-tie* is a pixel whose two highest logits are within ``NEAR_TIE`` of each other. Tiled and
whole-image inference agree on logits to float rounding (``LOGIT_TOLERANCE``), not bit for bit, so
exactly these pixels may be labelled differently by the two; every other label is identical. The
workers count them, and the run summary and the store report the count instead of hiding it.

Probabilities are stored as uint8: ``round(p * 254)``, 255 meaning nodata, like the mask. A quarter
of float32's bytes and half of float16's, they compress well, and a step of 1/254 is finer than
any segmentation network's calibration; ``pipeline.core.stats.decode_probability`` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.stats import PROBABILITY_SCALE

LOGIT_TOLERANCE = 1e-4  # tiled vs whole-image (or sliding-window) logits, float32 networks
NEAR_TIE = 2 * LOGIT_TOLERANCE  # both of the top two logits may move by the tolerance


@dataclass
class Prediction:
    """A batch's outputs, each with the batch axis first: ``labels`` (N, *spatial) uint8, ``ties``
    (N, *spatial) bool or None (models without logits), ``probabilities`` (N, classes, *spatial) uint8 or None."""

    labels: np.ndarray
    ties: np.ndarray | None = None
    probabilities: np.ndarray | None = None


def finish(logits: Any, *, probabilities: bool) -> Callable[[], Prediction]:
    """From a torch logits tensor ``(N, classes, ...)``, start computing a batch's outputs on its
    device; the callable waits for them on the host."""
    import torch

    top = logits.max(dim=1)  # max(1) == argmax, much faster on CPU
    labels = top.indices.to(torch.uint8)
    ties = (logits >= (top.values - NEAR_TIE).unsqueeze(1)).sum(dim=1) > 1
    probs = None
    if probabilities:
        probs = torch.softmax(logits.float(), dim=1).mul_(PROBABILITY_SCALE).round_().to(torch.uint8)

    def wait() -> Prediction:
        return Prediction(labels.cpu().numpy(), ties.cpu().numpy(), probs.cpu().numpy() if probs is not None else None)

    return wait
