"""Screenshots of the viewer's pages over a folder of stores (``make demo``: out/), taken in Debian's
headless Chromium: FOLDER/viewer-catalog.png, viewer-map.png (the first map store) and
viewer-volume.png (the first volume store). ``--docs`` also writes small copies for the README under
docs/. Without chromium and chromedriver it says so in one line and exits 0.

    python tools/screenshots.py out [--docs]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--docs", action="store_true", help="also write docs/viewer-*.png (800 px wide)")
    args = parser.parse_args()
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("raymask: note: screenshots skipped: Debian's chromium and chromium-driver are not installed")
        return 0
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.viewer.server import make_server

    server = make_server(args.folder, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        "--disable-gpu",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    written = []
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(base + "/api/stores", timeout=60) as response:
            stores = json.loads(response.read())
        pages = [("catalog", "/")]
        for kind in ("map", "volume"):
            first = next((s["name"] for s in stores if s.get("kind") == kind), None)
            if first:
                pages.append((kind, f"/{kind}/{first}"))
        for name, path in pages:
            browser.get(base + path)
            WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
            if name == "volume":  # the largest region's slices (the header sorts by volume, largest first)
                header = [
                    h for h in browser.find_elements("css selector", "#regions th") if h.text.startswith("volume_ml")
                ]
                if header:
                    header[0].click()
                    time.sleep(1.0)
                    rows = browser.find_elements("css selector", "#regions tbody tr")
                    if rows:
                        rows[0].click()
            time.sleep(1.5)  # tiles and slices arriving
            out = args.folder / f"viewer-{name}.png"
            browser.save_screenshot(str(out))
            written.append(out)
            if args.docs and name in ("map", "volume"):
                from PIL import Image

                image = Image.open(out)
                small = image.convert("RGB").resize((800, round(image.height * 800 / image.width)), Image.LANCZOS)
                small.quantize(colors=128).save(ROOT / "docs" / f"viewer-{name}.png", optimize=True)
    finally:
        browser.quit()
        server.shutdown()
    print("screenshots: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
