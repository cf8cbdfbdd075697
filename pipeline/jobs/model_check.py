"""``raymask model check``: load a network as a job would, measure it (workers.models.check), and
write what was measured into its model card."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml

from pipeline import __version__
from pipeline.card import CARD_NAME, SUFFIX_KINDS, ModelCard
from pipeline.config import (
    NetworkModelConfig,
    OnnxModelConfig,
    TorchExportModelConfig,
    TorchScriptModelConfig,
    load_card,
)
from pipeline.errors import ConfigError, ModelError
from workers.models.check import CheckResult, check_network

CONFIGS: dict[str, type[NetworkModelConfig]] = {
    "torchscript": TorchScriptModelConfig,
    "torch-export": TorchExportModelConfig,
    "onnx": OnnxModelConfig,
}


def run_check(
    path: str, *, bands: int | None = None, dims: int | None = None, stride: int | None = None,
    window: int | None = None, write: bool = False,
) -> tuple[CheckResult, Path | None]:  # fmt: skip
    card, card_path, weights = _locate(path)
    kind = (card.kind if card else None) or SUFFIX_KINDS.get(weights.suffix)
    if kind is None:
        raise ConfigError(
            f"{weights}: cannot tell the kind from the suffix (.pt, .pt2, .onnx); give a MODEL.yaml with kind"
        )
    if not weights.is_file():
        raise ModelError(f"{weights}: model file not found")
    dims = dims or (card.dims if card and card.dims else 2)
    stride = stride or (card.stride if card and card.stride else 1)
    config = CONFIGS[kind](kind=kind, path=str(weights), classes=["?"], dims=dims, stride=stride)  # type: ignore[arg-type]
    import torch

    from workers.models.network import _load

    network, _, in_channels = _load(config, torch.device("cpu"))
    bands = bands or (len(card.bands) if card and card.bands else None) or in_channels
    if bands is None:
        raise ConfigError(f"{weights}: cannot tell the input bands from the network; give --bands")
    result = check_network(network, bands=bands, dims=dims, stride=stride, window=window)
    written = _write(card_path or weights.with_name(CARD_NAME), weights, result, bands) if write else None
    return result, written


def _locate(path: str) -> tuple[ModelCard | None, Path | None, Path]:
    """(card, its file, weights): a card or folder names its weights; weights may have a card beside them."""
    given = Path(path)
    if given.suffix in (".yaml", ".yml") or given.is_dir():
        card, card_path = load_card(given)
        return card, card_path, card_path.parent / card.weights
    beside = given.with_name(CARD_NAME)
    if beside.is_file():
        card, card_path = load_card(beside)
        if (card_path.parent / card.weights).resolve() == given.resolve():
            return card, card_path, given
    return None, None, given


def _write(card_path: Path, weights: Path, result: CheckResult, bands: int) -> Path:
    """Record the measurement in the card (made with what is known if there is none): ``measured``,
    ``stitch``, and ``receptive_radius`` set to the suggested halo. The file is rewritten as plain
    YAML: comments in it are not kept."""
    raw = (
        yaml.safe_load(card_path.read_text())
        if card_path.is_file()
        else {"weights": weights.name, "classes": ["?"] * 1}
    )
    raw["stitch"] = result.stitch
    if result.suggested_halo is not None:
        raw["receptive_radius"] = result.suggested_halo
    raw["measured"] = {
        "equivariant": result.equivariant,
        "receptive_radius": result.receptive_radius,
        "window": result.window,
        "trials": result.trials,
        "bands": bands,
        "by": f"raymask {__version__} model check",
        "on": dt.date.today().isoformat(),
    }
    ModelCard.model_validate(raw)  # what is written, readers accept
    card_path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return card_path
