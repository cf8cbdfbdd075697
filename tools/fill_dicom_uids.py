"""Fill in the identifiers the anonymised bundled CT series left empty, so a DICOM SEG can reference it.

    .venv/bin/python tools/fill_dicom_uids.py data/dicom/ct_series

The TotalSegmentator example series keeps each image's SOP Class and SOP Instance UID only in its file
meta; SOP Class UID, SOP Instance UID, Study Instance UID and Series Instance UID are empty in the
dataset. This copies the first two from the file meta (the standard requires them equal) and derives
the study and series UIDs deterministically from the frame of reference, so running it twice changes
nothing. Only those four header elements change; the pixel data (JPEG 2000) is kept byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def fill(folder: Path) -> int:
    changed = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        pixels = ds.PixelData
        frame = str(ds.FrameOfReferenceUID)
        wanted = {
            "SOPClassUID": ds.file_meta.MediaStorageSOPClassUID,
            "SOPInstanceUID": ds.file_meta.MediaStorageSOPInstanceUID,
            "StudyInstanceUID": generate_uid(entropy_srcs=[frame, "study"]),
            "SeriesInstanceUID": generate_uid(entropy_srcs=[frame, "series"]),
        }
        todo = {k: v for k, v in wanted.items() if not str(ds.get(k, "") or "")}
        if not todo:
            continue
        for keyword, value in todo.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).PixelData == pixels
        changed += 1
    return changed


if __name__ == "__main__":
    print(f"{fill(Path(sys.argv[1]))} files filled in")
