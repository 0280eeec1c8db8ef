// attnviz report: the head atlas on the grid. The page script fires "attnviz:grid" once the layer x
// head thumbnails exist and "attnviz:open" when a head is opened; this script puts each head's
// top role (code, score, colour) under its thumbnail and the head's role scores and statistics
// in the opened-head panel. The data is `attnviz heads --json`'s document (data.atlas.doc).
// body[data-roles] counts the role badges drawn; #detail[data-roles] lists the opened head's
// roles (the browser tests read these). Text is set with textContent only.
(function () {
  "use strict";
  const SHOWN = ["entropy_bits", "entropy_norm", "first", "previous", "self", "next", "local",
    "distance", "sharp", "prefix"];

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function score(value) {
    return value === null || value === undefined ? "–" : value.toFixed(2);
  }

  // The atlas entry of the page's map row `l`, head `h` (layers are matched by name: the
  // page's rows and the atlas's layers may be in different orders).
  function entry(data, l, h) {
    const atlas = data.atlas;
    const layer = data.maps[l];
    if (!atlas || !layer) return null;
    const index = atlas.doc.layers.findIndex((item) => item.name === layer.name);
    if (index < 0 || !atlas.doc.layers[index].heads[h]) return null;
    return { layer: atlas.doc.layers[index], head: atlas.doc.layers[index].heads[h],
      cell: atlas.cells[index][h] };
  }

  function describe(found) {
    const held = found.head.roles.map((name) => name + " " + score(found.head.scores[name]));
    return held.length ? held.join(", ") : "no role";
  }

  document.addEventListener("attnviz:grid", (event) => {
    const data = event.detail.data;
    if (!data.atlas) return;
    let drawn = 0;
    document.querySelectorAll("canvas.thumb").forEach((canvas) => {
      const found = entry(data, Number(canvas.dataset.layer), Number(canvas.dataset.head));
      if (!found) return;
      const top = found.head.top_role;
      const badge = el("div", "role-badge", top
        ? data.atlas.roles[top].short + " " + score(found.head.top_score) : "–");
      if (found.cell) {
        badge.style.background = found.cell[0];
        badge.style.color = found.cell[1];
      }
      badge.title = describe(found);
      badge.dataset.role = top || "";
      canvas.title += " · " + badge.title;
      canvas.parentNode.insertBefore(badge, canvas.nextSibling);
      drawn += 1;
    });
    document.body.dataset.roles = String(drawn);
  });

  document.addEventListener("attnviz:open", (event) => {
    const { l, h, data } = event.detail;
    const box = document.getElementById("head-roles");
    const detail = document.getElementById("detail");
    if (!box) return;
    box.textContent = "";
    const found = entry(data, l, h);
    box.hidden = !found;
    if (!found) {
      delete detail.dataset.roles;
      return;
    }
    detail.dataset.roles = found.head.roles.join(",");
    box.appendChild(el("h4", "", "roles: " + describe(found) +
      (found.head.top_role ? " · top " + found.head.top_role : "")));
    const table = el("table", "role-scores");
    const head = el("tr");
    ["role", "score", "threshold"].forEach((name) => head.appendChild(el("th", "", name)));
    table.appendChild(head);
    Object.entries(data.atlas.roles).forEach(([name, role]) => {
      const row = el("tr", found.head.roles.includes(name) ? "held" : "");
      const label = el("td");
      const chip = el("span", "role-chip", role.short);
      chip.style.background = role.colour;
      chip.style.color = role.text;
      label.appendChild(chip);
      label.appendChild(document.createTextNode(name));
      row.appendChild(label);
      row.appendChild(el("td", "", score(found.head.scores[name])));
      row.appendChild(el("td", "", "≥ " + role.threshold));
      table.appendChild(row);
    });
    box.appendChild(table);
    const stats = found.head.statistics;
    box.appendChild(el("p", "role-stats", SHOWN.filter((name) => stats[name] !== null &&
      stats[name] !== undefined).map((name) => name + " " + stats[name].toFixed(3))
      .join(" · ")));
  });
})();
