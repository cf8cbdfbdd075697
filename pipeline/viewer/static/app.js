/* raymask viewer: the catalog, map and volume pages. Everything comes from the server's JSON API
   (/api/stores/...); nothing is fetched from elsewhere. */
"use strict";
const raymask = (() => {
  const api = (path) => fetch(path).then((r) => r.json().then((body) => {
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }));
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  };
  const storeName = () => decodeURIComponent(location.pathname.split("/").slice(2).join("/"));
  const storeUrl = (name) => "/api/stores/" + name.split("/").map(encodeURIComponent).join("/");
  const pageOf = (record) => "/" + record.kind + "/" + record.name.split("/").map(encodeURIComponent).join("/");
  const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(6)) : v ?? "");

  function measureOf(stats) {
    for (const [key, unit] of [["area_ha", "ha"], ["volume_ml", "mL"], ["area_cm2", "cm²"]]) {
      if (stats && stats[key] != null) return `${fmt(stats[key])} ${unit}`;
    }
    return stats ? `${fmt(stats.pixels)} px` : "";
  }

  function legend(record, onToggle) {
    const box = document.getElementById("legend");
    const hidden = new Set();
    for (const c of record.classes) {
      const stats = ((record.stats || {}).classes || {})[c.name];
      const check = el("input", { type: "checkbox", checked: "", "data-class": c.id });
      check.addEventListener("change", () => {
        if (check.checked) hidden.delete(c.id); else hidden.add(c.id);
        onToggle([...hidden].join(","));
      });
      box.append(el("label", { "data-class-name": c.name }, check, el("span", { class: "swatch", style: `background:${c.color}` }),
        c.name, " ", el("span", { class: "measure" }, measureOf(stats))));
    }
  }

  function regionTable(record, onRow) {
    const select = document.getElementById("region-class");
    for (const c of record.classes) select.append(el("option", { value: c.name }, c.name));
    const head = document.querySelector("#regions thead"), body = document.querySelector("#regions tbody");
    let sort = "id", desc = false;
    const load = () => {
      const cls = select.value ? `&class=${encodeURIComponent(select.value)}` : "";
      api(`${storeUrl(record.name)}/regions?limit=200&sort=${sort}&desc=${desc ? 1 : 0}${cls}`).then((data) => {
        const shown = data.columns.filter((c) => /^(id|class_name|pixels|voxels|area_ha|area_mm2|volume_ml|mean_.*)$/.test(c));
        head.replaceChildren(el("tr", {}, ...shown.map((c) => el("th", { onclick: () => { desc = sort === c ? !desc : true; sort = c; load(); } },
          c + (sort === c ? (desc ? " ▼" : " ▲") : "")))));
        body.replaceChildren(...data.rows.map((row) => el("tr", { class: "clickable", "data-region": row.id, onclick: () => onRow(row) },
          ...shown.map((c) => el("td", {}, fmt(row[c]))))));
        document.querySelector("#regions").dataset.count = data.count;
      }).catch((e) => { body.replaceChildren(el("tr", {}, el("td", {}, e.message))); });
    };
    select.addEventListener("change", load);
    load();
  }

  function showPoint(data) {
    const lines = [`pixel ${JSON.stringify(data.index)}`, `class ${data.class_name ?? "(nodata)"}`];
    if (data.region) {
      lines.push(`region ${data.region.id}`);
      for (const [k, v] of Object.entries(data.region)) if (k !== "id") lines.push(`  ${k}: ${fmt(v)}`);
    } else lines.push("region (none)");
    const info = document.getElementById("info");
    info.textContent = lines.join("\n");
    info.dataset.className = data.class_name ?? "";
    info.dataset.region = data.region ? data.region.id : "";
  }

  function catalog() {
    api("/api/stores").then((rows) => {
      const body = document.querySelector("#stores tbody");
      for (const r of rows) {
        if (r.error) { body.append(el("tr", {}, el("td", {}), el("td", {}, r.name), el("td", { colspan: 5 }, r.error))); continue; }
        const progress = r.status === "complete" ? "complete" : `${r.status} (${r.units_done}/${r.units_total} units)`;
        const classes = Object.entries((r.stats || {}).classes || {}).map(([n, s]) => `${n}: ${measureOf(s)}`).join(", ");
        body.append(el("tr", { class: "clickable", "data-store": r.name, onclick: () => { location.href = pageOf(r); } },
          el("td", {}, el("img", { src: `${storeUrl(r.name)}/thumbnail.png`, alt: "", width: 64 })),
          el("td", {}, el("a", { href: pageOf(r) }, r.name)),
          el("td", { class: `status-${r.status}` }, progress), el("td", {}, (r.source || {}).paths ? r.source.paths[0] : ""),
          el("td", {}, (r.shape || []).join(" × ")), el("td", {}, classes), el("td", {}, fmt(r.region_count))));
      }
      document.body.dataset.ready = "1";
    });
  }

  function map() {
    const name = storeName();
    api(storeUrl(name)).then((record) => {
      document.getElementById("title").textContent = name;
      const t = record.tiles;
      const m = L.map("map", { crs: L.CRS.Simple, minZoom: 0, maxZoom: t.max_zoom + 3, zoomSnap: 1 });
      const toLatLng = (row, col) => m.unproject([col, row], t.max_zoom);
      const bounds = L.latLngBounds(toLatLng(t.rows, 0), toLatLng(0, t.cols));
      const opts = { tileSize: t.size, maxNativeZoom: t.max_zoom, minNativeZoom: 0, maxZoom: t.max_zoom + 3, bounds, noWrap: true };
      if (record.has_image) {
        const image = L.tileLayer(`${storeUrl(name)}/tiles/image/{z}/{x}/{y}.png`, opts).addTo(m);
        document.getElementById("bands").addEventListener("change", (e) => {
          image.setUrl(`${storeUrl(name)}/tiles/image/{z}/{x}/{y}.png?bands=${encodeURIComponent(e.target.value)}`);
        });
      }
      const opacity = document.getElementById("opacity");
      const mask = L.tileLayer(`${storeUrl(name)}/tiles/mask/{z}/{x}/{y}.png`, { ...opts, opacity: +opacity.value }).addTo(m);
      opacity.addEventListener("input", () => mask.setOpacity(+opacity.value));
      legend(record, (hide) => mask.setUrl(`${storeUrl(name)}/tiles/mask/{z}/{x}/{y}.png?hide=${hide}`));
      m.fitBounds(bounds);
      m.on("click", (e) => {
        const p = m.project(e.latlng, t.max_zoom);
        api(`${storeUrl(name)}/point?row=${Math.floor(p.y)}&col=${Math.floor(p.x)}`).then(showPoint);
      });
      regionTable(record, (row) => m.fitBounds(L.latLngBounds(toLatLng(row.row_stop, row.col_start), toLatLng(row.row_start, row.col_stop))));
      window.raymaskMap = { map: m, toLatLng, record };
      document.body.dataset.ready = "1";
    });
  }

  function volume() {
    const name = storeName();
    api(storeUrl(name)).then((record) => {
      document.getElementById("title").textContent = name;
      const [nz, ny, nx] = record.shape, [sz, sy, sx] = record.spacing_mm;
      document.getElementById("geometry").textContent = `${nz} slices, ${nx} × ${ny} voxels, spacing ${sx} × ${sy} × ${sz} mm`;
      document.getElementById("geometry").dataset.slices = nz;
      const at = { z: Math.floor(nz / 2), y: Math.floor(ny / 2), x: Math.floor(nx / 2) };
      const scale = 360 / Math.max(nx * sx, ny * sy, nz * sz);
      const planes = {  // axis: [index key, across key, down key, width mm, height mm]
        axial: ["z", "x", "y", nx * sx, ny * sy], coronal: ["y", "x", "z", nx * sx, nz * sz], sagittal: ["x", "y", "z", ny * sy, nz * sz],
      };
      const counts = { x: nx, y: ny, z: nz };
      let hide = "";
      const views = {};
      const win = document.getElementById("window"), opacity = document.getElementById("opacity");
      for (const [axis, [key, across, down, w, h]] of Object.entries(planes)) {
        const image = el("img", { alt: axis }), labels = el("img", { alt: "" });
        const ch = el("div", { class: "cross-h" }), cv = el("div", { class: "cross-v" });
        const view = el("div", { class: "view", id: `view-${axis}`, style: `width:${w * scale}px;height:${h * scale}px` }, image, labels, ch, cv);
        view.addEventListener("click", (e) => {
          const r = view.getBoundingClientRect();
          at[across] = Math.min(counts[across] - 1, Math.floor(((e.clientX - r.left) / r.width) * counts[across]));
          const down_ = Math.floor(((e.clientY - r.top) / r.height) * counts[down]);
          at[down] = Math.min(counts[down] - 1, down === "z" ? counts.z - 1 - down_ : down_);  // slices drawn bottom-up
          draw();
          api(`${storeUrl(name)}/point?row=${at.y}&col=${at.x}&slice=${at.z}`).then(showPoint);
        });
        document.getElementById("views").append(el("div", {}, view, el("div", { class: "caption" }, axis)));
        views[axis] = { key, across, down, image, labels, ch, cv };
      }
      function draw() {
        for (const [axis, v] of Object.entries(views)) {
          v.image.src = `${storeUrl(name)}/slices/${axis}/${at[v.key]}.png?window=${win.value}`;
          v.labels.src = `${storeUrl(name)}/slices/labels/${axis}/${at[v.key]}.png?hide=${hide}`;
          v.labels.style.opacity = opacity.value;
          v.cv.style.left = `${((at[v.across] + 0.5) / counts[v.across]) * 100}%`;
          const down = v.down === "z" ? counts.z - 1 - at.z : at[v.down];
          v.ch.style.top = `${((down + 0.5) / counts[v.down]) * 100}%`;
        }
        document.getElementById("views").dataset.at = JSON.stringify(at);
      }
      win.addEventListener("change", draw);
      opacity.addEventListener("input", draw);
      legend(record, (h) => { hide = h; draw(); });
      regionTable(record, (row) => {
        at.z = Math.floor(row.centroid_slice); at.y = Math.floor(row.centroid_row); at.x = Math.floor(row.centroid_col);
        draw();
      });
      draw();
      document.body.dataset.ready = "1";
    });
  }
  return { catalog, map, volume };
})();
