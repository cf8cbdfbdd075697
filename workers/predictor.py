"""The predict stage: an actor that loads its model once and labels batches of read windows.

Rows arrive from the read stage with the padded read window (``image``, ``valid``) and where the
unit's core sits inside it; rows leave with the core's labels only (nodata where the source is).
Windows of equal shape are stacked into one model call; edge windows are smaller and go alone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from pipeline.config import ModelConfig
from pipeline.stats import NODATA
from pipeline.stream import describe
from workers.models.registry import Segmenter, build


class Predictor:
    def __init__(self, model: ModelConfig, *, threads: int = 1, device: str = "auto", isolate: bool = False) -> None:
        self.isolate = isolate  # batch runs: a failing batch marks its rows instead of stopping the run
        if device == "auto":
            device = _default_device()
        _limit_threads(threads)
        self.model: Segmenter = build(model, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["unit"])
        errors = [str(e) for e in batch["error"]]
        labels: list[np.ndarray] = [np.zeros((0,) * np.ndim(batch["valid"][i]), dtype=np.uint8) for i in range(n)]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in range(n):
            if not errors[i]:
                groups[tuple(batch["image"][i].shape)].append(i)
        for members in groups.values():
            images = np.stack([batch["image"][i] for i in members])
            valid = np.stack([batch["valid"][i] for i in members])
            try:
                predicted = self.model.predict(images, valid)
            except Exception as exc:
                if not self.isolate:
                    raise
                for i in members:
                    errors[i] = describe(exc)
                continue
            for j, i in enumerate(members):
                core = tuple(slice(a, b) for a, b in zip(batch["core_start"][i], batch["core_stop"][i]))
                out = np.array(predicted[j][core], dtype=np.uint8)
                out[~valid[j][core]] = NODATA
                labels[i] = out
        packed = np.empty(n, dtype=object)
        packed[:] = labels
        return {"key": batch["key"], "unit": batch["unit"], "error": np.asarray(errors, dtype=object), "labels": packed}


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _limit_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(max(1, threads))
