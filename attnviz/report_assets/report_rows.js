// attnviz report: the opened head's full-resolution query rows, drawn as strips (the page script
// fires "attnviz:open" with the head, the page data and its PNG decoder). A row is stored over
// every key (an 8-bit PNG, wrapped into lines of `wrap` keys); its strip shows it max-pooled to the strip's
// pixels, so one attended key far away still lights its pixel, and lists the row's top keys
// computed from the full-precision row. #detail[data-rows] counts the strips drawn (tests).
(function () {
  "use strict";
  const MASKED = [220, 220, 220];
  const STRIP_PX = 1120;
  let opened = 0; // the latest open: a slow decode for an earlier head draws nothing

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // one query's keys, in order: grey (null where masked) from the wrapped lines
  function row(image, entry, index) {
    const lines = Math.ceil(entry.keys / entry.wrap);
    const out = new Array(entry.keys);
    for (let k = 0; k < entry.keys; k++) {
      const at = (index * lines + Math.floor(k / entry.wrap)) * image.w + (k % entry.wrap);
      out[k] = image.alpha[at] === 0 ? null : image.grey[at];
    }
    return out;
  }

  function span(keys, width, px) {
    return [Math.floor((px * keys) / width), Math.max(Math.floor((px * keys) / width) + 1,
      Math.floor(((px + 1) * keys) / width))];
  }

  function strip(values, lut, keys) {
    const width = Math.min(keys, STRIP_PX);
    const canvas = el("canvas", "row-strip");
    canvas.width = width;
    canvas.height = 1;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(width, 1);
    for (let px = 0; px < width; px++) {
      const [a, b] = span(keys, width, px);
      let top = null;
      for (let k = a; k < b; k++) if (values[k] !== null && (top === null || values[k] > top)) top = values[k];
      const c = top === null ? MASKED : lut[top];
      out.data.set([c[0], c[1], c[2], 255], 4 * px);
    }
    ctx.putImageData(out, 0, 0);
    return canvas;
  }

  function draw(box, entry, head, image, data) {
    const layer = data.maps[entry.layer];
    const keyNames = layer ? data.labels[layer.klabels] : [];
    box.appendChild(el("h4", "", "Full-resolution rows · " + entry.keys + " keys (each " +
      "strip: one query over every key, the largest per pixel, from 0 to the row's maximum)"));
    entry.queries.forEach((query, i) => {
      const values = row(image, entry, i);
      const item = el("div", "row-item");
      const top = head.max[i];
      item.appendChild(el("div", "row-title", "query " + query + " " +
        JSON.stringify(entry.qnames[i]) + " · max " + top.toPrecision(3)));
      const canvas = strip(values, data.lut.map, entry.keys);
      const readout = el("div", "row-readout", "top keys: " + head.top[i].map(
        ([k, name, p]) => k + " " + JSON.stringify(name) + " " + p.toPrecision(3)).join(" · "));
      const topText = readout.textContent;
      canvas.addEventListener("mousemove", (event) => {
        const rect = canvas.getBoundingClientRect();
        const px = Math.min(canvas.width - 1,
          Math.floor(((event.clientX - rect.left) / rect.width) * canvas.width));
        const [a, b] = span(entry.keys, canvas.width, px);
        let best = a;
        for (let k = a; k < b; k++) if ((values[k] || 0) > (values[best] || 0)) best = k;
        const v = values[best];
        readout.textContent = "keys " + a + (b - 1 > a ? "–" + (b - 1) : "") + ": max " +
          (v === null ? "masked" : ((v / 255) * top).toPrecision(3)) + " at key " + best +
          " " + JSON.stringify(keyNames[best] !== undefined ? keyNames[best] : String(best));
      });
      canvas.addEventListener("mouseleave", () => { readout.textContent = topText; });
      item.appendChild(canvas);
      item.appendChild(readout);
      box.appendChild(item);
    });
  }

  document.addEventListener("attnviz:open", (event) => {
    const { l, h, data, decode } = event.detail;
    const box = document.getElementById("rows");
    const detail = document.getElementById("detail");
    if (!box || !detail) return;
    const mine = ++opened;
    box.textContent = "";
    const entry = (data.rows || []).find((r) => r.layer === l);
    const head = entry ? entry.heads[h] : undefined;
    detail.dataset.rows = "0";
    box.hidden = !head;
    if (!head) return;
    decode(head.png).then((image) => {
      if (mine !== opened) return;
      draw(box, entry, head, image, data);
      detail.dataset.rows = String(entry.queries.length);
    });
  });
})();
