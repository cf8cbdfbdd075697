"""A volume store's label mask as a DICOM Segmentation object (``raymask export ct.zarr OUT.dcm``).

The SEG references the series the store was made from: its study, its series, each SOP instance (or
each frame of a multi-frame image) and its frame of reference, and its frames lie exactly on the
source's planes, so a PACS files it beside the CT and OHIF or 3D Slicer overlay it. The source files
must still be where the run read them, unchanged (the store's fingerprint of them is checked).

One segment per class that has voxels (a class called ``background`` is left out, as segmentation
viewers expect), or the classes named with ``--class``. Each segment is coded: the built-in CT tissue
classes with SNOMED CT concepts from DICOM's CIDs 7150/7151, other classes with the ``code`` their
model config or card gives (``classes: [{name, code: {category: {scheme, value, meaning}, type:
{...}}}]``); a class without one is written under the local scheme ``99RAYMASK`` and named in the
result's ``uncoded``.

Encoding: BINARY (one bit per voxel per segment, empty frames left out). The newer LABELMAP SOP class
(2024) is smaller for many classes, but OHIF, 3D Slicer's DICOM reader, dcmqi and Debian's dciodvfy
read BINARY, and not all of them read LABELMAP yet; ``--seg-encoding labelmap`` writes it for readers
that do. Voxels the store has as nodata (255) belong to no segment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import QueryError, StoreError
from pipeline.store import COMPLETE, MaskStore
from pipeline.store.location import split_s3

SUFFIXES = (".dcm",)
LOCAL_SCHEME = "99RAYMASK"
ENCODINGS = ("binary", "labelmap")
# the built-in hu-tissue classes: (category keyword in CID 7150, type keyword and the CID holding it)
TISSUE_CODES: dict[str, tuple[str, str, str]] = {
    "air": ("Substance", "SCT", "Air"),
    "lung": ("AnatomicalStructure", "cid7151", "Lung"),
    "fat": ("Tissue", "cid7151", "AdiposeTissue"),
    "soft tissue": ("Tissue", "cid7151", "SoftTissue"),
    "bone": ("Tissue", "cid7151", "BoneTissue"),
}
BACKGROUND = "background"
REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def seg_suffix(out: str | Path) -> bool:
    return str(out).lower().endswith(SUFFIXES)


@dataclass(frozen=True)
class Segment:
    number: int  # 1-based, as DICOM numbers segments
    class_id: int
    name: str
    color: str
    code: dict[str, dict[str, str]]  # {category, type}: {scheme, value, meaning}
    coded_by: str  # "built-in" | "model" | "local"


def class_code(name: str, stored: dict[str, Any] | None) -> tuple[dict[str, dict[str, str]], str]:
    """The (category, type) concepts of a class and where they came from: the store's class entry (the
    model config or card), the built-in CT tissue table, else a local code (scheme 99RAYMASK)."""
    if stored:
        return {
            k: {f: str(stored[k][f]) for f in ("scheme", "value", "meaning")} for k in ("category", "type")
        }, "model"
    if name.lower() in TISSUE_CODES:
        from pydicom.sr.codedict import codes

        category_kw, collection, type_kw = TISSUE_CODES[name.lower()]
        category = getattr(codes.cid7150, category_kw)
        kind = getattr(getattr(codes, collection), type_kw)
        shown = {"category": category, "type": kind}
        return {
            k: {"scheme": c.scheme_designator, "value": c.value, "meaning": c.meaning} for k, c in shown.items()
        }, "built-in"
    local = {"scheme": LOCAL_SCHEME, "value": name[:64], "meaning": name[:64]}
    return {"category": {"scheme": LOCAL_SCHEME, "value": "class", "meaning": "raymask class"}, "type": local}, "local"


def choose_segments(
    classes: list[tuple[int, str, str, dict[str, Any] | None]], counts: dict[int, int], wanted: list[str] | None
) -> list[Segment]:
    """Segments for the classes (id, name, colour, stored code): the named ones, else every class
    with voxels but ``background``; numbered 1.. in class order."""
    names = {name for _, name, _, _ in classes}
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise QueryError(f"--class {unknown[0]}: no such class (classes: {', '.join(sorted(names))})")
    chosen = [
        c for c in classes if (c[1] in wanted if wanted else c[1].lower() != BACKGROUND and counts.get(c[0], 0) > 0)
    ]
    segments = []
    for number, (class_id, name, color, stored) in enumerate(chosen, start=1):
        code, source = class_code(name, stored)
        segments.append(Segment(number, class_id, name, color, code, source))
    return segments


def segment_labels(mask: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """The mask's class ids as segment numbers (0: no segment, nodata included)."""
    lut = np.zeros(256, dtype=np.uint8)
    for s in segments:
        lut[s.class_id] = s.number
    return lut[mask]


def export_seg(
    store: MaskStore, out: Path, *, classes: list[str] | None = None, encoding: str = "binary"
) -> dict[str, Any]:
    import highdicom as hd
    import pydicom

    import pipeline
    from pipeline.sources.dicom import read_dataset

    info = store.info
    if info.volume is None:
        raise QueryError(f"{store.path}: a 2-D store; DICOM SEG export is for volumes made from a DICOM series")
    if info.status != COMPLETE:
        raise StoreError(f"{store.path}: the store is {info.status}; finish the job before exporting it")
    if encoding not in ENCODINGS:
        raise QueryError(f"--seg-encoding {encoding}: use one of {', '.join(ENCODINGS)}")
    frames = source_frames(store)
    mask = np.asarray(store.mask[:])
    counts = dict(zip(*np.unique(mask, return_counts=True), strict=True))
    entries = [(c.id, c.name, c.color, c.code) for c in info.classes]
    segments = choose_segments(entries, {int(k): int(v) for k, v in counts.items()}, classes)
    if not segments:
        raise QueryError(f"{store.path}: no class has voxels to export (name one with --class)")
    labels = segment_labels(mask, segments)
    headers: dict[str, pydicom.Dataset] = {}
    for path, _ in frames:
        if path not in headers:
            headers[path] = read_dataset(path, stop_before_pixels=True)
    for path, header in headers.items():
        missing = [k for k in REFERENCED if not str(header.get(k, "") or "")]
        if missing:
            raise QueryError(
                f"{path}: no {', '.join(missing)} (an anonymised copy?); a DICOM SEG references the source's "
                "study, series and instances, so it needs them (export .nii.gz instead)"
            )
    multi = [p for p, index in frames if index is not None]
    if multi:
        if len(headers) > 1:
            raise QueryError(
                f"{store.path}: its series spans {len(headers)} files of which some are multi-frame; "
                "DICOM SEG references one multi-frame image or single-frame images"
            )
        # the SEG's frames follow the source's frame order, not the store's slice order
        order = np.argsort([index or 0 for _, index in frames])
        pixel_array = labels[order]
        source_images = list(headers.values())
    else:
        pixel_array = labels
        source_images = [headers[path] for path, _ in frames]
    model = info.model or {}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model.get("kind", "raymask"))[:64],
        family=_family(str(model.get("kind", ""))),
        version=str(model.get("identity", "-"))[:64],
        source="raymask",
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.name[:64],
            segmented_property_category=_concept(s.code["category"]),
            segmented_property_type=_concept(s.code["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_string(s.color),
        )
        for s in segments
    ]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=encoding.upper(),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_series_number(source_images[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="raymask",
        manufacturer_model_name=str(model.get("kind", "raymask"))[:64],
        software_versions=pipeline.__version__,
        device_serial_number=str(info.identity.get("job", "-"))[:64] if info.identity else "-",
        series_description=f"raymask {model.get('kind', '')} segmentation"[:64],
        content_label="RAYMASK",
        content_description=f"raymask {store.path.name}"[:64],
    )
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}")
    try:
        seg.save_as(staging)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return {
        "path": str(out),
        "format": "DICOM SEG",
        "encoding": encoding.upper(),
        "sop_class": str(seg.SOPClassUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "references": {
            "study": str(source_images[0].StudyInstanceUID),
            "series": str(source_images[0].SeriesInstanceUID),
            "instances": len(source_images),
            "frame_of_reference": str(source_images[0].FrameOfReferenceUID),
        },
        "segments": [
            {
                "number": s.number,
                "class": s.name,
                "category": s.code["category"],
                "type": s.code["type"],
                "coded_by": s.coded_by,
                "voxels": int(counts.get(s.class_id, 0)),
            }
            for s in segments
        ],
        "uncoded": [s.name for s in segments if s.coded_by == "local"],
    }


def source_frames(store: MaskStore) -> list[tuple[str, int | None]]:
    """(file, frame index or None) of each slice of the store, in the store's slice order, from the
    source series found again where the run read it and checked unchanged."""
    from pipeline.errors import SourceError
    from pipeline.sources.dicom import discover

    source = store.info.source
    if source is None or not source.paths or not source.series:
        raise StoreError(f"{store.path}: the store does not record its source DICOM series; DICOM SEG references it")
    for path in source.paths:
        if split_s3(path) is None and not Path(path).is_file():
            raise StoreError(f"{path}: a source image of {store.path} is gone; DICOM SEG references the source series")
    try:
        found, _ = discover(list(source.paths))
    except SourceError as exc:
        raise StoreError(f"{store.path}: its source series cannot be read again: {exc}") from exc
    series = next((s for s in found if s.key == source.series), None)
    if series is None or (source.fingerprint and series.fingerprint() != source.fingerprint):
        raise StoreError(
            f"{store.path}: the source files changed since the run ({source.paths[0]} ...); "
            "run the job again before exporting DICOM SEG"
        )
    if not series.positioned:
        raise StoreError(f"{store.path}: the source images have no patient positions; DICOM SEG needs them")
    depth = store.info.volume.shape[0] if store.info.volume else 0
    if len(series.frames) != depth:
        raise StoreError(f"{store.path}: {depth} slices but the source series has {len(series.frames)} frames")
    return [(f.path, f.index) for f in series.frames]


def _concept(code: dict[str, str]) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code["value"], scheme_designator=code["scheme"], meaning=code["meaning"])


def _family(kind: str) -> Any:
    from pydicom.sr.codedict import codes

    return codes.cid7162.HistogramAnalysis if kind == "hu-tissue" else codes.cid7162.ArtificialIntelligence


def _series_number(source: Any) -> int:
    try:
        return int(source.get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000
