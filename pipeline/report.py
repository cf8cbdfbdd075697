"""What commands print: summary tables for people, JSON objects for scripts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pipeline.batch import BatchReport
from pipeline.execute import RunSummary
from pipeline.store import MaskStore


def summary_json(summary: RunSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["units_per_s"] = summary.units_per_s
    return data


def render_summary(summary: RunSummary) -> str:
    lines = [
        f"store     {summary.store}  ({summary.status})",
        f"tiles     {summary.units_run} computed, {summary.units_skipped} skipped (already written), "
        f"{summary.units_total} in all; {summary.chunks} chunks",
        f"time      {summary.seconds:.1f} s  ({summary.units_per_s:.2f} tiles/s)",
        f"exact     {'yes: tiled output equals whole-image inference' if summary.exact else 'no'}",
        "",
        _class_table(summary.classes, summary.measure),
    ]
    if summary.preview:
        lines += ["", f"preview   {summary.preview}"]
    lines += [f"note      {note}" for note in summary.notes]
    return "\n".join(lines)


def render_batch(report: BatchReport, report_name: str) -> str:
    counts = report.counts()
    lines = [f"{'input':<48} {'status':<9} {'tiles':>7}  note"]
    for r in report.results:
        note = r.error or (
            f"{r.units_skipped} tiles already written" if r.units_skipped and r.status != "skipped" else ""
        )
        lines.append(f"{r.input[-48:]:<48} {r.status:<9} {r.units_run:>7}  {note[:100]}")
    lines.append("")
    lines.append(
        f"{len(report.results)} inputs: {counts['done']} done, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped (already complete), {counts['failed']} failed; {report.seconds:.1f} s"
    )
    lines.append(f"report    {report.root}/{report_name}")
    return "\n".join(lines)


def store_info(store: MaskStore) -> dict[str, Any]:
    meta = store.meta
    return {
        "path": str(store.path),
        "status": meta.get("status"),
        "shape": meta.get("shape"),
        "chunks": list(store.mask.chunks),
        "classes": [{"id": c["id"], "name": c["name"], "color": c["color"]} for c in meta.get("classes", [])],
        "nodata": meta.get("nodata"),
        "crs": meta.get("crs"),
        "transform": meta.get("transform"),
        "spacing": (meta.get("volume") or {}).get("spacing_mm"),
        "affine": (meta.get("volume") or {}).get("affine"),
        "units_done": int(store.units_done().sum()),
        "units_total": int(store.units_done().size),
        "stats": meta.get("stats"),
        "model": meta.get("model"),
        "source": meta.get("source"),
        "raymask_version": meta.get("raymask_version"),
        "created": meta.get("created"),
        "completed": meta.get("completed"),
    }


def render_info(info: dict[str, Any]) -> str:
    crs = info["crs"]
    crs_name = crs.split('"')[1] if crs and '"' in crs else crs
    lines = [
        f"store      {info['path']}",
        f"status     {info['status']}  ({info['units_done']}/{info['units_total']} work units written)",
        f"shape      {' x '.join(map(str, info['shape']))} pixels, chunks {' x '.join(map(str, info['chunks']))}",
        *(
            [f"spacing    {' x '.join(f'{v:g}' for v in info['spacing'])} mm (z, y, x)"]
            if info["spacing"]
            else [f"crs        {crs_name or 'none (pixel statistics only)'}", f"transform  {info['transform']}"]
        ),
        f"model      {info['model']['kind']} ({info['model']['identity']})",
        f"source     {', '.join(info['source']['paths'])} bands {info['source']['bands']}",
    ]
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
    header = f"{'class':<16}{'pixels':>14}{'share':>9}" + "".join(f"{title:>{w}}" for title, _, w, _ in extra)
    rows = [header, "-" * len(header)]
    for name, row in classes.items():
        line = f"{name:<16}{row['pixels']:>14,}{row['fraction'] * 100:>8.1f}%"
        line += "".join(f"{row[key]:>{w}{fmt}}" for _, key, w, fmt in extra)
        rows.append(line)
    return "\n".join(rows)
