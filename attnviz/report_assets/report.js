// attnviz report: draws the maps carried in #attnviz-data. No network, no libraries.
// body[data-ready] turns "1" once every image is drawn; body[data-heads] counts head thumbnails,
// body[data-errors] counts script errors; body[data-map-scale] and [data-overlay-scale] say
// which colour scale is drawn, and each colour bar carries data-high (the browser tests read
// these).
(function () {
  "use strict";
  const body = document.body;
  const errors = [];
  function fail(message) {
    errors.push(message);
    body.dataset.errors = String(errors.length);
    const box = document.getElementById("errors");
    box.hidden = false;
    box.textContent = "report script error: " + errors.join("\n");
  }
  window.addEventListener("error", (event) => fail(String(event.message || event)));
  window.addEventListener("unhandledrejection", (event) => fail(String(event.reason)));

  const data = JSON.parse(document.getElementById("attnviz-data").textContent);
  const MASKED = [220, 220, 220];

  // A stored map -> {w, h, grey, alpha}: grey 255 is the head's maximum, alpha 0 is masked.
  function decode(b64) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = img.width;
        canvas.height = img.height;
        const ctx = canvas.getContext("2d", { willReadFrequently: true });
        ctx.drawImage(img, 0, 0);
        const px = ctx.getImageData(0, 0, img.width, img.height).data;
        const n = img.width * img.height;
        const grey = new Uint8Array(n);
        const alpha = new Uint8Array(n);
        for (let i = 0; i < n; i++) {
          grey[i] = px[4 * i];
          alpha[i] = px[4 * i + 3];
        }
        resolve({ w: img.width, h: img.height, grey: grey, alpha: alpha });
      };
      img.onerror = () => reject(new Error("a stored map image does not decode"));
      img.src = "data:image/png;base64," + b64;
    });
  }

  function colour(map, lut, masked) {
    const canvas = document.createElement("canvas");
    paint(canvas, map, lut, masked);
    return canvas;
  }

  function paint(canvas, map, lut, masked) {
    canvas.width = map.w;
    canvas.height = map.h;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(map.w, map.h);
    for (let i = 0; i < map.w * map.h; i++) {
      const c = masked && map.alpha[i] === 0 ? MASKED : lut[map.grey[i]];
      out.data[4 * i] = c[0];
      out.data[4 * i + 1] = c[1];
      out.data[4 * i + 2] = c[2];
      out.data[4 * i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A row label that may wrap only after '.', '/', ':' or a space (layer names are
  // one long "word"); a part still wider than the label shrinks the font (see fitNames).
  function nameLabel(text) {
    const node = el("div", "name");
    node.title = text;
    for (const part of text.split(/(?<=[./: ])/)) {
      node.appendChild(document.createTextNode(part));
      node.appendChild(document.createElement("wbr"));
    }
    return node;
  }

  function fitNames() {
    document.querySelectorAll(".grid-row .name").forEach((node) => {
      let size = parseFloat(getComputedStyle(node).fontSize);
      while (node.scrollWidth > node.clientWidth + 1 && size > 7) {
        size -= 0.5;
        node.style.fontSize = size + "px";
      }
    });
  }

  // grey g of a map stored against `from` drawn on a scale whose top is `to`: lut[g * from / to]
  function rescaled(lut, from, to) {
    if (!(to > 0) || from === to) return lut;
    const out = new Array(256);
    for (let g = 0; g < 256; g++) out[g] = lut[Math.min(255, Math.round((g * from) / to))];
    return out;
  }

  // A horizontal colour bar: the colour map from `low` to `high`, and what the scale is.
  function colourBar(container, lut, low, high, caption) {
    if (!container) return;
    container.textContent = "";
    const canvas = el("canvas", "strip");
    canvas.width = 256;
    canvas.height = 1;
    const ctx = canvas.getContext("2d");
    const strip = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      strip.data[4 * i] = lut[i][0];
      strip.data[4 * i + 1] = lut[i][1];
      strip.data[4 * i + 2] = lut[i][2];
      strip.data[4 * i + 3] = 255;
    }
    ctx.putImageData(strip, 0, 0);
    const ticks = el("div", "ticks");
    ticks.appendChild(el("span", "low", low));
    ticks.appendChild(el("span", "high", high));
    container.appendChild(canvas);
    container.appendChild(ticks);
    container.appendChild(el("div", "caption", caption));
    container.dataset.high = high;
  }

  // ---- the layer x head grid -------------------------------------------------------------
  const decoded = data.maps.map((layer) => layer.heads.map(() => null));
  const thumbs = data.maps.map((layer) => layer.heads.map(() => null));
  let drawnHeads = 0;
  // "head": each map from 0 to its own maximum; "shared": every map from 0 to the largest
  let mapScale = "head";
  let sharedMax = 0;
  data.maps.forEach((layer) => layer.heads.forEach((head) => {
    if (head.max > sharedMax) sharedMax = head.max;
  }));

  function scaleTop(head) {
    return mapScale === "shared" ? sharedMax : head.max;
  }

  function headLut(head) {
    return rescaled(data.lut.map, head.max, scaleTop(head));
  }

  function drawGridBar() {
    if (mapScale === "shared") {
      colourBar(document.getElementById("grid-bar"), data.lut.map, "0",
        sharedMax.toPrecision(3), "attention probability, one scale for every head");
    } else {
      colourBar(document.getElementById("grid-bar"), data.lut.map, "0", "max",
        "each head from 0 to its own maximum (hover a head for it)");
    }
  }

  function setMapScale(value) {
    mapScale = value === "shared" ? "shared" : "head";
    body.dataset.mapScale = mapScale;
    data.maps.forEach((layer, l) => layer.heads.forEach((head, h) => {
      if (decoded[l][h] && thumbs[l][h]) paint(thumbs[l][h], decoded[l][h], headLut(head), true);
    }));
    drawGridBar();
    if (current) openDetail(current.l, current.h);
  }

  async function drawGrid() {
    const grid = document.getElementById("grid");
    if (!grid) return;
    const jobs = [];
    data.maps.forEach((layer, l) => {
      const row = el("div", "grid-row");
      row.appendChild(nameLabel(layer.name));
      layer.heads.forEach((head, h) => {
        const cell = el("div", "head-cell");
        const canvas = el("canvas", "thumb");
        thumbs[l][h] = canvas;
        canvas.title = layer.name + " · head " + h + " · max " + head.max.toPrecision(3);
        canvas.dataset.layer = String(l);
        canvas.dataset.head = String(h);
        canvas.addEventListener("click", () => openDetail(l, h));
        cell.appendChild(canvas);
        cell.appendChild(el("div", "", "h" + h));
        row.appendChild(cell);
        jobs.push(decode(head.png).then((map) => {
          decoded[l][h] = map;
          paint(canvas, map, headLut(head), true);
          drawnHeads += 1;
        }));
      });
      grid.appendChild(row);
    });
    // report_atlas.js puts each head's role on its thumbnail, if the page has an atlas
    document.dispatchEvent(new CustomEvent("attnviz:grid", { detail: { data: data } }));
    await Promise.all(jobs);
    body.dataset.heads = String(drawnHeads);
    body.dataset.mapScale = mapScale;
    drawGridBar();
    const select = document.getElementById("map-scale");
    if (select) select.addEventListener("change", () => setMapScale(select.value));
  }

  // ---- one head, enlarged, with its tokens ---------------------------------------------------
  const detail = document.getElementById("detail");
  const big = document.getElementById("big");
  const readout = document.getElementById("readout");
  let current = null; // {l, h}

  function value(map, head, row, col) {
    const i = row * map.w + col;
    return map.alpha[i] === 0 ? null : (map.grey[i] / 255) * head.max;
  }

  function fmt(v) {
    return v === null ? "masked" : v.toPrecision(3);
  }

  function tokenList(container, labels, count, block) {
    container.textContent = "";
    const shown = Math.min(count, labels.length);
    for (let i = 0; i < shown; i++) {
      const span = el("span", "tok", labels[i]);
      span.dataset.index = String(i);
      span.dataset.cell = String(Math.floor(i / block));
      container.appendChild(span);
    }
    return Array.from(container.children);
  }

  function shade(spans, weights) {
    let top = 0;
    for (const w of weights) if (w !== null && w > top) top = w;
    spans.forEach((span) => {
      const w = weights[Number(span.dataset.cell)];
      const a = w === null || top === 0 ? 0 : w / top;
      span.style.background = a > 0 ? "rgba(217, 72, 15, " + (0.08 + 0.82 * a).toFixed(3) + ")" : "";
      span.style.color = a > 0.6 ? "#fff" : "";
    });
  }

  function clearTokens(spans) {
    spans.forEach((span) => {
      span.style.background = "";
      span.style.color = "";
      span.classList.remove("active");
    });
  }

  let qSpans = [];
  let kSpans = [];

  // Focus one token: a query shades the keys it attends to (its row), a key the queries that
  // attend to it (its column); a pooled map answers with the token's block.
  function focus(side, index) {
    const { l, h } = current;
    const layer = data.maps[l];
    const map = decoded[l][h];
    const cell = Math.floor(index / layer.block);
    const isQuery = side === "q";
    if (!map || cell >= (isQuery ? map.h : map.w)) return;
    const weights = [];
    for (let j = 0; j < (isQuery ? map.w : map.h); j++) {
      weights.push(isQuery ? value(map, layer.heads[h], cell, j)
        : value(map, layer.heads[h], j, cell));
    }
    const own = isQuery ? qSpans : kSpans;
    clearTokens(own);
    if (own[index]) own[index].classList.add("active");
    shade(isQuery ? kSpans : qSpans, weights);
    const label = JSON.stringify(data.labels[isQuery ? layer.qlabels : layer.klabels][index]);
    readout.textContent = isQuery
      ? "query " + index + " " + label + " attends to the keys shaded on the right (row maximum " +
        fmt(Math.max(...weights.map((w) => w || 0))) + ")"
      : "key " + index + " " + label + " is attended by the queries shaded on the left";
    body.dataset.focus = side + index;
  }

  const focusQuery = (index) => focus("q", index);
  const focusKey = (index) => focus("k", index);

  function openDetail(l, h) {
    const layer = data.maps[l];
    if (!layer || !layer.heads[h]) return;
    current = { l: l, h: h };
    const map = decoded[l][h];
    const head = layer.heads[h];
    if (map) paint(big, map, headLut(head), true);
    colourBar(document.getElementById("detail-bar"), data.lut.map, "0",
      scaleTop(head).toPrecision(3), "attention probability · " + (mapScale === "shared"
        ? "one scale for every head" : "this head from 0 to its maximum"));
    const scale = Math.min(560 / Math.max(map ? map.w : 1, map ? map.h : 1), 1e6);
    big.style.height = map ? Math.round(map.h * scale) + "px" : "";
    big.style.width = map ? Math.round(map.w * scale) + "px" : "";
    document.getElementById("detail-title").textContent = layer.name + " · head " + h + " (0–" +
      (layer.heads.length - 1) + ") · " + layer.q + " queries × " + layer.k + " keys · max " +
      head.max.toPrecision(3) + (layer.block > 1 ? " · " + layer.block + "×" + layer.block +
      " blocks" : "");
    qSpans = tokenList(document.getElementById("qtokens"), data.labels[layer.qlabels], layer.q,
      layer.block);
    kSpans = tokenList(document.getElementById("ktokens"), data.labels[layer.klabels], layer.k,
      layer.block);
    qSpans.forEach((span, i) => span.addEventListener("mouseenter", () => focusQuery(i)));
    kSpans.forEach((span, i) => span.addEventListener("mouseenter", () => focusKey(i)));
    readout.textContent = "hover the map or a token";
    detail.hidden = false;
    detail.dataset.open = "L" + l + "H" + h;
    detail.dataset.queries = String(qSpans.length);
    detail.dataset.keys = String(kSpans.length);
    // report_rows.js draws this head's full-resolution query rows, if the page has any, with
    // this script's own decoder
    document.dispatchEvent(new CustomEvent("attnviz:open", {
      detail: { l: l, h: h, data: data, decode: decode } }));
    if (location.hash !== "#L" + l + "H" + h) setAddress("#L" + l + "H" + h);
  }

  // a sandboxed frame (the notebook view) has an opaque origin, where replaceState throws:
  // the shareable #L2H5 address is a convenience, never worth a script error
  function setAddress(address) {
    try { history.replaceState(null, "", address); } catch (error) { /* no address bar */ }
  }

  function closeDetail() {
    detail.hidden = true;
    current = null;
    setAddress(location.pathname + location.search);
  }

  function step(delta) {
    if (!current) return;
    const flat = [];
    data.maps.forEach((layer, l) => layer.heads.forEach((_, h) => flat.push([l, h])));
    const at = flat.findIndex(([l, h]) => l === current.l && h === current.h);
    const next = flat[(at + delta + flat.length) % flat.length];
    openDetail(next[0], next[1]);
  }

  big.addEventListener("mousemove", (event) => {
    if (!current) return;
    const { l, h } = current;
    const layer = data.maps[l];
    const map = decoded[l][h];
    if (!map) return;
    const rect = big.getBoundingClientRect();
    const col = Math.min(map.w - 1, Math.floor(((event.clientX - rect.left) / rect.width) * map.w));
    const row = Math.min(map.h - 1, Math.floor(((event.clientY - rect.top) / rect.height) * map.h));
    const q = row * layer.block;
    const k = col * layer.block;
    const ql = data.labels[layer.qlabels];
    const kl = data.labels[layer.klabels];
    focusQuery(q);
    kSpans.forEach((span) => span.classList.toggle("active", Number(span.dataset.cell) === col));
    readout.textContent = "query " + (layer.block > 1 ? q + "…" : q + " ") +
      JSON.stringify(ql[q]) + " → key " + (layer.block > 1 ? k + "…" : k + " ") +
      JSON.stringify(kl[k]) + ": " + fmt(value(map, layer.heads[h], row, col));
  });
  document.getElementById("close").addEventListener("click", closeDetail);
  document.getElementById("prev").addEventListener("click", () => step(-1));
  document.getElementById("next").addEventListener("click", () => step(1));
  detail.addEventListener("click", (event) => { if (event.target === detail) closeDetail(); });
  document.addEventListener("keydown", (event) => {
    if (detail.hidden) return;
    if (event.key === "Escape") closeDetail();
    if (event.key === "ArrowLeft") step(-1);
    if (event.key === "ArrowRight") step(1);
  });

  // #L2H5 opens layer 2 head 5; #L2H5Q7 (or K7) also focuses query (key) 7: shareable links.
  function openFromHash() {
    const match = /^#L(\d+)H(\d+)(?:([QK])(\d+))?$/.exec(location.hash);
    if (!match) return;
    openDetail(Number(match[1]), Number(match[2]));
    if (match[3] === "Q") focusQuery(Number(match[4]));
    if (match[3] === "K") focusKey(Number(match[4]));
  }

  // ---- image overlays -----------------------------------------------------------------------
  const overlays = [];
  // "shared": every panel from 0 to the largest value of any panel; "panel": each its own
  let overlayScale = "shared";
  let overlayMax = 0;

  function topGrey(map) {
    let top = 0;
    for (let i = 0; i < map.grey.length; i++) if (map.grey[i] > top) top = map.grey[i];
    return top;
  }

  function overlayHeat(entry) {
    const stored = entry.cell.heat.max;
    const own = (topGrey(entry.map) / 255) * stored;
    const top = overlayScale === "shared" ? overlayMax : own;
    return colour(entry.map, rescaled(data.lut.overlay, stored, top), false);
  }

  function drawOverlayBar() {
    if (overlayScale === "shared") {
      colourBar(document.getElementById("overlay-bar"), data.lut.overlay, "0",
        overlayMax.toPrecision(3), "attention, one scale for every panel");
    } else {
      colourBar(document.getElementById("overlay-bar"), data.lut.overlay, "0", "max",
        "each panel from 0 to its own maximum");
    }
  }

  function setOverlayScale(value, alpha) {
    overlayScale = value === "panel" ? "panel" : "shared";
    body.dataset.overlayScale = overlayScale;
    overlays.forEach((entry) => {
      if (!entry.map) return;
      entry.heat = overlayHeat(entry);
      drawOverlay(entry, alpha);
    });
    drawOverlayBar();
  }

  function drawOverlay(entry, alpha) {
    const { canvas, image, heat, cell, vision, row } = entry;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    ctx.drawImage(image, 0, 0, vision.w, vision.h);
    if (heat) {
      ctx.globalAlpha = alpha;
      ctx.drawImage(heat, 0, 0, vision.w, vision.h);
      ctx.globalAlpha = 1;
    }
    const unit = Math.max(1, vision.w / 200);
    if (cell.box) {
      const [x0, y0, x1, y1] = cell.box;
      ctx.strokeStyle = "lime";
      ctx.lineWidth = 2 * unit;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      if (cell.label) {
        ctx.font = Math.round(9 * unit) + "px sans-serif";
        ctx.fillStyle = "lime";
        const width = ctx.measureText(cell.label).width + 4 * unit;
        ctx.fillRect(x0, Math.max(0, y1 - 12 * unit), width, 12 * unit);
        ctx.fillStyle = "black";
        ctx.fillText(cell.label, x0 + 2 * unit, Math.max(9 * unit, y1 - 3 * unit));
      }
    }
    ctx.strokeStyle = "cyan";
    ctx.lineWidth = 2 * unit;
    for (const [px, py] of vision.points[row] || []) {
      const r = 4 * unit;
      ctx.beginPath();
      ctx.moveTo(px - r, py - r);
      ctx.lineTo(px + r, py + r);
      ctx.moveTo(px + r, py - r);
      ctx.lineTo(px - r, py + r);
      ctx.stroke();
    }
  }

  async function drawOverlays() {
    const vision = data.vision;
    const grid = document.getElementById("overlay-grid");
    if (!vision || !grid) return;
    const image = await new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the input image does not decode"));
      img.src = "data:image/png;base64," + vision.image;
    });
    const jobs = [];
    vision.rows.forEach((row, rowIndex) => {
      const line = el("div", "grid-row");
      line.appendChild(nameLabel(row.length ? row[row.length - 1].title.split(" · ")[0] : ""));
      row.forEach((cell) => {
        const box = el("div", "head-cell");
        const canvas = el("canvas", "overlay");
        canvas.width = vision.w;
        canvas.height = vision.h;
        canvas.title = cell.title;
        canvas.addEventListener("click", () => canvas.classList.toggle("large"));
        box.appendChild(canvas);
        box.appendChild(el("div", "overlay-title", cell.title.split(" · ").pop()));
        line.appendChild(box);
        const entry = { canvas: canvas, image: image, heat: null, map: null, cell: cell,
          vision: vision, row: rowIndex };
        overlays.push(entry);
        if (cell.heat) {
          jobs.push(decode(cell.heat.png).then((map) => {
            entry.map = map;
            overlayMax = Math.max(overlayMax, (topGrey(map) / 255) * cell.heat.max);
          }));
        } else {
          drawOverlay(entry, data.alpha);
        }
      });
      grid.appendChild(line);
    });
    await Promise.all(jobs);
    const slider = document.getElementById("alpha");
    setOverlayScale(overlayScale, data.alpha); // the shared top is known once all are decoded
    body.dataset.overlays = String(overlays.length);
    slider.addEventListener("input", () => {
      overlays.forEach((entry) => drawOverlay(entry, Number(slider.value)));
    });
    const select = document.getElementById("overlay-scale");
    if (select) {
      select.addEventListener("change", () => setOverlayScale(select.value,
        Number(slider.value)));
    }
  }

  Promise.all([drawGrid(), drawOverlays()]).then(() => {
    fitNames();
    openFromHash();
    body.dataset.ready = "1";
  }).catch((error) => fail(String(error)));
  window.addEventListener("hashchange", openFromHash);
})();
