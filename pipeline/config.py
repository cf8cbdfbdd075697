"""Job configuration: YAML and ``--set`` overrides parsed once, here, into frozen typed models.

Below this module nothing reads dicts: the driver, the tiling maths and the workers take
``JobConfig`` (or its parts). Every model forbids unknown keys, so a typo is an error that
names the key and lists the allowed ones, never a silently ignored setting.

Relative paths are resolved against the current directory, which is also what
``ray job submit --working-dir .`` gives a job on a cluster. GDAL-style paths (``/vsis3/...``,
``s3://...``, ``https://...``) pass through untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError, one_line

if TYPE_CHECKING:
    from pipeline.card import ModelCard

Color = Annotated[str, Field(pattern=r"^#[0-9a-fA-F]{6}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodeSpec(_Frozen):
    """A coded concept: ``{scheme: SCT, value: "39607008", meaning: Lung}`` (SNOMED CT, DCM, ...)."""

    scheme: str = Field(min_length=1, max_length=16, description="Coding scheme designator: SCT, DCM, FMA, ...")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class ClassCode(_Frozen):
    """What a class is, coded as DICOM SEG describes a segment: its category and its type."""

    category: CodeSpec = Field(description="Segmented property category (CID 7150), e.g. SCT 85756007 Tissue.")
    type: CodeSpec = Field(description="Segmented property type (CID 7151), e.g. SCT 39607008 Lung.")


class ClassSpec(_Frozen):
    """One output class: its name, display colour (``#rrggbb``) and, for DICOM SEG export, its code."""

    name: str = Field(min_length=1)
    color: Color | None = None
    code: ClassCode | None = Field(
        default=None, description="{category: {scheme, value, meaning}, type: {...}}: what DICOM SEG calls the class."
    )


class SourceConfig(_Frozen):
    """The input: a raster, a list of single-band rasters on one grid, or a DICOM series."""

    path: str | list[str] = Field(
        description="A raster path (GeoTIFF or anything GDAL opens, /vsis3/... included), "
        "a list of single-band rasters stacked in order as bands 1..N, or a DICOM folder or files."
    )
    kind: Literal["auto", "raster", "dicom"] = Field(
        default="auto", description="auto: a folder or DICOM file is a DICOM series, anything else a raster."
    )
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="1-based band numbers, in the order the model takes them."
    )

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the list of band files is empty")
        if isinstance(value, str) and not value.strip():
            raise ValueError("the path is empty")
        return value

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.path) if isinstance(self.path, list) else (self.path,)


class BatchSourceConfig(_Frozen):
    """What applies to every input of a batch."""

    bands: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="1-based band numbers, in the order the model takes them (every input)."
    )
    kind: Literal["auto", "raster", "dicom"] = Field(
        default="auto", description="auto: a folder or DICOM file is a DICOM series, anything else a raster."
    )


class NdviModelConfig(_Frozen):
    """NDVI thresholds: water below ``water_below``, vegetation at or above ``vegetation_above``."""

    kind: Literal["ndvi"] = Field(description="NDVI = (NIR - red) / (NIR + red), thresholded into 3 classes.")
    red: int = Field(default=1, ge=1, description="Position of the red band among the selected bands.")
    nir: int = Field(default=2, ge=1, description="Position of the NIR band among the selected bands.")
    water_below: float = Field(default=0.0, ge=-1.0, le=1.0, description="NDVI below this is water.")
    vegetation_above: float = Field(default=0.3, ge=-1.0, le=1.0, description="NDVI at or above this is vegetation.")

    @model_validator(mode="after")
    def _ordered(self) -> NdviModelConfig:
        if self.water_below > self.vegetation_above:
            raise ValueError(
                f"water_below ({self.water_below}) must not exceed vegetation_above ({self.vegetation_above})"
            )
        return self


class RgbVegetationModelConfig(_Frozen):
    """An RGB vegetation index with a threshold (ExG on chromatic coordinates, or VARI)."""

    kind: Literal["rgb-vegetation"] = Field(description="A visible-band vegetation index, for RGB imagery.")
    index: Literal["exg", "vari"] = Field(
        default="exg", description="exg: excess green 2g - r - b; vari: (g - r) / (g + r - b)."
    )
    red: int = Field(default=1, ge=1, description="Position of the red band among the selected bands.")
    green: int = Field(default=2, ge=1, description="Position of the green band among the selected bands.")
    blue: int = Field(default=3, ge=1, description="Position of the blue band among the selected bands.")
    threshold: float = Field(default=0.05, description="Vegetation where the index exceeds this value.")


class HuTissueModelConfig(_Frozen):
    """Tissue classes from HU windows: each class takes values below its upper bound (in order)."""

    kind: Literal["hu-tissue"] = Field(description="CT tissue classes from Hounsfield-unit windows.")
    classes: list[str] = Field(
        default=["air", "lung", "fat", "soft tissue", "bone"], min_length=1, description="Class names, lowest HU first."
    )
    upper: list[float] = Field(
        default=[-900.0, -500.0, -30.0, 300.0],
        description="Upper HU bound of every class but the last, ascending; the last class takes the rest.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> HuTissueModelConfig:
        if len(self.upper) != len(self.classes) - 1:
            raise ValueError(
                f"{len(self.classes)} classes need {len(self.classes) - 1} upper bounds, got {len(self.upper)}"
            )
        if any(b <= a for a, b in zip(self.upper, self.upper[1:])):
            raise ValueError(f"upper bounds must ascend: {self.upper}")
        return self


class Normalize(_Frozen):
    """Per-band ``(x - mean) / std``, applied before the model; one value per selected band."""

    mean: list[float] = Field(description="Per selected band, subtracted first.")
    std: list[Annotated[float, Field(gt=0)]] = Field(description="Per selected band, divided by after the mean.")

    @model_validator(mode="after")
    def _same_length(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self


class NetworkModelConfig(_Frozen):
    """A network file mapping N x bands x H x W (x D) to N x classes x H x W logits: what the
    torchscript, torch-export and onnx kinds share."""

    kind: str
    path: str = Field(description="Local path of the network file (never a URL: weights come from local files).")
    classes: list[str | ClassSpec] = Field(
        min_length=1, description="One per output channel, in order: a name, or {name, color: '#rrggbb'}."
    )
    dims: Literal[2, 3] = Field(
        default=2, description="2: a 2-D network (volumes run slice by slice); 3: a 3-D network."
    )
    stride: int = Field(default=1, ge=1, description="Total downsampling factor; tile origins align to it.")
    receptive_radius: int | None = Field(
        default=None, ge=0, description="Pixels of context each output depends on; halo >= this makes tiling exact."
    )
    normalize: Normalize | None = Field(default=None, description="Per-band (x - mean) / std after scale.")
    scale: float = Field(default=1.0, gt=0, description="Multiply raw values by this before normalize.")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Autocast the network to bfloat16 or float16 (GPUs); tiling is then not guaranteed exact.",
    )
    tta: Literal["none", "flips"] = Field(
        default="none",
        description='Test-time augmentation: "flips" runs the window mirrored along every combination of spatial '
        "axes (4 passes in 2-D, 8 in 3-D) and averages the logits, as nnU-Net does; exact tiling stays exact.",
    )


class TorchScriptModelConfig(NetworkModelConfig):
    """A TorchScript file whose module maps N x bands x H x W to N x classes x H x W logits."""

    kind: Literal["torchscript"] = Field(description="A TorchScript network (torch.jit.save).")


class TorchExportModelConfig(NetworkModelConfig):
    """A ``torch.export`` program (``.pt2``, saved with ``torch.export.save``): TorchScript's successor."""

    kind: Literal["torch-export"] = Field(description="An exported program (torch.export.save, a .pt2 file).")


class MonaiBundleModelConfig(NetworkModelConfig):
    """A MONAI bundle folder: ``configs/inference.json|yaml`` (the network, ``network_def``),
    ``configs/metadata.json`` (class names and input channels where stated) and ``models/model.ts``
    (TorchScript) or ``models/model.pt`` (weights). Offline: nothing is downloaded."""

    kind: Literal["monai-bundle"] = Field(description="A MONAI bundle folder (offline; weights from models/).")
    path: str = Field(description="The bundle folder (holding configs/ and models/).")


class OnnxModelConfig(NetworkModelConfig):
    """An ONNX graph run by onnxruntime: the CUDA execution provider on a GPU actor, the CPU one otherwise."""

    kind: Literal["onnx"] = Field(
        description="An ONNX network (onnxruntime; export with dynamic batch and spatial axes)."
    )

    @field_validator("precision")
    @classmethod
    def _float32(cls, value: str) -> str:
        if value != "float32":
            raise ValueError("an ONNX graph runs in the precision it was exported in; export it in float16 instead")
        return value


ModelConfig = Annotated[
    Union[
        NdviModelConfig,
        RgbVegetationModelConfig,
        HuTissueModelConfig,
        TorchScriptModelConfig,
        TorchExportModelConfig,
        OnnxModelConfig,
        MonaiBundleModelConfig,
    ],
    Field(discriminator="kind"),
]


class TilingConfig(_Frozen):
    """The output chunk grid and the context read around each chunk."""

    def per_axis(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(chunk, halo) with one value per axis; a single number applies to every axis."""
        chunk = self._axes(self.chunk, ndim, "chunk")
        halo = self._axes(self.halo, ndim, "halo")
        return chunk, halo

    @staticmethod
    def _axes(value: int | list[int], ndim: int, name: str) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * ndim
        if len(value) != ndim:
            raise ConfigError(f"tiling.{name}: {len(value)} values given for a {ndim}-D input")
        return tuple(value)

    chunk: PositiveInt | list[PositiveInt] = Field(
        default=512, description="Output chunk edge in pixels (a multiple of the model stride); [z, y, x] for volumes."
    )
    halo: NonNegativeInt | list[NonNegativeInt] = Field(
        default=64, description="Context read on each side; rounded up to the model stride; [z, y, x] for volumes."
    )
    chunks_per_unit: int = Field(default=1, ge=1, description="Chunks per work unit along each axis.")
    edge: Literal["replicate", "zero"] = Field(
        default="replicate",
        description="How the image is padded, once, to a multiple of the stride: repeat the last row/column, or zeros.",
    )
    stitch: Literal["exact", "blend"] | None = Field(
        default=None,
        description='"exact": each chunk from one window (chunk + halo), equal to whole-image inference for '
        'translation-equivariant models; "blend": overlapping windows weighted and summed, equal to '
        "sliding-window inference (MONAI's), for models that are not equivariant (InstanceNorm, attention, "
        'global pooling); null: the model card\'s stitch, else "exact".',
    )
    window: PositiveInt | list[PositiveInt] | None = Field(
        default=None,
        description="blend: the window the network sees, per axis ([z, y, x]; 2-D networks on volumes: z is 1); "
        "null: the chunk.",
    )
    overlap: float = Field(
        default=0.25, ge=0, lt=1, description="blend: fraction of a window shared with the next one (MONAI's overlap)."
    )
    weights: Literal["gaussian", "constant"] = Field(
        default="gaussian", description="blend: how each window's logits are weighted (gaussian: centre counts most)."
    )
    sigma: float = Field(
        default=0.125,
        gt=0,
        description="blend: the gaussian's sigma as a fraction of the window (MONAI, nnU-Net: 1/8).",
    )

    def blend_window(self, ndim: int, chunk: tuple[int, ...], network_dims: int) -> tuple[int, ...]:
        """The blend window, one value per image axis (a 2-D network on a volume: 1 along z)."""
        if self.window is None:
            window = chunk
        elif isinstance(self.window, int):
            window = (self.window,) * ndim
        else:
            window = self._axes(self.window, ndim, "window")
        if ndim == 3 and network_dims == 2:
            window = (1, *window[1:])
        return tuple(window)


URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|/vsi)")


def _local_store(value: str, *, s3: bool = False) -> str:
    """Stores are folders, or with ``s3`` also ``s3://`` prefixes: any other URL is refused rather
    than written to a folder that happens to be named like it (``gs:/bucket/...``)."""
    if URL.match(value) and not (s3 and value.startswith("s3://")):
        where = "folders or s3:// prefixes" if s3 else "local or shared-filesystem folders"
        raise ValueError(f"{value!r} is a URL; stores are written to {where} only")
    return value


class OutputConfig(_Frozen):
    path: str = Field(min_length=1, description="The zarr store to write (a directory ending in .zarr).")

    @field_validator("path")
    @classmethod
    def _local(cls, value: str) -> str:
        return _local_store(value, s3=True)

    preview: bool = Field(default=True, description="Write STORE.png: the image with the mask overlaid.")
    probabilities: bool = Field(
        default=False,
        description="Also store each class's softmax probability (network models), uint8: 0..254 for 0..1, "
        "255 = nodata; feeds the region table's mean_probability and `raymask export --probabilities`.",
    )
    levels: bool = Field(
        default=True,
        description="Write lower-resolution levels once the mask is complete (2x steps down to one chunk; mode of "
        "labels, mean of a volume's image) for viewers (OME-Zarr multiscales) and the COG's overviews.",
    )


class RegionsConfig(_Frozen):
    """Connected regions of each class, labelled once the mask is written (``raymask regions STORE``)."""

    enabled: bool = Field(default=True, description="Label regions as part of the job and store the region table.")
    connectivity: Literal[4, 8, 6, 18, 26] | None = Field(
        default=None,
        description="Neighbours that connect: 4 or 8 in 2-D, 6, 18 or 26 in 3-D; null: faces only (4 or 6).",
    )
    classes: list[str] | None = Field(
        default=None, description='Class names to label; null: every class except one named "background".'
    )


class RuntimeConfig(_Frozen):
    """Where and how the job runs. Nothing here changes the output bytes."""

    address: str | None = Field(
        default=None,
        description="null: RAY_ADDRESS if set, else a local Ray of the run's own (never a head that `ray start` "
        'left running here); "auto" joins that head; HOST:6379 or ray://HOST:10001 joins a cluster; "local" '
        "always starts a local Ray.",
    )
    engine: Literal["auto", "ray", "process"] = Field(
        default="auto",
        description='"ray": Ray actors; "process": the whole job in this process, no Ray (one machine, same bytes); '
        '"auto": "process" for jobs of at most small_job_units work units when no cluster is named and no Ray '
        "is running here, Ray otherwise.",
    )
    small_job_units: int = Field(
        default=32, ge=0, description='Work units up to which engine "auto" runs the job in this process.'
    )
    actors: PositiveInt | tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Predict actors: N, or [MIN, MAX] for a pool that grows onto nodes that join while work is "
        "queued (up to MAX) and shrinks when nodes leave (replaced while fewer than MIN live); default: one per "
        "GPU, else one per actor_cpus CPUs of each node, at the start.",
    )

    @field_validator("actors")
    @classmethod
    def _actor_range(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"[{value[0]}, {value[1]}]: MIN is above MAX")
        return value

    batch_size: PositiveInt | Literal["auto"] = Field(
        default="auto", description='Windows per model call; "auto": 1 on CPUs, 8 on GPUs.'
    )
    actor_cpus: float | Literal["auto"] = Field(
        default="auto",
        description='CPUs reserved by each actor (model, reads and writes); "auto": 1 on CPU nodes (one '
        "single-threaded actor per CPU: fastest, one model's memory each), a GPU node's CPUs shared among its GPUs.",
    )
    threads: int | None = Field(default=None, ge=1, description="Torch threads per actor; default its actor_cpus.")
    gpus_per_actor: float | Literal["auto"] = Field(
        default="auto", description='"auto": 1 when the cluster has GPUs, else 0; a fraction shares a GPU among actors.'
    )
    io_threads: int = Field(
        default=1,
        ge=0,
        description="Reader threads and writer threads per actor (each); 0: in the model's thread. More help when "
        "the model is fast (a GPU) and the source slow to decode; on a few CPU cores they take cores from the model.",
    )
    prefetch: int = Field(
        default=2, ge=1, description="Batches each actor reads ahead (and keeps on the device) while the model runs."
    )
    max_retries: int = Field(
        default=3, ge=0, description="Times a work unit is retried after the worker running it died."
    )
    max_pixels: PositiveInt = Field(
        default=10**11,
        description="Refuse inputs declaring more pixels (voxels) than this: a few-KB file can declare 10^12 "
        "(a sparse or hostile TIFF). Raise it for real scenes larger than 100 gigapixels.",
    )


_MODEL_DOC = (
    "The segmenter, chosen by kind: ndvi, rgb-vegetation, hu-tissue (built in), torchscript, torch-export or onnx."
)
_TILING_DOC = "Chunks of the store, the halo of context around each, and chunks per work unit."
_REGIONS_DOC = "Connected regions per class, labelled across chunks, with their table."
_RUNTIME_DOC = "Where and how units run: engine, Ray address, actors, CPUs, GPUs, threads, batches, retries."


class JobConfig(_Frozen):
    source: SourceConfig = Field(description="The input: a raster, a list of band files, or a DICOM series.")
    model: ModelConfig = Field(description=_MODEL_DOC)
    tiling: TilingConfig = Field(default=TilingConfig(), description=_TILING_DOC)
    output: OutputConfig = Field(description="Where the mask store goes.")
    regions: RegionsConfig = Field(default=RegionsConfig(), description=_REGIONS_DOC)
    runtime: RuntimeConfig = Field(default=RuntimeConfig(), description=_RUNTIME_DOC)

    @model_validator(mode="after")
    def _stride_divides_chunk(self) -> JobConfig:
        stride = getattr(self.model, "stride", 1)
        chunk = self.tiling.chunk
        chunks: list[int] = list(chunk) if isinstance(chunk, list) else [chunk]
        strided = chunks if getattr(self.model, "dims", 2) == 3 else chunks[-2:]  # 2-D models: no z stride
        if any(c % stride for c in strided):
            raise ValueError(f"tiling.chunk ({chunk}) must be a multiple of the model stride ({stride})")
        return self

    def identity(self) -> str:
        """A hash of everything that determines the output bytes (not where or how it runs)."""
        payload = self.model_dump(mode="json", include={"source", "model", "tiling", "regions"})
        if self.output.probabilities:  # only when set: stores made before the key keep their identity
            payload["probabilities"] = True
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class BatchOutputConfig(_Frozen):
    root: str = Field(
        description="Folder (or s3:// prefix) under which each input gets its own store, at a name derived "
        "from its path."
    )

    @field_validator("root")
    @classmethod
    def _local(cls, value: str) -> str:
        return _local_store(value, s3=True)

    preview: bool = Field(default=False, description="Write a preview PNG beside each store.")
    exports: list[Literal["parquet", "fgb", "gpkg", "geojson", "cog", "seg", "nifti"]] = Field(
        default_factory=list,
        description="Exports written beside each store, named after it (a/b.tif.zarr -> a/b.tif.parquet): "
        "parquet, fgb, gpkg, geojson (region polygons) and cog for 2-D stores; seg (DICOM SEG) and nifti for "
        "volumes; each where it fits. Rewritten when the store is new; for a skipped store only when missing.",
    )


class BatchConfig(_Frozen):
    """A nightly run over an archive: the same model over every input that the globs find."""

    inputs: list[str] = Field(
        min_length=1,
        description="Globs or folders: GeoTIFFs (and other rasters) and DICOM folders, which split into series. "
        "Store names mirror each input's path relative to its glob's fixed part.",
    )
    source: BatchSourceConfig = Field(
        default_factory=lambda: BatchSourceConfig(), description="How every input is read (bands, kind)."
    )
    model: ModelConfig = Field(description=_MODEL_DOC)
    tiling: TilingConfig = Field(default=TilingConfig(), description=_TILING_DOC)
    output: BatchOutputConfig = Field(description="Where the stores go: one per input, mirrored under root.")
    regions: RegionsConfig = Field(default=RegionsConfig(), description=_REGIONS_DOC)
    runtime: RuntimeConfig = Field(default=RuntimeConfig(), description=_RUNTIME_DOC)

    def job(self, source: SourceConfig, store: str) -> JobConfig:
        """The job config of one input."""
        return JobConfig(
            source=source,
            model=self.model,
            tiling=self.tiling,
            output=OutputConfig(path=store, preview=self.output.preview),
            regions=self.regions,
            runtime=self.runtime,
        )


def load_batch_config(path: str | Path, overrides: list[str] | None = None) -> BatchConfig:
    raw = with_card(apply_overrides(_read_yaml(Path(path)), overrides or []), str(path))
    try:
        return BatchConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, BatchConfig)}") from exc


MAX_CONFIG_BYTES = 1 << 20  # a job config is a few hundred bytes; a larger file is the wrong file or an attack
MAX_CONFIG_VALUES = 100_000  # values after YAML aliases are expanded (a "billion laughs" document has 10^9)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build Python objects) that also refuses duplicate keys,
    which the YAML spec forbids and PyYAML would silently resolve to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key) if isinstance(key, str | int | float | bool) else None
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> plain Python values, safely: no object tags, no duplicate keys, and no alias
    chains that would expand into more than MAX_CONFIG_VALUES values once copied."""
    try:
        stream = io.StringIO(text)
        stream.name = Path(origin).name  # PyYAML names the stream in its messages: the file, not "<unicode string>"
        raw = yaml.load(stream, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML ({one_line(exc)})") from exc
    if _expanded_size(raw, {}) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{origin}: YAML aliases expand to more than {MAX_CONFIG_VALUES} values; not a job config")
    return raw


def _expanded_size(value: object, memo: dict[int, int]) -> int:
    """How many values ``value`` becomes once every alias is copied (shared objects counted each time)."""
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in memo:
        memo[id(value)] = 0  # an alias cycle (PyYAML can build one) counts as its finite part
        children = value.values() if isinstance(value, dict) else value
        total = 1
        for child in children:
            total += _expanded_size(child, memo)
            if total > MAX_CONFIG_VALUES:
                break
        memo[id(value)] = total
    return memo[id(value)]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if path.is_file() and size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: config file is {size / 1e6:.1f} MB; job configs are at most "
                f"{MAX_CONFIG_BYTES // (1 << 20)} MB (is this the right file?)"
            )
        raw = parse_yaml(path.read_text(), str(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'tiling.halo=32'`` -> (['tiling', 'halo'], 32); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. tiling.halo=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``KEY=VALUE`` applied at its dotted path."""
    result = json.loads(json.dumps(raw))
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = value
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config, apply ``--set`` overrides, validate; errors name the file and field."""
    if str(path).startswith("env:"):  # a config carried in a job's runtime environment
        name = str(path)[4:]
        if name not in os.environ:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        raw = parse_yaml(os.environ[name], str(path))
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        return config_from_dict(apply_overrides(raw, overrides or []), origin=str(path))
    raw = _read_yaml(Path(path))
    return config_from_dict(apply_overrides(raw, overrides or []), origin=str(path))


def with_card(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """``raw`` with ``model: {card: PATH, ...}`` resolved from the model card (pipeline.card), and a
    MONAI bundle's class names taken from its metadata where the config names none."""
    model = raw.get("model")
    if isinstance(model, dict) and model.get("kind") == "monai-bundle" and "classes" not in model and "path" in model:
        from pipeline.card import bundle_classes

        try:
            return {**raw, "model": {**model, "classes": bundle_classes(Path(str(model["path"])))}}
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from exc
    if not (isinstance(model, dict) and "card" in model):
        return raw
    from pipeline.card import model_from_card

    try:
        card, card_path = load_card(str(model["card"]))
        return {**raw, "model": model_from_card(model, card, card_path)}
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc


def card_beside(model: NetworkModelConfig) -> tuple[ModelCard, Path] | None:
    """The model card next to a network's weights (or in its bundle folder), if there is one."""
    from pipeline.card import CARD_NAME

    weights = Path(model.path)
    for candidate in (weights / CARD_NAME, weights.with_name(CARD_NAME)):
        if candidate.is_file():
            return load_card(candidate)
    return None


def load_card(path: str | Path) -> tuple[ModelCard, Path]:
    """The model card at ``path`` (pipeline.card.find_card) and its file; one line if missing or malformed."""
    from pipeline.card import ModelCard, find_card

    card_path = find_card(path)
    try:
        text = card_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{card_path}: cannot read the model card ({exc})") from exc
    raw = parse_yaml(text, str(card_path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{card_path}: a model card is a mapping of keys")
    try:
        return ModelCard.model_validate(raw), card_path
    except ValidationError as exc:
        raise ConfigError(f"{card_path}: {describe_validation_error(exc, ModelCard)}") from exc


def config_from_dict(raw: dict[str, Any], *, origin: str = "config") -> JobConfig:
    raw = with_card(raw, origin)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {describe_validation_error(exc, JobConfig)}") from exc


def describe_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """All problems on one line: ``field.path: what is wrong (got VALUE)``.

    For ``int | list[int]`` style fields pydantic reports one error per union branch; the
    branch that only says "wrong type" is dropped when another branch says something useful.
    """
    errors = [dict(err, loc=tuple(p for p in err["loc"] if not _is_union_tag(p))) for err in exc.errors()]
    useful = [e for e in errors if e["type"] not in _TYPE_MISMATCH]
    shown_locs = {e["loc"] for e in useful}
    errors = useful + [e for e in errors if e["type"] in _TYPE_MISMATCH and e["loc"] not in shown_locs]
    parts = []
    for err in errors:
        loc = [str(p) for p in cast(tuple[object, ...], err["loc"])]
        where = ".".join(loc) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            parts.append(f"unknown key '{where}'{hint}")
            continue
        if err["type"] == "missing":
            parts.append(f"{where}: required key is missing")
            continue
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # model.kind
            kinds = ", ".join(_MODEL_KINDS)
            given = err.get("input")
            got_kind = given.get("kind") if isinstance(given, dict) else None
            if got_kind is None:
                parts.append(f"{where}.kind: required key is missing (kinds: {kinds})")
            else:
                parts.append(f"{where}.kind: {got_kind!r} is not a model kind (kinds: {kinds})")
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(dict.fromkeys(parts))


_TYPE_MISMATCH = {"list_type", "int_type", "int_parsing", "string_type", "float_type", "float_parsing", "bool_type"}


_MODEL_KINDS: dict[str, type[BaseModel]] = {
    "ndvi": NdviModelConfig,
    "rgb-vegetation": RgbVegetationModelConfig,
    "hu-tissue": HuTissueModelConfig,
    "torchscript": TorchScriptModelConfig,
    "torch-export": TorchExportModelConfig,
    "onnx": OnnxModelConfig,
    "monai-bundle": MonaiBundleModelConfig,
}


def _is_union_tag(part: object) -> bool:
    """Location parts that name a union branch (a model kind, or pydantic's ``constrained-int``, ``list[...]``)."""
    return isinstance(part, str) and (part in _MODEL_KINDS or part in _BRANCH_NAMES or "[" in part)


_BRANCH_NAMES = {"constrained-int", "int", "str", "float", "bool", "function-after[_non_empty(), union[str,list[str]]]"}


def _allowed_keys(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys allowed at ``loc`` in a ``root`` config (job or batch), or [] where that is not one model."""
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def json_schema(*, batch: bool = False, train: bool = False) -> dict[str, Any]:
    """The JSON schema of job configs (``raymask run``), of batch configs (``raymask batch``) or of
    training configs (``raymask train``)."""
    if train:
        return TrainConfig.model_json_schema()
    return (BatchConfig if batch else JobConfig).model_json_schema()


# ---------------------------------------------------------------------------------------------------
# Training (raymask train CONFIG): labelled pairs -> a model folder that `raymask run` takes.


class TrainPair(_Frozen):
    """One labelled image: the image and its labels, on the same pixel grid."""

    image: str = Field(description="A raster (GeoTIFF, or a PNG/JPEG frame), or a DICOM series (its folder).")
    labels: str = Field(
        description="A one-band raster of class ids (or of label_values) on the image's grid; for a DICOM series, "
        "a NIfTI label image (.nii, .nii.gz) or a DICOM SEG on the series' voxels."
    )


class TrainNetwork(_Frozen):
    """The network, built from MONAI without downloading anything."""

    name: Literal["unet", "basicunet", "segresnet", "dynunet", "deeplabv3"] = Field(
        default="unet",
        description="MONAI's UNet, BasicUNet, SegResNet or DynUNet, or deeplabv3 (atrous pyramid with image "
        "pooling: global context, so tiles are blended, not exact).",
    )
    dims: Literal[2, 3] = Field(
        default=2, description="2: images, or a volume slice by slice; 3: volumes (DICOM series) in 3-D patches."
    )
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16, 32, 64], min_length=2, description="Features per level (the depth is its length)."
    )
    norm: Literal["batch", "instance", "group"] = Field(
        default="batch",
        description="batch: tiles stitch exactly at inference (a per-image norm, instance or group, does not).",
    )

    @property
    def stride(self) -> int:
        """Total downsampling: BasicUNet's is fixed at 16, the others halve once per level after the first."""
        return 16 if self.name == "basicunet" else 2 ** (len(self.channels) - 1)

    @property
    def exact(self) -> bool:
        """Whether tiles stitch exactly: a per-image norm or DeepLab's image pooling sees the whole input."""
        return self.norm == "batch" and self.name != "deeplabv3"


class TrainAugment(_Frozen):
    """Random changes to each training patch (image and labels alike)."""

    flips: bool = Field(default=True, description="Random flips along each axis.")
    rot90: bool = Field(default=True, description="Random quarter turns.")
    intensity: float = Field(
        default=0.1, ge=0, le=1, description="Gain and offset jitter (brightness, contrast), +- this, all bands alike."
    )
    intensity_per_band: bool = Field(
        default=False, description="Jitter each band on its own instead (shifts colours or spectra)."
    )


class TrainLoss(_Frozen):
    """Pixel-wise cross-entropy over the labelled pixels (nodata and unlabelled ignored), and more."""

    dice: bool = Field(default=False, description="Add a soft Dice loss to the pixel-wise cross-entropy.")
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(ge=0)]] = Field(
        default="none", description="Cross-entropy weights: none, balanced (inverse pixel frequency), or one per class."
    )


class TrainValidation(_Frozen):
    """Held-out files (whole files, never patches of a training file)."""

    files: list[str] = Field(default_factory=list, description="These images validate (else a fraction, drawn).")
    fraction: float = Field(default=0.25, gt=0, lt=1, description="The share of files drawn for validation.")


class TrainConfig(_Frozen):
    """``raymask train CONFIG``: what to learn from, the network, how, and where the model goes."""

    name: str = Field(default="model", description="The model's name, in its card.")
    pairs: list[TrainPair] = Field(default_factory=list, description="Image and label files, listed.")
    images: str | None = Field(default=None, description="Or a glob of images, e.g. data/polyp/images/*.jpg ...")
    labels: str | None = Field(
        default=None,
        description="... with their labels' path, {stem} standing for the image's name, e.g. masks/{stem}.png",
    )
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, description="1-based image bands, in order.")
    band_names: list[str] | None = Field(default=None, description="What the bands are (red, nir, ...), for the card.")
    classes: list[str | ClassSpec] = Field(
        min_length=2, description="One per class id 0..N-1: a name or {name, color}."
    )
    label_values: list[float] | None = Field(
        default=None,
        description="The label file's value for each class (e.g. [0, 255] for a mask): each pixel takes the nearest.",
    )
    scale: float = Field(default=1.0, gt=0, description="Multiply raw values by this before normalize.")
    normalize: Normalize | None = Field(
        default=None, description="Per band; computed from the training files if not given."
    )
    network: TrainNetwork = Field(
        default_factory=TrainNetwork, description="The network to train: name, dims, channels, norm."
    )
    patch: Annotated[int, Field(ge=8)] | list[Annotated[int, Field(ge=1)]] = Field(
        default=128,
        description="Training patch size in pixels, each a multiple of the stride; 3-D: [slices, rows, columns] "
        "(or one number for a cube).",
    )
    batch: int = Field(default=8, ge=1, description="Patches per step on each worker.")
    epochs: int = Field(default=10, ge=1, description="Passes of `steps` steps, each ending with a validation.")
    steps: int = Field(default=50, ge=1, description="Steps per epoch.")
    time_budget_s: float | None = Field(default=None, gt=0, description="Stop after the epoch that passes this.")
    learning_rate: float = Field(default=3e-3, gt=0, description="Adam's learning rate.")
    augment: TrainAugment = Field(default_factory=TrainAugment, description="Flips, quarter turns, intensity jitter.")
    balance: bool = Field(default=False, description="Draw patches around pixels of each class in turn (rare classes).")
    loss: TrainLoss = Field(default_factory=TrainLoss, description="Cross-entropy, optional Dice, class weights.")
    validation: TrainValidation = Field(
        default_factory=TrainValidation, description="The held-out files that score each epoch and pick the model."
    )
    seed: int = Field(default=0, description="Seeds the split, the patches, the augmentation and the weights.")
    in_memory_pixels: int = Field(
        default=4096 * 4096, ge=0,
        description="Rasters up to this many pixels are held whole by each worker; larger ones are read window by "
        "window (each patch, each validation tile), so memory stays flat whatever the scene's size.",
    )  # fmt: skip
    workers: int = Field(default=1, ge=1, description="Ray Train workers (data-parallel).")
    gpu: bool = Field(default=False, description="One GPU per worker.")
    export: Literal["torchscript", "torch-export", "onnx"] = Field(
        default="torchscript",
        description="The model file raymask run loads: TorchScript model.pt, torch.export model.pt2, or ONNX "
        "model.onnx (onnxruntime; the onnx extra).",
    )
    output: str = Field(description="The model folder: the model, MODEL.yaml, metrics, the loss curve, checkpoints/.")

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """The patch's spatial shape: (rows, columns), or (slices, rows, columns) for a 3-D network."""
        dims = self.network.dims
        if isinstance(self.patch, int):
            return (self.patch,) * dims
        return tuple(self.patch)

    @model_validator(mode="after")
    def _inputs(self) -> TrainConfig:
        if not self.pairs and not (self.images and self.labels):
            raise ValueError("give pairs: [{image, labels}, ...] or images: GLOB with labels: TEMPLATE")
        if self.label_values is not None and len(self.label_values) != len(self.classes):
            raise ValueError(f"label_values has {len(self.label_values)} values for {len(self.classes)} classes")
        if isinstance(self.loss.class_weights, list) and len(self.loss.class_weights) != len(self.classes):
            raise ValueError(
                f"loss.class_weights has {len(self.loss.class_weights)} values for {len(self.classes)} classes"
            )
        stride = self.network.stride
        if isinstance(self.patch, list) and len(self.patch) != self.network.dims:
            raise ValueError(f"patch has {len(self.patch)} sizes for a {self.network.dims}-D network")
        if any(p % stride for p in self.patch_shape):
            raise ValueError(f"patch {self.patch} is not a multiple of the network's stride {stride}")
        return self


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    raw = apply_overrides(_read_yaml(Path(path)), overrides or [])
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, TrainConfig)}") from exc
