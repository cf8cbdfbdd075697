# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Every install goes through constraints.txt, which pins torch==2.13.0 (CPU wheel): an unpinned
# torch would pull a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test check lint bench fuzz clean debs train-demo

# Debian tools the tests call: dciodvfy (dicom3tools) validates the DICOM SEG exports; gdalinfo
# (gdal-bin) reads the COG's class names and attribute table as GDAL and QGIS see them; chromium and
# its chromedriver run the viewer's pages headless (tests/test_browser.py, the demo's screenshots).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := dicom3tools gdal-bin chromium chromium-driver
debs:
	@{ command -v dciodvfy && command -v gdalinfo && command -v chromium && command -v chromedriver; } >/dev/null \
		|| $(SUDO) apt-get install -y -q $(DEBS) >/dev/null \
		|| { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(DEBS) >/dev/null; }

# The viewer's front-end libraries (Leaflet), from npm at build time, shipped inside the package.
VENDOR := pipeline/viewer/static/vendor/leaflet/leaflet.js
$(VENDOR): pipeline/viewer/web/package.json pipeline/viewer/web/package-lock.json
	cd pipeline/viewer/web && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p pipeline/viewer/static/vendor/leaflet
	cp -r pipeline/viewer/web/node_modules/leaflet/dist/leaflet.js pipeline/viewer/web/node_modules/leaflet/dist/leaflet.css \
		pipeline/viewer/web/node_modules/leaflet/dist/images pipeline/viewer/web/node_modules/leaflet/LICENSE \
		pipeline/viewer/static/vendor/leaflet/

$(STAMP): pyproject.toml constraints.txt $(VENDOR)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,bench,onnx,export,s3,train]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raymask run configs/aerial-vegetation.yaml --overwrite
	$(VENV)/bin/raymask info out/aber-vegetation.zarr
	$(VENV)/bin/raymask regions out/aber-vegetation.zarr --class vegetation --min-area 1000 --limit 5
	$(VENV)/bin/raymask query out/aber-vegetation.zarr --bbox -4.09,52.40,-4.06,52.42 --crs EPSG:4326
	$(VENV)/bin/raymask run configs/ct-tissue.yaml --overwrite
	$(VENV)/bin/raymask regions out/ct-tissue.zarr --class bone --limit 5
	$(PY) tools/screenshots.py out
	@echo "Look at the results in a browser: $(VENV)/bin/raymask serve out/   then open http://127.0.0.1:8765/"

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline workers tests bench tools
	$(VENV)/bin/ruff format --check pipeline workers tests bench tools
	$(VENV)/bin/mypy

# The whole suite: the quick tests on two processes, then those marked slow (they start Rays and
# clusters of their own, kill processes and time things) alone, one at a time.
test: $(STAMP) debs lint
	$(VENV)/bin/pytest -q -rs -m "not slow" -n 2 --dist loadfile
	$(VENV)/bin/pytest -q -rs -m slow

# The fast lane while working: lint, then every test but those that start a Ray or a driver of their own,
# kill processes or run a job end to end for seconds (marked slow), on two pytest processes. `make test` runs everything, in one.
check: $(STAMP) debs lint
	$(VENV)/bin/pytest -q -m "not slow" -n 2 --dist loadfile

# The fuzzers of tests/test_fuzz.py with 5000 examples each (make test runs them with 150).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_fuzz.py

bench: $(STAMP)
	$(PY) bench/peers.py
	$(PY) bench/regions_memory.py

# The two demo models of `raymask train` (models/buildings, models/polyp) from their shipped configs, scored
# on their held-out files beside the same network trained by plain MONAI code (bench/train_demo.py).
train-demo: $(STAMP)
	$(PY) bench/train_demo.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache .hypothesis
