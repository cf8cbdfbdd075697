"""The ``raymask`` command line.

Errors that raymask raises on purpose are printed on one line (``raymask: error: FILE: problem``)
and exit with status 1; usage errors exit with 2, as argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import ConfigError, RaymaskError, TransientError

EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): try again later

EPILOG_RUN = """\
examples:
  raymask run configs/aerial-vegetation.yaml
  raymask run configs/aerial-vegetation.yaml --set tiling.chunk=256 --set output.path=out/aber-256.zarr --overwrite
  raymask run configs/aerial-vegetation.yaml --set source.bands=[4,8] --set output.path=out/b4.zarr --json >s.json

A run into an existing incomplete store of the same job resumes: chunks already written are
skipped (the summary counts them). A complete store is never touched without --overwrite.
Exit status 75 (EX_TEMPFAIL) means a transient failure (cluster unreachable, workers dying):
schedulers may retry, and the retry resumes.
Every config key is listed by `raymask config-schema`.
"""

EPILOG_SUBMIT = """\
examples:
  raymask submit configs/aerial-vegetation.yaml --address http://127.0.0.1:8265
  raymask submit configs/ct-tissue.yaml --address http://head:8265 --set output.path=/shared/ct.zarr --no-wait

The config is validated here, then travels in the job's runtime environment; the current
directory travels as the job's working directory (files ignored by .gitignore stay behind),
so relative input paths mean the same on the cluster. A relative output path is made absolute
against this folder when the head runs on this machine, and refused for a remote head (it would
land in Ray's temporary copy of the folder): give a path on storage the nodes share.
The exit status is the job's: 0 if it succeeded. The raw form works too (absolute outputs):
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- raymask run CONFIG
"""

EPILOG_BATCH = """\
examples:
  raymask batch configs/archive-nightly.yaml
  raymask batch configs/archive-nightly.yaml --set output.root=out/archive --json > report.json

A matched file is one input; a matched folder is a DICOM study, split into series. Each input's
store mirrors its path under output.root. Complete stores of the same job and source are skipped,
unfinished ones resumed, and a changed source gets a new store, swapped in once complete. A failing
input is recorded in ROOT/batch-report.json and never stops the others; the exit status is 0 only
if every input succeeded.
"""

EPILOG_INFO = """\
examples:
  raymask info out/aber-vegetation.zarr
  raymask info out/aber-vegetation.zarr --json > info.json     # then .stats.classes.vegetation.area_ha
"""


EPILOG_REGIONS = """\
examples:
  raymask regions out/aber-vegetation.zarr --class vegetation --min-area 100
  raymask regions out/ct-tissue.zarr --class bone --min-volume 500 --json > bone.json
  raymask regions out/aber-vegetation.zarr --out regions.parquet          # every row, for pandas / GIS
  raymask regions out/aber-vegetation.zarr --compute --connectivity 8     # label again, 8-connected

One row per connected region of one class: id (its value in the store's regions array), size,
area (m², ha) or volume (mm³, mL), bounding box and centroid in array indices and in world
coordinates (map CRS and lon/lat; patient mm for volumes), and the mean source value (HU for CT).
Regions are labelled by the job itself (config key regions.*); --compute labels an existing store.
"""

EPILOG_QUERY = """\
examples:
  raymask query out/aber-vegetation.zarr --bbox -4.09,52.40,-4.06,52.42 --crs EPSG:4326
  raymask query out/aber-vegetation.zarr --bbox 257600,279500,258600,280500      # the store's own CRS
  raymask query out/aber-vegetation.zarr --point -4.08,52.41 --crs EPSG:4326 --json
  raymask query out/ct-tissue.zarr --bbox -100,-250,-800,100,-50,-780         # patient mm (LPS)
  raymask query out/ct-tissue.zarr --bbox 0,0,0,256,256,10 --crs pixel        # voxel indices x,y,z

A pixel counts when its centre lies in the box (edges included). --bbox is MINX,MINY,MAXX,MAXY
(volumes: XMIN,YMIN,ZMIN,XMAX,YMAX,ZMAX); --crs takes anything PROJ knows (EPSG:4326, WKT, ...),
'pixel' for column/row(/slice) coordinates, 'patient' for volume mm; the default is the store's.
Only the chunks that the box touches are read. A box outside the image gives an empty result.
"""

EPILOG_ZONES = """\
examples:
  raymask zones out/aber-vegetation.zarr data/zones/aber-fields.geojson
  raymask zones out/aber-vegetation.zarr data/zones/aber-fields.geojson --json > zones.json
  raymask zones out/aber-vegetation.zarr data/zones/aber-fields-bng.geojson --crs EPSG:27700

Polygons and MultiPolygons are reprojected to the store's CRS (edges densified); a pixel belongs
to a zone when its centre lies inside. GeoJSON is WGS84 lon/lat unless the file names a crs or
--crs says otherwise. Each zone is computed chunk by chunk; zones may overlap.
"""


EPILOG_MODEL = """\
examples:
  raymask model show models/polyp/MODEL.yaml
  raymask model show models/polyp/model.pt --json         # the card beside the weights

  raymask model check models/polyp/model.pt --stride 4    # equivariant? receptive radius? the halo

A job config can name just the card, and override what it states:
  model: {card: models/polyp/MODEL.yaml, receptive_radius: 32}
The number of classes, the kind and the dimensions are fixed by the weights: a config that says
otherwise is an error, not an override.
"""


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and "obstore" in sys.modules:
        # The command line, after object storage was used: obstore's runtime threads can abort the
        # interpreter while it finalizes (SIGABRT after the command's own output, seen now and then
        # after an S3 request). Everything is written and closed by now; leave without finalizing.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(_join_coordinates(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args))
    except RaymaskError as exc:
        print(f"raymask: error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(exc, TransientError) else 1
    except KeyboardInterrupt:
        print("raymask: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `raymask regions ... | head`: the reader left, which is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush stays quiet
        return 141  # what a shell reports for a command killed by SIGPIPE
    except OSError as exc:  # disk full, quota, read-only filesystem, permissions: the file and what to do
        from pipeline.errors import os_error_line

        print(f"raymask: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


def _join_coordinates(argv: list[str]) -> list[str]:
    """``--bbox -4.09,52.40,...``: argparse would take the negative number for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--bbox", "--point") and i + 1 < len(argv) and argv[i + 1][:1] == "-" and "," in argv[i + 1]:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymask",
        description="Segment large GeoTIFFs and DICOM volumes with Ray actors into georeferenced or volumetric "
        "zarr mask stores, with exact tiling, per-class areas and volumes, connected regions, and queries.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `raymask run configs/aerial-vegetation.yaml`, then `raymask info`, `raymask regions` "
        "and `raymask query` on the store it prints.\n\n"
        "Exit status: 0 done; 1 an error to fix (input, config, store; one line on stderr names it); "
        f"{EXIT_TRANSIENT} a transient failure (a cluster out of reach, workers that kept dying): the same "
        "command again resumes; 2 a usage error; 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"raymask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a job config: tile, predict on Ray actors, write a mask store",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="job YAML (source, model, tiling, output, runtime)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by its dotted path, e.g. tiling.halo=32 (repeatable)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing store at output.path")
    run.add_argument(
        "--wait", action="store_true", help="if another run is writing the store, wait for it (default: exit 1)"
    )
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.set_defaults(func=_cmd_run)

    submit = sub.add_parser(
        "submit",
        help="submit a job config to a Ray cluster (Ray Jobs API), follow its logs, exit with its status",
        epilog=EPILOG_SUBMIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("config", help="job YAML; validated here before anything is sent")
    submit.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        metavar="URL",
        help="the cluster's dashboard / jobs API, e.g. http://HEAD:8265 (or RAY_API_SERVER_ADDRESS)",
    )
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--overwrite", action="store_true", help="replace an existing store at output.path")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.set_defaults(func=_cmd_submit)

    batch = sub.add_parser(
        "batch",
        help="run one model over every input a batch config's globs find; skip what is done; report",
        epilog=EPILOG_BATCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("config", help="batch YAML: inputs (globs), source, model, tiling, output.root, runtime")
    batch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    batch.add_argument("--json", action="store_true", help="print the batch report as JSON on stdout")
    batch.add_argument("--no-progress", action="store_true")
    batch.set_defaults(func=_cmd_batch)

    catalog = sub.add_parser("catalog", help="list every store under a folder: source, status, class areas or volumes")
    catalog.add_argument("root")
    catalog.add_argument("--json", action="store_true", help="one JSON list on stdout")
    catalog.add_argument("--out", metavar="FILE", help="also write the table as .csv or .parquet")
    catalog.add_argument("--overwrite", action="store_true", help="with --out: replace FILE if it exists")
    catalog.add_argument(
        "--polygons",
        action="store_true",
        help="with --out FILE.parquet: write every 2-D store's region polygons into one GeoParquet instead, a "
        "`store` column naming each feature's store (one CRS kept; several reprojected to lon/lat)",
    )
    catalog.set_defaults(func=_cmd_catalog)

    serve = sub.add_parser(
        "serve",
        help="look at stores in the browser: a catalog, maps with the mask over the image, CT slices",
        description="Serve a store, or a folder of stores, read-only on http://HOST:PORT: a catalog page, a map "
        "page per 2-D store (the source image with the mask on top, the legend with each class's area, click for "
        "the class and region, the region table), a volume page per CT store (axial, coronal and sagittal slices "
        "with window presets and the labels over them), and the JSON API they use (/api/stores/...; see the "
        "README). Stores being written show their progress. Ctrl-C stops it.",
    )
    serve.add_argument("path", help="a store (NAME.zarr) or a folder of stores, e.g. out/")
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8765, help="the port (default 8765; 0 picks a free one)")
    serve.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="server processes sharing the port (default: the CPUs, at most 4); tiles are CPU work",
    )
    serve.set_defaults(func=_cmd_serve)

    info = sub.add_parser(
        "info",
        help="show a store's status, georeference, classes and statistics",
        epilog=EPILOG_INFO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("store", help="a .zarr store written by raymask")
    info.add_argument("--json", action="store_true", help="one JSON object on stdout")
    info.set_defaults(func=_cmd_info)

    regions = sub.add_parser(
        "regions",
        help="list a store's connected regions (or label them with --compute)",
        epilog=EPILOG_REGIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    regions.add_argument("store")
    regions.add_argument(
        "--class", dest="classes", action="append", metavar="NAME", help="only this class (repeatable)"
    )
    regions.add_argument("--min-pixels", type=int, metavar="N", help="only regions of at least N pixels (voxels)")
    regions.add_argument("--min-area", type=float, metavar="A", help="only regions of at least A m² (mm² for images)")
    regions.add_argument("--min-volume", type=float, metavar="V", help="only regions of at least V mm³ (volumes)")
    regions.add_argument("--sort", choices=["size", "id"], default="size", help="row order (default: largest first)")
    regions.add_argument("--limit", type=int, metavar="N", help="at most N rows (the table shows 20 unless given)")
    regions.add_argument("--json", action="store_true", help="one JSON object on stdout")
    regions.add_argument("--out", metavar="FILE", help="also write the rows as .csv or .parquet")
    regions.add_argument("--overwrite", action="store_true", help="with --out: replace FILE if it exists")
    regions.add_argument("--compute", action="store_true", help="label the regions now (replaces existing ones)")
    regions.add_argument("--connectivity", type=int, choices=[4, 8, 6, 18, 26], help="with --compute: neighbours")
    regions.add_argument(
        "--classes", dest="label_classes", metavar="A,B", help="with --compute: classes to label (default all)"
    )
    regions.add_argument(
        "--address", default=None, help="with --compute: a Ray cluster (default embedded / RAY_ADDRESS)"
    )
    regions.add_argument("--no-progress", action="store_true")
    regions.set_defaults(func=_cmd_regions)

    query = sub.add_parser(
        "query",
        help="class areas inside a box, or the class and region at a point, in any CRS",
        epilog=EPILOG_QUERY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument("store")
    where = query.add_mutually_exclusive_group(required=True)
    where.add_argument("--bbox", metavar="MINX,MINY,MAXX,MAXY", help="a box (6 numbers for volumes)")
    where.add_argument("--point", metavar="X,Y", help="a point (X,Y,Z for volumes)")
    query.add_argument("--crs", metavar="CRS", help="the coordinates' CRS: EPSG:4326, WKT, pixel, patient")
    query.add_argument("--json", action="store_true", help="one JSON object on stdout")
    query.set_defaults(func=_cmd_query)

    zones = sub.add_parser(
        "zones",
        help="class areas inside each polygon of a GeoJSON file",
        epilog=EPILOG_ZONES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    zones.add_argument("store")
    zones.add_argument("geojson", help="a GeoJSON FeatureCollection, Feature or (Multi)Polygon")
    zones.add_argument("--crs", metavar="CRS", help="the file's CRS if it is not lon/lat (or names none)")
    zones.add_argument("--json", action="store_true", help="one JSON list on stdout")
    zones.set_defaults(func=_cmd_zones)

    export = sub.add_parser(
        "export",
        help="write a store's mask as a Cloud-Optimized GeoTIFF, or its regions as polygons",
        description="OUT's suffix picks the format: .tif a Cloud-Optimized GeoTIFF of the class ids (or, with "
        "--probabilities, the class probabilities); .parquet (GeoParquet 1.1), .fgb, .gpkg or .geojson (WGS84) one "
        "polygon per region with the region table's columns, its exact pixel-edge outline (area = pixels x pixel "
        "area), streamed chunk by chunk (QGIS, GDAL, geopandas, DuckDB, BigQuery); .nii.gz (or .nii) a volume's "
        "labels as NIfTI-1 in RAS with OUT.json naming the classes (3D Slicer, ITK-SNAP, nibabel); .dcm a volume's "
        "labels as a DICOM Segmentation referencing its source series, one coded segment per class with voxels "
        "(a PACS, OHIF, 3D Slicer; the source files must still be where the run read them).",
    )
    export.add_argument("store")
    export.add_argument(
        "out",
        help="output path: .tif, .parquet, .fgb, .gpkg, .geojson, .nii.gz or .dcm (never one of the store's inputs)",
    )
    export.add_argument(
        "--class", dest="classes", action="append", metavar="NAME",
        help="polygons: only regions of this class; DICOM SEG: only this class's segment (repeat for several)",
    )  # fmt: skip
    export.add_argument(
        "--min-area", type=float, metavar="A", help="polygons: only regions of at least A m² (mm² for images)"
    )
    export.add_argument(
        "--simplify",
        type=float,
        metavar="TOLERANCE",
        help="polygons: simplify each outline within TOLERANCE (CRS units), keeping it valid; areas then change",
    )
    export.add_argument("--connectivity", type=int, choices=(4, 8),
                        help="polygons: the connectivity the store's regions must have")  # fmt: skip
    export.add_argument("--json", action="store_true", help="print what was written as JSON")
    export.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument(
        "--probabilities",
        action="store_true",
        help="write the per-class probabilities (one uint8 band per class, p x 254; the job needs "
        "output.probabilities: true) instead of the class ids",
    )
    export.add_argument(
        "--seg-encoding",
        choices=("binary", "labelmap"),
        default="binary",
        help="DICOM SEG: binary (default: one bit per voxel per segment; read by OHIF, 3D Slicer, dcmqi, dciodvfy) "
        "or labelmap (the 2024 Label Map SEG: one value per voxel; fewer readers know it)",
    )
    export.set_defaults(func=_cmd_export)

    model = sub.add_parser(
        "model",
        help="model cards: show what a network is and needs (MODEL.yaml beside its weights)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_MODEL,
    )
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    show = model_sub.add_parser("show", help="print a model card: classes, bands, scaling, stride, radius, stitching")
    show.add_argument("path", help="a MODEL.yaml, the folder holding it, or the weights file beside it")
    show.add_argument("--json", action="store_true", help="the card as JSON on stdout")
    show.set_defaults(func=_cmd_model_show)

    check = model_sub.add_parser(
        "check",
        help="measure whether a network is translation-equivariant and its receptive radius: the stitching it needs",
    )
    check.add_argument("path", help="the weights (.pt, .pt2, .onnx), or a MODEL.yaml / its folder")
    check.add_argument("--bands", type=int, help="input bands (default: the card's bands, else the first layer's)")
    check.add_argument("--dims", type=int, choices=(2, 3), help="2 or 3 (default: the card's, else 2)")
    check.add_argument("--stride", type=int, help="total downsampling (default: the card's, else 1)")
    check.add_argument("--window", type=int, help="side of the test window in pixels (default 128 in 2-D, 40 in 3-D)")
    check.add_argument(
        "--write", action="store_true", help="write the result into the card (MODEL.yaml), made if missing"
    )
    check.add_argument("--json", action="store_true", help="the measurements as JSON on stdout")
    check.set_defaults(func=_cmd_model_check)

    train = sub.add_parser(
        "train",
        help="train a segmentation network on labelled images with Ray Train: a model folder `raymask run` takes",
        description="Train a MONAI network (UNet, BasicUNet, SegResNet, DynUNet) or a DeepLabV3+-style one, 2-D or "
        "3-D, on image + label pairs read by raymask's own readers (rasters and label rasters; frames and mask PNGs; "
        "DICOM series and NIfTI or DICOM SEG labels), on Ray Train workers (config: workers, gpu). The validation "
        "split is by file. Every epoch writes OUTPUT/checkpoints/last.pt; run the same command again after a crash "
        "and it resumes. OUTPUT ends with the model (config export: model.pt TorchScript, model.pt2 torch.export or "
        "model.onnx), MODEL.yaml (classes, bands, normalisation, stride, the measured "
        "receptive radius), metrics.json (per class IoU, Dice, precision, recall on the validation files) and "
        "loss.png. Then: raymask run JOB with model: {card: OUTPUT/MODEL.yaml}.",
    )
    train.add_argument(
        "config", help="training YAML (pairs or images + labels, classes, network, patch, epochs, output)"
    )
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key by its dotted path, e.g. epochs=3 (repeatable)")  # fmt: skip
    train.add_argument("--address", default=None, help="a Ray cluster (default: an embedded Ray / RAY_ADDRESS)")
    train.add_argument("--json", action="store_true", help="print the result (metrics, history) as JSON on stdout")
    train.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a mask store against reference labels: per class IoU, Dice, precision, recall, confusion",
        description="Compare a complete store with reference labels on its grid, chunk by chunk (memory: one "
        "chunk): a one-band label raster for a 2-D store; a NIfTI label image or a DICOM SEG for a volume (checked "
        "against the store's patient affine; segments match classes by label, else by number). Pixels the store "
        "left without a prediction count as misses.",
    )
    evaluate.add_argument("store", help="a mask store (NAME.zarr)")
    evaluate.add_argument("labels", help="the reference labels (.tif/.png, .nii.gz, SEG .dcm): class ids, or values "
                          "mapped with --label-values")  # fmt: skip
    evaluate.add_argument("--label-values", default=None, metavar="V0,V1,...",
                          help="the label file's value of each class, e.g. 0,255 for a mask")  # fmt: skip
    evaluate.add_argument("--json", action="store_true", help="the scores as JSON on stdout")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    evaluate.set_defaults(func=_cmd_evaluate)

    schema = sub.add_parser(
        "config-schema",
        help="print the JSON schema of job configs (--batch: batch configs, --train: training configs): every key, "
        "type, default, meaning",
    )
    schema.add_argument("--batch", action="store_true", help="the schema of `raymask batch` configs")
    schema.add_argument("--train", action="store_true", help="the schema of `raymask train` configs")
    schema.set_defaults(func=_cmd_schema)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.jobs.report import render_summary, summary_json
    from pipeline.jobs.run import run_job

    config = load_config(args.config, args.overrides)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the summary only (Ray prints raylet errors there)
        summary = run_job(config, overwrite=args.overwrite, progress=_progress(args), wait=args.wait)
    if args.json:
        print(json.dumps(summary_json(summary), indent=2))
    else:
        print(render_summary(summary))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.jobs.submit import submit

    if not args.address:
        raise ConfigError("raymask submit needs --address http://HEAD:8265 (or RAY_API_SERVER_ADDRESS)")
    config = load_config(args.config, args.overrides)
    _, status = submit(
        config, address=args.address, working_dir=Path.cwd(), overwrite=args.overwrite, follow=not args.no_wait
    )
    if args.no_wait:
        return 0 if status != "FAILED" else 1
    return 0 if status == "SUCCEEDED" else 1


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: in a pipe, a cron mail or a CI log they are noise."""
    return not (args.no_progress or args.json) and sys.stderr.isatty()


def _cmd_batch(args: argparse.Namespace) -> int:
    from pipeline.config import load_batch_config
    from pipeline.jobs.batch import REPORT, run_batch
    from pipeline.jobs.report import render_batch

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report only
        report = run_batch(load_batch_config(args.config, args.overrides), progress=_progress(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else render_batch(report, REPORT))
    failed = [r for r in report.results if r.status == "failed"]
    if failed:  # one line on stderr too, for cron mail and CI logs: how many, the first, where the rest are
        first = failed[0].error or "failed"
        print(
            f"raymask: error: {len(failed)} of {len(report.results)} inputs failed; first: {first} "
            f"(every error: {Path(report.root) / REPORT})",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.viewer.server import make_server, serve

    try:
        server = make_server(args.path, args.host, args.port)
    except OSError as exc:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{args.host}:{args.port}: cannot listen there ({exc.strerror or exc})") from exc
    host, port = str(server.server_address[0]), int(server.server_address[1])
    print(f"raymask: serving {args.path} on http://{host}:{port}/ (read-only; Ctrl-C stops)", flush=True)
    try:
        serve(server, max(1, args.workers))
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _cmd_catalog(args: argparse.Namespace) -> int:
    from pipeline.store.catalog import catalog_rows, render, write_table_file
    from pipeline.store.outputs import guard_output

    out = guard_output(args.out, overwrite=args.overwrite) if args.out else None
    if args.polygons:
        from pipeline.errors import QueryError
        from pipeline.query.polygons import merge_polygons
        from pipeline.store.catalog import find_stores
        from pipeline.store.location import store_path

        if out is None or out.suffix.lower() != ".parquet":
            raise QueryError("--polygons: give --out FILE.parquet (the merged polygons are GeoParquet)")
        stores = find_stores(args.root)
        root = store_path(args.root)
        result = merge_polygons(root, stores, out, progress=sys.stderr.isatty())
        for name, reason in result["skipped"].items():
            print(f"raymask: note: {name}: no polygons ({reason})", file=sys.stderr)
        print(
            json.dumps(result, indent=2)
            if args.json
            else f"{out}: {result['features']} polygons from {len(result['stores'])} stores ({result['crs']})"
        )
        return 0
    rows = catalog_rows(args.root)
    if out is not None:
        write_table_file(rows, out)
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_train_config
    from pipeline.jobs.train import run_training

    config = load_train_config(args.config, args.overrides)
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints a raylet's "a worker died" on stdout: not in the JSON
        report = run_training(config, address=args.address, progress=_progress(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    resumed = f", resumed after epoch {report['resumed_from']}" if report["resumed_from"] else ""
    print(
        f"model     {report['model']} (epoch {report['best_epoch']} of {report['epochs']}{resumed}: "
        "the best on the validation files)"
    )
    print(f"card      {report['card']} (stride {report['stride']}, receptive radius {report['receptive_radius']} px)")
    print(f"validated on {', '.join(report['validation'])}")
    _print_scores(report["classes"]["per_class"])
    return 0


def _print_scores(per_class: dict[str, dict[str, Any]]) -> None:
    def shown(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"{'class':<16} {'IoU':>6} {'Dice':>6} {'prec.':>6} {'recall':>6} {'pixels':>10}")
    for name, m in per_class.items():
        print(f"{name:<16} {shown(m['iou']):>6} {shown(m['dice']):>6} {shown(m['precision']):>6} "
              f"{shown(m['recall']):>6} {m['pixels']:>10,}")  # fmt: skip


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.jobs.evaluate import evaluate_store

    values = None
    if args.label_values:
        try:
            values = [float(v) for v in args.label_values.split(",")]
        except ValueError:
            raise ConfigError(f"--label-values {args.label_values!r}: numbers separated by commas") from None
    report = evaluate_store(args.store, args.labels, values, progress=_progress(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_scores(report["per_class"])
    accuracy = report["accuracy"]
    print(f"pixel accuracy {accuracy:.4f} over {report['pixels']:,} labelled pixels" if accuracy is not None else
          "no labelled pixels")  # fmt: skip
    if report["unpredicted"]:
        print(f"{report['unpredicted']:,} labelled pixels have no prediction in the store (counted as misses)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pipeline.jobs.report import render_info, store_info
    from pipeline.store import MaskStore

    info = store_info(MaskStore.open(args.store))
    print(json.dumps(info, indent=2) if args.json else render_info(info))
    return 0


def _cmd_regions(args: argparse.Namespace) -> int:
    from pipeline.jobs.report import regions_json, render_regions
    from pipeline.query import open_store
    from pipeline.store.outputs import guard_output, store_inputs

    if args.compute:
        from pipeline.config import RegionsConfig
        from pipeline.jobs.run import label_existing

        classes = [c.strip() for c in args.label_classes.split(",")] if args.label_classes else None
        config = RegionsConfig(connectivity=args.connectivity, classes=classes)
        _, notes = label_existing(args.store, config, address=args.address, progress=_progress(args))
        for note in notes:
            print(f"raymask: note: {note}", file=sys.stderr)
    elif args.connectivity or args.label_classes:
        raise ConfigError("--connectivity and --classes apply with --compute")
    view = open_store(args.store)
    if args.out:  # refused before any work, as every writing command does
        out = guard_output(args.out, inputs=store_inputs(view._store), overwrite=args.overwrite)
    elif args.overwrite:
        raise ConfigError("--overwrite applies with --out")
    frame = view.regions(args.classes, min_pixels=args.min_pixels, min_area=args.min_area, min_volume=args.min_volume)
    size = "voxels" if "voxels" in frame else "pixels"
    frame = frame.sort_values([size, "id"], ascending=[False, True]) if args.sort == "size" else frame.sort_values("id")
    if args.out:
        from pipeline.store.catalog import write_frame

        write_frame(frame, out)
    shown = frame if args.limit is None and args.json else frame.head(args.limit or 20)
    if args.json:
        print(json.dumps(regions_json(view, shown, len(frame)), indent=2))
    else:
        print(render_regions(view, shown, len(frame)))
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from pipeline.core.selection import parse_numbers
    from pipeline.jobs.report import render_point, render_query
    from pipeline.query import incomplete_warnings, open_store

    view = open_store(args.store)
    for warning in incomplete_warnings(view):
        print(f"raymask: warning: {warning}", file=sys.stderr)
    ndim = len(view.shape)
    if args.bbox:
        result = view.area(parse_numbers(args.bbox, (2 * ndim,), "--bbox"), crs=args.crs)
        print(json.dumps(result, indent=2) if args.json else render_query(result))
    else:
        result = view.at(parse_numbers(args.point, (ndim,), "--point"), crs=args.crs)
        print(json.dumps(result, indent=2) if args.json else render_point(result))
    return 0


def _cmd_zones(args: argparse.Namespace) -> int:
    from pipeline.jobs.report import render_zones
    from pipeline.query import incomplete_warnings, open_store

    view = open_store(args.store)
    for warning in incomplete_warnings(view):
        print(f"raymask: warning: {warning}", file=sys.stderr)
    results = view.zones(args.geojson, crs=args.crs)
    print(json.dumps(results, indent=2) if args.json else render_zones(results, view.measure_unit))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.errors import QueryError
    from pipeline.query.export import export_geotiff
    from pipeline.query.nifti import export_nifti, nifti_suffix, side_file
    from pipeline.query.polygons import export_polygons, polygon_suffix
    from pipeline.query.seg import export_seg, seg_suffix
    from pipeline.store import COMPLETE, MaskStore
    from pipeline.store.outputs import check_writable_folder, guard_output, store_inputs

    store = MaskStore.open(args.store)
    out = guard_output(args.out, inputs=store_inputs(store), overwrite=args.overwrite)
    if polygon_suffix(out):
        check_writable_folder(out)
        result = export_polygons(
            store, out, classes=args.classes, min_area=args.min_area, simplify=args.simplify,
            connectivity=args.connectivity, progress=_progress(args),
        )  # fmt: skip
        print(
            json.dumps(result, indent=2) if args.json else f"{out}: {result['features']} polygons ({result['format']})"
        )
        return 0
    if nifti_suffix(out):
        guard_output(side_file(out), inputs=store_inputs(store), overwrite=args.overwrite)
        check_writable_folder(out)
        result = export_nifti(store, out)
        print(json.dumps(result, indent=2) if args.json else f"{out}: NIfTI-1 labels, classes in {result['labels']}")
        return 0
    if seg_suffix(out):
        check_writable_folder(out)
        result = export_seg(store, out, classes=args.classes, encoding=args.seg_encoding)
        for name in result["uncoded"]:
            print(
                f"raymask: warning: class {name!r} has no code in its model config or card; written under the local "
                "scheme 99RAYMASK (give classes: [{name, code: {category, type}}] for SNOMED CT codes)",
                file=sys.stderr,
            )
        shown = ", ".join(s["class"] for s in result["segments"])
        print(
            json.dumps(result, indent=2) if args.json else f"{out}: DICOM SEG ({result['encoding']}), segments {shown}"
        )
        return 0
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise QueryError(
            f"{out}: unknown export format {out.suffix or '(no suffix)'}; "
            "use .tif, .parquet, .fgb, .gpkg, .geojson, .nii.gz or .dcm"
        )
    if not args.probabilities:  # GDAL keeps the class names and attribute table in OUT.tif.aux.xml
        guard_output(out.with_name(out.name + ".aux.xml"), inputs=store_inputs(store), overwrite=args.overwrite)
    if store.status != COMPLETE:
        print(f"raymask: warning: {args.store} is {store.status}; unwritten chunks export as nodata", file=sys.stderr)
    out = export_geotiff(store, out, probabilities=args.probabilities)
    print(out)
    return 0


def _cmd_model_show(args: argparse.Namespace) -> int:
    from pipeline.card import describe_card
    from pipeline.config import load_card

    card, path = load_card(args.path)
    if args.json:
        print(json.dumps({"card": str(path), **card.model_dump(mode="json", exclude_none=True)}, indent=2))
        return 0
    rows = describe_card(card, path)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _cmd_model_check(args: argparse.Namespace) -> int:
    from pipeline.jobs.model_check import run_check

    result, written = run_check(
        args.path, bands=args.bands, dims=args.dims, stride=args.stride, window=args.window, write=args.write
    )
    if args.json:
        print(json.dumps({**result.to_json(), "card_written": str(written) if written else None}, indent=2))
        return 0
    print(f"{args.path}: {result.summary()}")
    if written:
        print(f"wrote {written}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.config import json_schema

    print(json.dumps(json_schema(batch=args.batch, train=args.train), indent=2))
    return 0
