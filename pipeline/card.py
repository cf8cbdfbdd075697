"""Model cards: ``MODEL.yaml`` beside a network's weights says what the network is and needs.

A job config can name just the card (``model: {card: models/unet/MODEL.yaml}``); what the config
states beside ``card`` overrides the card, except what the weights fix (the number of classes, the
dimensions, the kind), where a difference is an error rather than an override. ``raymask model
show PATH`` prints a card.

::

    name: tiny-unet
    description: a demonstration network
    kind: torchscript            # torchscript | torch-export | onnx; default: from the weights' suffix
    weights: unet.pt             # relative to the card
    classes:                     # one per output channel; code: what DICOM SEG calls the class
      - {name: background, color: "#303030"}
      - name: liver
        code: {category: {scheme: SCT, value: "91723000", meaning: Anatomical Structure},
               type: {scheme: SCT, value: "10200004", meaning: Liver}}
    bands: [red, nir]            # what the network expects, in order (or modality: CT)
    scale: 1.0
    normalize: {mean: [66, 340], std: [42, 172]}
    stride: 4
    receptive_radius: 20         # pixels of context; `raymask model check` measures it
    dims: 2
    spacing: [10.0, 10.0]        # the pixel size it was trained at (metres, or mm for medical images)
    stitch: exact                # exact (halo >= receptive radius) or blend (not translation-equivariant)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import ConfigError

CARD_NAME = "MODEL.yaml"
SUFFIX_KINDS = {".pt": "torchscript", ".ts": "torchscript", ".pt2": "torch-export", ".onnx": "onnx"}
# keys a card and a model config share: the card's value is the default, the config's wins ...
SHARED = ("kind", "classes", "dims", "stride", "receptive_radius", "scale", "normalize", "precision")
# ... except these, which the weights fix: a config that says otherwise contradicts the card
FIXED_BY_WEIGHTS = ("kind", "dims")


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    description: str | None = None
    kind: Literal["torchscript", "torch-export", "onnx"] | None = None
    weights: str = Field(description="The network file, relative to the card.")
    classes: list[str | dict[str, Any]] = Field(min_length=1)
    bands: list[str] | None = Field(default=None, description="The input bands the network expects, in order.")
    modality: str | None = Field(default=None, description="For medical images: CT, MR, ... (values as stored).")
    scale: float | None = None
    normalize: dict[str, list[float]] | None = None
    stride: int | None = Field(default=None, ge=1)
    receptive_radius: int | None = Field(default=None, ge=0)
    dims: Literal[2, 3] | None = None
    precision: Literal["float32", "bfloat16", "float16"] | None = None
    spacing: list[float] | None = None
    stitch: Literal["exact", "blend"] | None = None
    license: str | None = None
    source: str | None = None
    measured: dict[str, Any] | None = Field(default=None, description="What `raymask model check` measured.")


def find_card(path: str | Path) -> Path:
    """The card at ``path``: the file itself, ``MODEL.yaml`` in a folder, or beside a weights file."""
    path = Path(path)
    candidates = [path] if path.suffix in (".yaml", ".yml") else [path / CARD_NAME, path.with_name(CARD_NAME)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: no model card ({CARD_NAME}) there")


def model_from_card(model: dict[str, Any], card: ModelCard, card_path: Path) -> dict[str, Any]:
    """A job config's ``model`` section with its ``card`` resolved: the card's values, then the
    section's own on top; the weights path made absolute (it is relative to the card)."""
    weights = (card_path.parent / card.weights).absolute()
    stated = {k: v for k, v in model.items() if k != "card"}
    merged: dict[str, Any] = {k: getattr(card, k) for k in SHARED if getattr(card, k) is not None}
    merged.setdefault("kind", SUFFIX_KINDS.get(weights.suffix))
    if merged["kind"] is None:
        raise ConfigError(
            f"{card_path}: say the kind (torchscript, torch-export, onnx): {weights.name} has no known suffix"
        )
    for key in FIXED_BY_WEIGHTS:
        if key in stated and key in merged and stated[key] != merged[key]:
            raise ConfigError(
                f"model.{key}: {stated[key]!r}, but the card {card_path} says {merged[key]!r} for {weights.name}"
            )
    if "classes" in stated and len(stated["classes"]) != len(card.classes):
        raise ConfigError(
            f"model.classes names {len(stated['classes'])} classes, but the card {card_path} lists {len(card.classes)} "
            "(one per output channel of the network); rename them, keeping their number"
        )
    merged.update(stated)
    merged["path"] = str(weights) if "path" not in stated else stated["path"]
    return merged  # whether the card allows an exactness claim is decided at run time (card_doubt)


def card_doubt(card: ModelCard, declared: int | None) -> str | None:
    """Why the card forbids claiming exact tiling with ``declared`` as the receptive radius, or None."""
    measured = (card.measured or {}).get("receptive_radius")
    if card.stitch == "blend" or (card.measured or {}).get("equivariant") is False:
        return "its model card says the network needs blended stitching (not translation-equivariant)"
    if isinstance(measured, int) and declared is not None and declared < measured:
        return f"the declared receptive radius {declared} is below the {measured} px its model card measured"
    return None


def describe_card(card: ModelCard, card_path: Path) -> list[tuple[str, str]]:
    """(label, value) lines for ``raymask model show``."""
    names = [c if isinstance(c, str) else f"{c.get('name')} {c.get('color', '')}".strip() for c in card.classes]
    kind = card.kind or SUFFIX_KINDS.get(Path(card.weights).suffix, "?")
    rows = [
        ("card", str(card_path)),
        ("name", card.name or "-"),
        ("weights", f"{(card_path.parent / card.weights)} ({kind})"),
        ("classes", ", ".join(names)),
        ("input", ", ".join(card.bands) if card.bands else (card.modality or "-")),
        ("scale", f"{card.scale:g}" if card.scale is not None else "1"),
        (
            "normalize",
            "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in card.normalize.items())
            if card.normalize
            else "-",
        ),
        ("stride", str(card.stride or 1)),
        ("receptive radius", "unknown" if card.receptive_radius is None else f"{card.receptive_radius} px"),
        ("dims", str(card.dims or 2)),
        ("spacing", " × ".join(f"{s:g}" for s in card.spacing) if card.spacing else "-"),
        ("stitching", card.stitch or ("exact with halo >= radius" if card.receptive_radius is not None else "-")),
    ]
    if card.description:
        rows.insert(2, ("about", card.description))
    if card.measured:
        rows.append(("measured", ", ".join(f"{k} {v}" for k, v in card.measured.items())))
    return rows


def bundle_metadata(folder: Path) -> dict[str, Any]:
    """A MONAI bundle's ``configs/metadata.json`` ({} if it has none); one line if unreadable."""
    import json

    path = folder / "configs" / "metadata.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a MONAI bundle folder (expected configs/ and models/ in it)")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc
    return meta if isinstance(meta, dict) else {}


def bundle_classes(folder: Path) -> list[str]:
    """Class names from the bundle's ``network_data_format.outputs.pred.channel_def``, in channel order."""
    outputs = bundle_metadata(folder).get("network_data_format", {}).get("outputs", {})
    channels = next(
        (o.get("channel_def") for o in outputs.values() if isinstance(o, dict) and o.get("channel_def")), None
    )
    if not isinstance(channels, dict) or not channels:
        raise ConfigError(
            f"{folder}: the bundle's metadata names no output channels (network_data_format.outputs.*.channel_def); "
            "list model.classes in the job config"
        )
    return [str(channels[k]) for k in sorted(channels, key=int)]


def bundle_in_channels(folder: Path) -> int | None:
    inputs = bundle_metadata(folder).get("network_data_format", {}).get("inputs", {})
    for spec in inputs.values():
        if isinstance(spec, dict) and isinstance(spec.get("num_channels"), int):
            return int(spec["num_channels"])
    return None


def bundle_config(folder: Path) -> Path | None:
    """The bundle's inference config (``configs/inference.json``, ``.yaml`` or ``.yml``), if any."""
    names = ("inference.json", "inference.yaml", "inference.yml")
    return next((folder / "configs" / n for n in names if (folder / "configs" / n).is_file()), None)
