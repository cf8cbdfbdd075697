"""What commands print: summary tables for people, JSON objects for scripts."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pipeline.core.georef import corner_bounds, crs_name
from pipeline.store import MaskStore

if TYPE_CHECKING:  # rendering needs their fields, not the run machinery (`raymask info` stays quick)
    from pipeline.jobs.batch import BatchReport
    from pipeline.jobs.run import RunSummary


def summary_json(summary: RunSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["units_per_s"] = summary.units_per_s
    return data


def render_summary(summary: RunSummary) -> str:
    lines = [
        f"store     {summary.store}  ({summary.status})",
        f"units     {summary.units_run} computed, {summary.units_skipped} skipped (already written), "
        f"{summary.units_total} in all; {summary.chunks} chunks",
        f"time      {_timing(summary)}",
        f"ran on    {summary.cluster}",
        f"stitch    {summary.stitch}: equals {summary.equals}" if summary.equals else f"exact     {summary.exact}",
        *([f"windows   {_windows(summary.windows)}"] if summary.windows else []),
        *([f"near-ties {_near_ties(summary.near_ties)}"] if summary.near_ties is not None else []),
        "",
        _class_table(summary.classes, summary.measure),
    ]
    if summary.preview:
        lines += ["", f"preview   {summary.preview}"]
    lines += [f"note      {note}" for note in summary.notes]
    return "\n".join(lines)


def _windows(windows: dict[str, Any]) -> str:
    return (
        f"{windows['computed']} computed for {windows['grid']} in the sliding-window grid "
        f"(+{100 * windows['extra']:.0f} % for windows shared by work units)"
    )


def _near_ties(count: int) -> str:
    """The pixels a whole-image (or sliding-window) pass may label differently: their top two logits tie."""
    if count == 0:
        return "0 pixels with their top two classes within 2e-4 of each other"
    return (
        f"{count} pixel{'s' if count != 1 else ''} with their top two classes within 2e-4 of each other: "
        "the only labels that float rounding may flip"
    )


def _timing(summary: RunSummary) -> str:
    """``2.9 s: Ray start 1.9 s, workers 0.3 s, units 0.6 s (15.0 units/s), regions 0.1 s``."""
    t = summary.timings
    parts = []
    if summary.engine == "ray":
        parts.append(f"Ray start {t.startup_s:.1f} s" if t.startup_s >= 0.05 else "Ray already up")
    else:
        parts.append("in this process (a small job: no Ray)")
    if summary.units_run:
        parts.append(f"workers {t.workers_s:.1f} s")
        parts.append(f"units {t.compute_s:.1f} s ({summary.units_per_s:.1f} units/s)")
    if t.regions_s:
        parts.append(f"regions {t.regions_s:.1f} s")
    return f"{summary.seconds:.1f} s: " + ", ".join(parts)


def render_batch(report: BatchReport, report_name: str) -> str:
    counts = report.counts()
    lines = [f"{'input':<48} {'status':<9} {'units':>7}  note"]
    for r in report.results:
        note = r.error or (
            f"{r.units_skipped} units already written" if r.units_skipped and r.status != "skipped" else ""
        )
        written = [name for name, where in r.exports.items() if not where.startswith("not written")]
        if written and not r.error:
            note = (note + "; " if note else "") + "exports " + ", ".join(written)
        lines.append(f"{r.input[-48:]:<48} {r.status:<9} {r.units_run:>7}  {note[:100]}")
    lines.append("")
    lines.append(
        f"{len(report.results)} inputs: {counts['done']} done, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped (already complete), "
        + (f"{counts['busy']} busy (another run holds them), " if counts["busy"] else "")
        + f"{counts['failed']} failed; {report.seconds:.1f} s"
    )
    lines.append(f"report    {report.root}/{report_name}")
    return "\n".join(lines)


def store_info(store: MaskStore) -> dict[str, Any]:
    info, raw = store.info, store.meta
    return {
        "path": str(store.path),
        "status": info.status,
        "shape": info.shape,
        "chunks": list(store.mask.chunks),
        "classes": [{"id": c.id, "name": c.name, "color": c.color} for c in info.classes],
        "nodata": info.nodata,
        "crs": info.crs,
        "transform": info.transform,
        "spacing": info.volume.spacing_mm if info.volume else None,
        **_bounds(info.crs, info.transform, info.shape),
        "affine": info.volume.affine if info.volume else None,
        "units_done": int(store.units_done().sum()),
        "units_total": int(store.units_done().size),
        "stats": info.stats,
        "regions": info.regions.model_dump(exclude={"token"}) if info.regions else None,
        "levels": info.levels or [],
        "model": raw.get("model"),  # provenance records, shown as stored
        "source": raw.get("source"),
        "raymask_version": info.raymask_version,
        "created": info.created,
        "completed": info.completed,
    }


def _bounds(crs: str | None, transform: list[float] | None, shape: list[int]) -> dict[str, Any]:
    box, lonlat, _ = corner_bounds(crs, transform, shape)
    return {"bounds": box, "bounds_lonlat": lonlat}


def _shown_box(box: list[float]) -> str:
    return ", ".join(f"{v:.6g}" for v in box) + "  (min x, min y, max x, max y)"


def render_info(info: dict[str, Any]) -> str:
    crs = info["crs"]
    lines = [
        f"store      {info['path']}",
        f"status     {info['status']}  ({info['units_done']}/{info['units_total']} work units written)",
        f"shape      {' x '.join(map(str, info['shape']))} pixels, chunks {' x '.join(map(str, info['chunks']))}",
        *(
            [f"spacing    {' x '.join(f'{v:g}' for v in info['spacing'])} mm (z, y, x)"]
            if info["spacing"]
            else [f"crs        {crs_name(crs) or 'none (pixel statistics only)'}", f"transform  {info['transform']}"]
        ),
        *(
            [f"bounds     {_shown_box(info['bounds'])} (the store's CRS)"]
            + ([f"           {_shown_box(info['bounds_lonlat'])} (lon/lat)"] if info.get("bounds_lonlat") else [])
            if info.get("bounds")
            else []
        ),
        f"model      {info['model']['kind']} ({info['model']['identity']})",
        f"source     {', '.join(info['source']['paths'])} bands {info['source']['bands']}",
    ]
    model = info["model"] or {}
    if model.get("equals"):  # stores since blended stitching say what their output equals
        lines.append(f"stitch     {model.get('stitch', 'exact')}: equals {model['equals']}")
    levels = info.get("levels") or []
    if levels:
        shown = ", ".join(" x ".join(map(str, lv["shape"])) for lv in levels)
        lines.append(f"levels     {len(levels)} lower resolutions for viewers: {shown} (at {levels[0]['mask']} ...)")
    ties = (info.get("stats") or {}).get("near_ties")
    if ties is not None:
        lines.append(f"near-ties  {_near_ties(ties)}")
    regions = info.get("regions")
    if regions:
        lines.append(
            f"regions    {regions['count']:,} ({regions['connectivity']}-connected; classes "
            f"{', '.join(regions['classes'])}): raymask regions {info['path']}"
        )
    stats = info.get("stats")
    if stats:
        lines += ["", _class_table(stats["classes"], stats.get("measure"))]
    return "\n".join(lines)


def _class_table(classes: dict[str, dict[str, Any]], measure: str | None) -> str:
    columns = {
        "m2": [("area m²", "area_m2", 18, ",.1f"), ("area ha", "area_ha", 14, ",.2f")],
        "mm3": [("volume mm³", "volume_mm3", 18, ",.1f"), ("volume mL", "volume_ml", 14, ",.2f")],
        "mm2": [("area mm²", "area_mm2", 18, ",.1f"), ("area cm²", "area_cm2", 14, ",.2f")],
    }
    extra = columns.get(measure or "", [])
    if any("regions" in row for row in classes.values()):
        extra = [*extra, ("regions", "regions", 10, ",")]
    header = f"{'class':<16}{'pixels':>14}{'share':>9}" + "".join(f"{title:>{w}}" for title, _, w, _ in extra)
    rows = [header, "-" * len(header)]
    for name, row in classes.items():
        line = f"{name:<16}{row['pixels']:>14,}{row['fraction'] * 100:>8.1f}%"
        line += "".join(
            f"{row[key]:>{w}{fmt}}" if row.get(key) is not None else f"{'-':>{w}}" for _, key, w, fmt in extra
        )
        rows.append(line)
    return "\n".join(rows)


def regions_json(view: Any, frame: Any, matched: int) -> dict[str, Any]:
    info = view.info.regions.model_dump() if view.info.regions else {}
    return {
        "store": str(view.path),
        "connectivity": info.get("connectivity"),
        "labelled_classes": info.get("classes"),
        "matched": matched,
        "shown": len(frame),
        "regions": json.loads(frame.to_json(orient="records")),
    }


def render_regions(view: Any, frame: Any, matched: int) -> str:
    info = view.info.regions.model_dump() if view.info.regions else {}
    size = "voxels" if "voxels" in frame else "pixels"
    measure = next((c for c in ("area_ha", "volume_ml", "area_mm2") if c in frame), None)
    unit = {"area_ha": "ha", "volume_ml": "mL", "area_mm2": "mm²"}.get(measure or "", "")
    where = [c for c in ("centroid_lon", "centroid_lat") if c in frame] or [
        c for c in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm") if c in frame
    ]
    means = [c for c in frame.columns if c.startswith("mean_")]
    header = f"{'id':>8}  {'class':<14}{size:>10}" + (f"{unit:>12}" if measure else "")
    header += (
        "".join(f"{c.replace('centroid_', ''):>12}" for c in where)
        + "  bbox (index)"
        + "".join(f"{c:>10}" for c in means)
    )
    lines = [
        f"store        {view.path}",
        f"regions      {info.get('count', 0):,} ({info.get('connectivity')}-connected; classes "
        f"{', '.join(info.get('classes') or [])}); {matched:,} match",
        "",
        header,
        "-" * len(header),
    ]
    axes = [a for a in ("slice", "row", "col") if f"{a}_start" in frame]
    for row in frame.to_dict(orient="records"):
        line = f"{row['id']:>8}  {row['class_name'][:13]:<14}{row[size]:>10,}"
        if measure:
            line += f"{row[measure]:>12,.3f}"
        line += "".join(f"{row[c]:>12.5f}" if "lon" in c or "lat" in c else f"{row[c]:>12.1f}" for c in where)
        line += "  " + " ".join(f"{row[f'{a}_start']}:{row[f'{a}_stop']}" for a in axes)
        line += "".join(f"{row[c]:>10.1f}" for c in means)
        lines.append(line)
    if len(frame) < matched:
        lines.append(f"... {matched - len(frame)} more (--limit N, --json or --out FILE for all)")
    return "\n".join(lines)


def render_query(result: dict[str, Any]) -> str:
    q = result["query"]
    lines = [
        f"store      {result['store']}",
        f"box        {', '.join(f'{v:g}' for v in q['bbox'])}  ({q['crs']})",
        f"window     {result['window']['start']} .. {result['window']['stop']} (index, half-open); "
        f"{result['chunks_read']} chunks read; {result['pixels']:,} valid pixels",
    ]
    if result.get("note"):
        lines.append(f"note       {result['note']}")
    lines += ["", _class_table(result["classes"], result["measure"])]
    return "\n".join(lines)


def render_point(result: dict[str, Any]) -> str:
    q = result["query"]
    lines = [f"point      {', '.join(f'{v:g}' for v in q['point'])}  ({q['crs']})"]
    if not result["inside"]:
        return "\n".join([*lines, "outside    the point is outside the image"])
    lines.append(f"index      {result['index']}")
    lines.append(f"class      {result['class_name'] if result['class_name'] is not None else 'nodata'}")
    region = result.get("region")
    if region:
        size = region.get("voxels", region.get("pixels"))
        extra = next(
            (f", {region[k]:,.3f} {u}" for k, u in (("area_ha", "ha"), ("volume_ml", "mL"), ("area_mm2", "mm²"))
             if k in region),
            "",
        )  # fmt: skip
        lines.append(f"region     {region['id']} ({region['class_name']}, {size:,} px{extra})")
    return "\n".join(lines)


def render_zones(results: list[dict[str, Any]], measure: str | None) -> str:
    lines = []
    for result in results:
        zone = result["zone"]
        label = zone["properties"].get("name", zone["properties"].get("id", ""))
        lines.append(
            f"zone {zone['index']} {label}  ({result['pixels']:,} valid pixels, {result['chunks_read']} chunks)"
        )
        lines.append(_class_table(result["classes"], measure))
        lines.append("")
    return "\n".join(lines).rstrip()
