"""Write tests/fixtures/store_digests.json: what every shipped job config's store holds.

    .venv/bin/python tools/store_digests.py            # with the code in this checkout

tests/test_pipeline.py runs every shipped config and compares its store with these digests, so a
refactoring that changes an output byte fails. The committed file was made by the code before the
layout change of issue 10 (commit 64bf161). Regenerate it only for a change meant to alter output
(or a dependency that encodes chunks differently), and say so in the commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import JOB_CONFIGS, store_digest  # noqa: E402


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in JOB_CONFIGS:
            store = Path(tmp) / f"{config.stem}.zarr"
            argv = [sys.executable, "-m", "pipeline.cli", "run", str(config.relative_to(ROOT)), "--json",
                    "--no-progress", "--set", f"output.path={store}"]  # fmt: skip
            subprocess.run(argv, check=True, capture_output=True, cwd=ROOT, stdin=subprocess.DEVNULL)
            out[config.name] = store_digest(store)
    path = ROOT / "tests" / "fixtures" / "store_digests.json"
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
