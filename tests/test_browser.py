"""The viewer's pages in a real browser (issue 15): Debian's headless Chromium driven through Selenium
and Debian's chromedriver (the two come from one Debian source package, so their versions always
match, and nothing is downloaded at test time; Playwright would want its own browser build). Each
page loads without console errors; the legend's areas are the store's; a click on a known pixel
shows the class and region the store holds there; the volume page shows the CT's slice count.

`make test` installs `chromium` and `chromium-driver` where they are missing; elsewhere these tests
are skipped with the reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import MaskStore

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # a browser per module
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed"),
]


@pytest.fixture(scope="module")
def site(shipped_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:  # type: ignore[no-untyped-def]
    from tests.test_viewer import serving

    root = tmp_path_factory.mktemp("site")
    with serving(shipped_store, root, {"aerial-vegetation.yaml": "aber.zarr", "ct-tissue.yaml": "ct.zarr"}) as base:
        yield base, root


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                 "--disable-gpu", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def load(driver, url: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # what earlier pages said is not this page's
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def console_errors(driver) -> list[str]:  # type: ignore[no-untyped-def]
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_catalog_page_lists_both_stores(browser, site) -> None:  # type: ignore[no-untyped-def]
    base, _ = site
    load(browser, base + "/")
    rows = browser.find_elements("css selector", "#stores tbody tr")
    assert sorted(r.get_attribute("data-store") for r in rows) == ["aber.zarr", "ct.zarr"]
    assert "complete" in rows[0].text
    assert console_errors(browser) == []


def test_the_map_page_shows_the_store_s_areas_and_what_is_under_a_click(browser, site) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.query.view import open_store

    base, root = site
    load(browser, base + "/map/aber.zarr")
    store = MaskStore.open(root / "aber.zarr")
    stats = store.info.stats["classes"]
    for label in browser.find_elements("css selector", "#legend label"):
        name = label.get_attribute("data-class-name")
        shown = label.find_element("css selector", ".measure").text
        number, unit = shown.rsplit(" ", 1)
        assert unit == "ha" and float(number.replace(",", "")) == pytest.approx(stats[name]["area_ha"], rel=1e-5), (
            name, shown,
        )  # fmt: skip
    # click the pixel at row 120, column 70: the page turns map coordinates back into that pixel
    browser.execute_script("const m = window.raymaskMap; m.map.fire('click', {latlng: m.toLatLng(120.5, 70.5)});")
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "info").get_attribute("data-region"))
    info = browser.find_element("id", "info")
    expected = open_store(root / "aber.zarr").at((70.5, 120.5), crs="pixel")
    assert info.get_attribute("data-class-name") == expected["class_name"]
    assert info.get_attribute("data-region") == str(expected["region"]["id"])
    tiles = browser.execute_script("return [...document.querySelectorAll('.leaflet-tile-loaded')].length")
    assert tiles >= 2  # image and mask tiles drawn
    rows = browser.find_elements("css selector", "#regions tbody tr")
    assert (
        rows and int(browser.find_element("id", "regions").get_attribute("data-count")) == store.regions_info["count"]
    )
    assert console_errors(browser) == []


def test_the_volume_page_shows_the_ct_geometry_and_three_planes(browser, site) -> None:  # type: ignore[no-untyped-def]
    base, root = site
    load(browser, base + "/volume/ct.zarr")
    store = MaskStore.open(root / "ct.zarr")
    geometry = browser.find_element("id", "geometry")
    assert geometry.get_attribute("data-slices") == "20" and "20 slices" in geometry.text
    spacing = store.info.volume.spacing_mm  # type: ignore[union-attr]
    assert f"spacing {spacing[2]:.10g} × {spacing[1]:.10g} × {spacing[0]:.10g} mm" in geometry.text, geometry.text
    for axis in ("axial", "coronal", "sagittal"):
        view = browser.find_element("id", f"view-{axis}")
        loaded = browser.execute_script(
            "return [...arguments[0].querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)", view
        )
        assert loaded, axis
    size = {a: browser.find_element("id", f"view-{a}").size for a in ("axial", "coronal")}
    # the coronal view's height over the axial's is the volume's depth over its height, in mm
    ratio = size["coronal"]["height"] / size["axial"]["height"]
    depth, height = 20 * spacing[0], 512 * spacing[1]
    assert np.isclose(ratio, depth / height, rtol=0.05), (ratio, depth / height)
    assert console_errors(browser) == []
