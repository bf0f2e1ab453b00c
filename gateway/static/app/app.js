/* Palm Serve's page: upload files as a job, follow it, list jobs, map a finished job, try /v1/predict.
 * Plain JavaScript, no build step; it talks to the same API as every other client (relative URLs, so
 * the page works behind a path prefix), sending the API key the user entered, kept in sessionStorage.
 */
"use strict";

(() => {
  const KEY = "palm-serve-api-key";
  const BASEMAP = "palm-serve-basemap";
  const STAGED_ABOVE = 200; // more files than this go to a staged job, in batches
  const BATCH_FILES = 50;
  const SUFFIXES = /\.(tiff?|png|jpe?g)$/i;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const COLOURS = ["#ffd23f", "#3fb8ff", "#ff5d73", "#7ee081", "#c792ea", "#ff9f1c"];
  const FILE_ROWS = 200;
  const $ = (id) => document.getElementById(id);

  // -- API ---------------------------------------------------------------------------------------

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function problemOf(response) {
    let body = {};
    try { body = await response.json(); } catch (ignored) { /* not problem+json (a proxy's page) */ }
    const error = new Error(`${body.title || response.statusText || "Error"}: ${body.detail || response.status}`);
    error.status = response.status;
    error.problem = body;
    return error;
  }

  async function api(method, path, body) {
    const init = { method, headers: authHeaders() };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await problemOf(response);
    if (response.status === 204) return null;
    return response.json();
  }

  function uploadForm(path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (ignored) { /* empty */ }
        if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
        const error = new Error(`${body.title || xhr.statusText}: ${body.detail || xhr.status}`);
        error.status = xhr.status;
        reject(error);
      };
      xhr.onerror = () => reject(new Error("the upload could not reach the service"));
      xhr.send(form);
    });
  }

  async function download(path, filename) {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) throw await problemOf(response);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  async function allFiles(jobId) {
    const files = [];
    let cursor = 0;
    for (;;) {
      const page = await api("GET", `v1/jobs/${jobId}/files?limit=1000&cursor=${cursor}`);
      files.push(...page.files);
      if (page.next_cursor === null) return files;
      cursor = page.next_cursor;
    }
  }

  function showError(error) {
    const alert = $("alert");
    alert.textContent = error && error.message ? error.message : String(error);
    alert.hidden = false;
    if (error && (error.status === 401 || error.status === 403)) $("api-key").focus();
  }

  function clearError() { $("alert").hidden = true; }

  function guard(fn) {
    return (...args) => Promise.resolve().then(() => fn(...args)).catch(showError);
  }

  function text(tag, content, className) {
    const node = document.createElement(tag);
    node.textContent = content;
    if (className) node.className = className;
    return node;
  }

  function button(label, onClick, className) {
    const node = text("button", label, className || "small secondary");
    node.type = "button";
    node.addEventListener("click", guard(onClick));
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const s = Math.round(seconds);
    if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${s}s`;
  }

  function progressLine(status, p) {
    const failed = p.files_failed ? ` (${p.files_failed} failed)` : "";
    const eta = p.eta_seconds !== null && p.eta_seconds !== undefined ? `, ETA ${duration(p.eta_seconds)}` : "";
    return `${status}: ${p.files_done + p.files_failed}/${p.files_total} files${failed}, ` +
      `${p.tiles_done}/${p.tiles_total} tiles, ${Number(p.tiles_per_second).toFixed(1)} tiles/s${eta}, ` +
      `${p.detections} detections`;
  }

  // -- API key -----------------------------------------------------------------------------------

  function showKeyState() {
    $("key-state").textContent = sessionStorage.getItem(KEY) ? "key set for this tab" : "";
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("api-key").value.trim();
    if (value) sessionStorage.setItem(KEY, value);
    $("api-key").value = "";
    showKeyState();
    clearError();
    refreshJobs();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showKeyState(); });

  // -- choosing files ----------------------------------------------------------------------------

  let chosen = [];

  function choose(entries) {
    chosen = entries.filter((e) => SUFFIXES.test(e.name));
    const bytes = chosen.reduce((sum, e) => sum + e.file.size, 0);
    $("selection").textContent = chosen.length
      ? `${chosen.length} file(s), ${(bytes / 1048576).toFixed(1)} MiB chosen.`
      : "No GeoTIFF, PNG or JPEG file among those.";
    $("submit").disabled = chosen.length === 0;
  }

  function fromInput(input) {
    return Array.from(input.files).map((file) => ({ file, name: file.webkitRelativePath || file.name }));
  }

  async function fromDrop(items) {
    const entries = [];
    const walk = async (entry, prefix) => {
      if (entry.isFile) {
        const file = await new Promise((ok, fail) => entry.file(ok, fail));
        entries.push({ file, name: prefix + file.name });
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
          if (!batch.length) break;
          for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
        }
      }
    };
    const roots = Array.from(items).map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    for (const root of roots) if (root) await walk(root, "");
    return entries;
  }

  function dropZone(zone, onFiles, openPicker) {
    zone.addEventListener("click", openPicker);
    zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); openPicker(); }
    });
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", guard(async (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const items = event.dataTransfer.items;
      const entries = items && items.length && items[0].webkitGetAsEntry
        ? await fromDrop(items)
        : Array.from(event.dataTransfer.files).map((file) => ({ file, name: file.name }));
      onFiles(entries);
    }));
  }

  dropZone($("drop"), choose, () => $("pick-files").click());
  $("choose-files").addEventListener("click", () => $("pick-files").click());
  $("choose-folder").addEventListener("click", () => $("pick-folder").click());
  $("pick-files").addEventListener("change", () => choose(fromInput($("pick-files"))));
  $("pick-folder").addEventListener("change", () => choose(fromInput($("pick-folder"))));

  // -- submitting --------------------------------------------------------------------------------

  function jobFields() {
    const fields = {};
    if ($("job-name").value.trim()) fields.name = $("job-name").value.trim();
    if ($("job-threshold").value !== "") fields.score_threshold = $("job-threshold").value;
    return fields;
  }

  function formOf(entries, fields) {
    const form = new FormData();
    for (const [name, value] of Object.entries(fields || {})) form.append(name, value);
    for (const entry of entries) form.append("files", entry.file, entry.name);
    return form;
  }

  $("submit").addEventListener("click", guard(async () => {
    clearError();
    const entries = chosen;
    const total = entries.length;
    $("submit").disabled = true;
    const say = (done, fraction) => {
      $("selection").textContent = `Uploading: ${done}/${total} files (${Math.round(100 * fraction)}%)`;
    };
    let job;
    try {
      if (total <= STAGED_ABOVE) {
        job = await uploadForm("v1/jobs", formOf(entries, jobFields()), (loaded, size) => say(0, loaded / size));
      } else {
        job = await api("POST", "v1/jobs", jobFields());
        for (let start = 0; start < total; start += BATCH_FILES) {
          const batch = entries.slice(start, start + BATCH_FILES);
          await uploadForm(`v1/jobs/${job.id}/files`, formOf(batch), (loaded, size) =>
            say(start, (start + batch.length * loaded / size) / total));
        }
        job = await api("POST", `v1/jobs/${job.id}/start`);
      }
    } finally {
      $("submit").disabled = chosen.length === 0;
    }
    $("selection").textContent = `Uploaded ${total} file(s) as job ${job.id}.`;
    refreshJobs();
    follow(job.id);
  }));

  // -- following a job ---------------------------------------------------------------------------

  let following = null; // {id, abort}

  function renderActive(job) {
    $("active-id").textContent = job.name ? `${job.name} (${job.id})` : job.id;
    $("active-bar").value = job.progress.percent;
    $("active-line").textContent = progressLine(job.status, job.progress);
    $("active-line").dataset.status = job.status;
    $("active-cancel").disabled = TERMINAL.has(job.status);
    $("active-map").disabled = !(TERMINAL.has(job.status) && job.results.ready);
  }

  function renderFileRow(file) {
    let row = document.querySelector(`#active-files tr[data-position="${file.position}"]`);
    if (!row) {
      if ($("active-files").children.length >= FILE_ROWS) return;
      row = document.createElement("tr");
      row.dataset.position = file.position;
      for (let i = 0; i < 5; i += 1) row.append(document.createElement("td"));
      row.children[0].textContent = file.position;
      row.children[1].textContent = file.name || file.file;
      $("active-files").append(row);
    }
    const state = file.status;
    row.children[2].textContent = state + (file.error ? `: ${file.error.detail}` : file.detail ? `: ${file.detail}` : "");
    row.children[2].className = `state-${state}`;
    if (file.tiles !== undefined) row.children[3].textContent = file.tiles;
    if (file.detections !== undefined) row.children[4].textContent = file.detections;
  }

  async function follow(jobId) {
    if (following) following.abort.abort();
    const abort = new AbortController();
    following = { id: jobId, abort };
    $("active").hidden = false;
    $("active-files").replaceChildren();
    let job = await api("GET", `v1/jobs/${jobId}`);
    renderActive(job);
    const page = await api("GET", `v1/jobs/${jobId}/files?limit=${FILE_ROWS}`);
    page.files.forEach(renderFileRow);
    $("active-more").hidden = job.progress.files_total <= FILE_ROWS;
    $("active-more").textContent = `The first ${FILE_ROWS} of ${job.progress.files_total} files are listed.`;
    if (TERMINAL.has(job.status) && job.results.ready) return;
    try {
      await events(jobId, abort.signal, (type, data) => {
        if (type === "progress") renderActive(Object.assign({}, job, { progress: data }));
        else if (type === "file") renderFileRow(data);
        else if (type === "status") {
          job = Object.assign({}, job, { status: data.status });
          $("active-line").dataset.status = data.status;
          return Boolean(data.results);
        }
        return false;
      });
    } catch (error) {
      if (abort.signal.aborted) return;
    }
    // Events ended (or never came through a buffering proxy): poll until the results are written.
    for (;;) {
      if (abort.signal.aborted) return;
      job = await api("GET", `v1/jobs/${jobId}`);
      renderActive(job);
      if (TERMINAL.has(job.status) && job.results.ready) break;
      await new Promise((ok) => setTimeout(ok, 1000));
    }
    const files = await api("GET", `v1/jobs/${jobId}/files?limit=${FILE_ROWS}`);
    files.files.forEach(renderFileRow);
    refreshJobs();
  }

  /** Server-Sent Events over fetch (EventSource cannot send an Authorization header). */
  async function events(jobId, signal, onEvent) {
    const response = await fetch(`v1/jobs/${jobId}/events`, {
      headers: authHeaders({ Accept: "text/event-stream" }), signal,
    });
    if (!response.ok) throw await problemOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length && onEvent(type, JSON.parse(data.join("\n")))) {
            reader.cancel();
            return;
          }
          type = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const content = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") type = content;
          else if (field === "data") data.push(content);
        }
      }
    }
  }

  $("active-cancel").addEventListener("click", guard(async () => {
    if (!following) return;
    renderActive(await api("POST", `v1/jobs/${following.id}/cancel`));
    refreshJobs();
  }));
  $("active-map").addEventListener("click", guard(() => openMap(following.id)));

  // -- the job list ------------------------------------------------------------------------------

  async function refreshJobs() {
    let listing;
    try {
      listing = await api("GET", "v1/jobs?limit=50");
    } catch (error) {
      showError(error);
      return;
    }
    const body = $("jobs-body");
    body.replaceChildren();
    for (const job of listing.jobs) {
      const row = document.createElement("tr");
      row.dataset.job = job.id;
      const p = job.progress;
      row.append(
        text("td", (job.created_at || "").replace("T", " ").slice(0, 19)),
        text("td", job.name || job.id.slice(-8)),
        text("td", job.status, `status-${job.status}`),
        text("td", `${p.files_done + p.files_failed}/${p.files_total}` + (p.files_failed ? ` (${p.files_failed} failed)` : "")),
        text("td", p.detections),
      );
      const results = document.createElement("td");
      if (job.results.ready) {
        results.append(
          button("COCO", () => download(`v1/jobs/${job.id}/results`, `${job.id}.coco.json`)),
          button("GeoJSON", () => download(`v1/jobs/${job.id}/results.geojson`, `${job.id}.geojson`)),
        );
      }
      const actions = document.createElement("td");
      actions.className = "actions";
      if (job.results.ready) actions.append(button("Map", () => openMap(job.id), "small"));
      if (!TERMINAL.has(job.status)) {
        actions.append(button("Progress", () => follow(job.id)));
        actions.append(button("Cancel", async () => { await api("POST", `v1/jobs/${job.id}/cancel`); refreshJobs(); }, "small danger"));
      } else {
        actions.append(button("Delete", async () => {
          if (!window.confirm(`Delete job ${job.name || job.id} with its uploads and results?`)) return;
          await api("DELETE", `v1/jobs/${job.id}`);
          refreshJobs();
        }, "small danger"));
      }
      row.append(results, actions);
      body.append(row);
    }
    if (!listing.jobs.length) {
      const row = document.createElement("tr");
      const cell = text("td", "No jobs yet.");
      cell.colSpan = 7;
      row.append(cell);
      body.append(row);
    }
  }

  $("jobs-refresh").addEventListener("click", refreshJobs);

  // -- the map -----------------------------------------------------------------------------------

  let map = null;
  // The job on the map: its images, its drawn detections in increasing score order (scores[i] is the
  // score of features[i]) and their layer (PalmBoxes, boxes.js).
  let shown = { images: [], scores: new Float64Array(0), features: [], boxes: null };

  function loaded(target) {
    return target.loaded() ? Promise.resolve() : new Promise((ok) => target.once("load", ok));
  }

  function ensureMap() {
    if (map) return map;
    map = new maplibregl.Map({
      container: "map",
      style: {
        version: 8,
        sources: {},
        layers: [{ id: "background", type: "background", paint: { "background-color": "#20262b" } }],
      },
      center: [0, 0],
      zoom: 1,
      attributionControl: false,
      transformRequest: (url) => ({ url, headers: authHeaders() }),
    });
    map.addControl(new maplibregl.NavigationControl({ visualizePitch: false }), "top-right");
    map.addControl(new maplibregl.ScaleControl(), "bottom-left");
    const popup = new maplibregl.Popup({ closeButton: false, closeOnClick: false });
    const leave = () => { map.getCanvas().style.cursor = ""; popup.remove(); };
    map.on("mousemove", (event) => {
      const index = shown.boxes ? shown.boxes.at(event.lngLat, map.getZoom()) : -1;
      if (index < 0) return leave();
      const props = shown.features[index].properties;
      map.getCanvas().style.cursor = "pointer";
      popup.setLngLat(event.lngLat)
        .setText(`${props.category} ${Number(props.score).toFixed(2)} (${props.file_name})`)
        .addTo(map);
    });
    map.on("mouseout", leave);
    window.palmMap = map; // for tests and the browser console
    applyBasemap(localStorage.getItem(BASEMAP) || "");
    return map;
  }

  function applyBasemap(url) {
    const apply = () => {
      if (map.getLayer("basemap")) map.removeLayer("basemap");
      if (map.getSource("basemap")) map.removeSource("basemap");
      if (!url) return;
      map.addSource("basemap", { type: "raster", tiles: [url], tileSize: 256 });
      map.addLayer({ id: "basemap", type: "raster", source: "basemap" }, map.getStyle().layers[1] ? map.getStyle().layers[1].id : undefined);
    };
    loaded(map).then(apply);
  }

  $("basemap-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("basemap").value.trim();
    localStorage.setItem(BASEMAP, url);
    if (map) applyBasemap(url);
  });
  $("basemap").value = localStorage.getItem(BASEMAP) || "";

  function clearMap() {
    if (map.getLayer("detections")) map.removeLayer("detections"); // custom layers are not in getStyle()
    for (const layer of map.getStyle().layers) {
      if (layer.id.startsWith("image-")) map.removeLayer(layer.id);
    }
    for (const source of Object.keys(map.getStyle().sources)) {
      if (source.startsWith("image-")) map.removeSource(source);
    }
    shown.boxes = null;
  }

  async function openMap(jobId) {
    clearError();
    $("results").hidden = false;
    $("map-job").textContent = jobId;
    $("det-count").textContent = "loading…";
    ensureMap();
    const [files, collection] = await Promise.all([
      allFiles(jobId),
      api("GET", `v1/jobs/${jobId}/results.geojson`),
      loaded(map),
    ]);
    clearMap();
    const images = files.filter((f) => f.footprint && f.links && f.links.quicklook);
    for (const file of images) {
      map.addSource(`image-${file.position}`, {
        type: "image",
        url: `v1/jobs/${jobId}/files/${file.position}/quicklook`,
        coordinates: file.footprint,
      });
      map.addLayer({
        id: `image-${file.position}`, type: "raster", source: `image-${file.position}`,
        paint: { "raster-fade-duration": 0 },
      });
    }
    const drawn = collection.features.filter((f) => f.geometry);
    const categories = Array.from(new Set(drawn.map((f) => f.properties.category_id))).sort((a, b) => a - b);
    drawn.sort((a, b) => a.properties.score - b.properties.score);
    const boxes = PalmBoxes.create("detections", drawn, (f) => colourOf(f.properties.category_id));
    shown = { images, scores: Float64Array.from(drawn, (f) => f.properties.score), features: drawn, boxes };
    map.addLayer(boxes);
    const pixelOnly = files.filter((f) => f.status === "succeeded" && !f.footprint).length;
    const notDrawn = collection.features.length - drawn.length;
    $("map-note").textContent = [
      pixelOnly ? `${pixelOnly} file(s) have no georeferencing and are not on the map.` : "",
      notDrawn ? `${notDrawn} detection(s) of those files are in the downloads only.` : "",
      categories.length ? "Colours: " + categories.map((c) => `${categoryName(drawn, c)} ${colourName(c)}`).join(", ") + "." : "",
    ].filter(Boolean).join(" ");
    const fit = $("fit");
    fit.replaceChildren(new Option("all images", "all"), ...images.map((f) => new Option(f.name, String(f.position))));
    filterScore();
    fitTo("all");
    $("results").scrollIntoView({ behavior: "smooth" });
  }

  function colourOf(categoryId) { return COLOURS[(categoryId - 1 + COLOURS.length) % COLOURS.length]; }

  function colourName(categoryId) {
    return ["yellow", "blue", "red", "green", "purple", "orange"][(categoryId - 1 + COLOURS.length) % COLOURS.length];
  }

  function categoryName(features, id) {
    const feature = features.find((f) => f.properties.category_id === id);
    return feature ? feature.properties.category : `class ${id}`;
  }

  function countAtLeast(threshold) {
    const scores = shown.scores;
    let low = 0;
    let high = scores.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (scores[mid] < threshold) low = mid + 1;
      else high = mid;
    }
    return scores.length - low;
  }

  function filterScore() {
    const threshold = Number($("score").value);
    $("score-value").textContent = threshold.toFixed(2);
    const count = countAtLeast(threshold);
    if (shown.boxes) {
      shown.boxes.hide(shown.scores.length - count);
      map.triggerRepaint();
    }
    const counter = $("det-count");
    counter.dataset.shown = String(count);
    counter.dataset.total = String(shown.scores.length);
    counter.dataset.threshold = String(threshold);
    counter.textContent = `${count.toLocaleString()} of ${shown.scores.length.toLocaleString()} detections shown`;
  }

  function fitTo(which) {
    const chosenImages = which === "all" ? shown.images : shown.images.filter((f) => String(f.position) === which);
    if (!chosenImages.length) return;
    const bounds = new maplibregl.LngLatBounds();
    for (const file of chosenImages) for (const corner of file.footprint) bounds.extend(corner);
    map.fitBounds(bounds, { padding: 24, animate: false });
  }

  $("score").addEventListener("input", filterScore);
  $("fit").addEventListener("change", () => fitTo($("fit").value));
  $("fit-all").addEventListener("click", () => { $("fit").value = "all"; fitTo("all"); });

  // -- try /v1/predict ---------------------------------------------------------------------------

  async function tryImage(file) {
    clearError();
    $("try-line").textContent = `Predicting ${file.name}…`;
    const form = new FormData();
    form.append("file", file, file.name);
    const browserImage = /\.(png|jpe?g)$/i.test(file.name);
    const picture = browserImage
      ? Promise.resolve(file)
      : (async () => {
        const look = new FormData();
        look.append("file", file, file.name);
        const response = await fetch("v1/quicklook?max_side=1024", { method: "POST", headers: authHeaders(), body: look });
        if (!response.ok) throw await problemOf(response);
        return response.blob();
      })();
    const [prediction, blob] = await Promise.all([api("POST", "v1/predict?format=json", form), picture]);
    const bitmap = await createImageBitmap(blob);
    const canvas = $("try-canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    const context = canvas.getContext("2d");
    context.drawImage(bitmap, 0, 0);
    const scale = bitmap.width / prediction.image.width;
    context.lineWidth = Math.max(1.5, bitmap.width / 600);
    for (const detection of prediction.detections) {
      const [x, y, w, h] = detection.bbox;
      context.strokeStyle = colourOf(detection.category_id);
      context.strokeRect(x * scale, y * scale, w * scale, h * scale);
    }
    canvas.dataset.boxes = String(prediction.detections.length);
    $("try-line").textContent = `${file.name}: ${prediction.detections.length} detection(s), ` +
      `${prediction.image.width}x${prediction.image.height} px, ${prediction.tiles.total} tile(s).`;
  }

  dropZone($("try-drop"), (entries) => entries.length && guard(tryImage)(entries[0].file), () => $("try-file").click());
  $("try-file").addEventListener("change", () => { if ($("try-file").files.length) guard(tryImage)($("try-file").files[0]); });

  showKeyState();
  refreshJobs();
})();
