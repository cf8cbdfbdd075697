"""The store's metadata (``attrs["raymask"]`` of the root group) as one typed, frozen model.

Every reader goes through ``StoreMeta``: a key renamed or mistyped is an error here, not a
``None`` three modules away. Stores carry a ``version``; stores written before it existed are
version 1, the format they already have. A store from a newer raymask is refused with one line
rather than misread. Keys this version does not know are kept (``extra="allow"``), so rewriting
the metadata of a store never drops what a newer writer added.

Vocabulary: a *chunk* is storage (one zarr chunk of the mask); a *unit* is work (``chunks_per_unit``
chunks along each axis, written together); a *window* is what the model sees (a unit plus its halo).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StoreError

FORMAT = "raymask-mask-store/1"
VERSION = 1  # the metadata layout this code writes and reads


class _Meta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class ClassEntry(_Meta):
    id: int
    name: str
    color: str
    code: dict[str, dict[str, str]] | None = None  # {category, type: {scheme, value, meaning}}, as the config coded it


class Arrays(_Meta):
    """Where the arrays are, relative to the store's root."""

    mask: str = "mask"
    image: str | None = None  # volumes: the ingested HU image
    regions: str | None = None  # once labelled
    probability: str | None = None  # (class, ...) uint8 round(p * 254), 255 = nodata: output.probabilities


class VolumeMeta(_Meta):
    shape: list[int]
    spacing_mm: list[float]
    origin_mm: list[float]
    direction: list[list[float]]
    affine: list[list[float]]
    axes: list[str]
    space: str


class RegionsMeta(_Meta):
    """What the last completed labelling wrote."""

    connectivity: int
    classes: list[str]
    count: int
    crossing: int
    per_class: dict[str, int]
    table: str
    array: str
    token: str
    intensity: bool


class SourceMeta(_Meta):
    paths: list[str] = Field(default_factory=list)
    bands: list[int] = Field(default_factory=list)
    series: str | None = None
    modality: str | None = None
    dtypes: list[str] = Field(default_factory=list)
    fingerprint: str | None = None


class StoreMeta(_Meta):
    format: str = FORMAT
    version: int = VERSION
    status: Literal["incomplete", "complete"]
    created: str
    completed: str | None = None
    shape: list[int]
    classes: list[ClassEntry]
    nodata: int = 255
    crs: str | None = None
    transform: list[float] | None = None
    # the unit of every measure in the store (``units/measure``, the class and region sums); the
    # key on disk is ``measure``, as stores and summaries have always written it
    measure_unit: Literal["m2", "mm2", "mm3"] | None = Field(None, alias="measure")
    pixel_area_mm2: float | None = None
    arrays: Arrays = Arrays()
    volume: VolumeMeta | None = None
    stats: dict[str, Any] | None = None  # set when complete: {"classes": {...}, "measure": ...}
    regions: RegionsMeta | None = None
    image_ingested: bool = False
    # every mask chunk has a file, even an all-nodata one (stores before this key skip those), so a
    # missing chunk file in a complete store is damage, not nodata
    every_chunk: bool = False
    raymask_version: str | None = None
    identity: dict[str, str] = Field(default_factory=dict)
    job: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    source: SourceMeta | None = None
    grid: dict[str, Any] | None = None
    # lower-resolution levels (pipeline.store.levels): [{level, shape, mask, image?, transform?}]
    levels: list[dict[str, Any]] | None = None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def parse_meta(raw: object, where: str) -> StoreMeta:
    """The typed metadata of the store at ``where``, migrated to this version; one line if unusable."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StoreError(f"{where}: not a raymask mask store (no raymask metadata)")
    version = raw.get("version", 1)  # stores written before the field existed are version 1
    if not isinstance(version, int) or version > VERSION:
        raise StoreError(f"{where}: written by a newer raymask (store version {version}; this one reads {VERSION})")
    try:
        return StoreMeta.model_validate({**raw, "version": version})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise StoreError(f"{where}: damaged store metadata ({key}: {first['msg']})") from exc
