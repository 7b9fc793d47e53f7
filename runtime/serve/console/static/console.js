// loraplex console: the Serving page's live figures. Polls the JSON named by
// #serving[data-source] every data-every ms and draws with SVG elements; no library, no
// inline script (the page's Content-Security-Policy allows only this file). Text from the
// server is set with textContent, never parsed as HTML.
"use strict";

(function () {
  const root = document.getElementById("serving");
  if (!root) return;
  const source = root.dataset.source;
  const every = Number(root.dataset.every || 2000);
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 160, PADL = 44, PADB = 18;

  function el(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (x >= 100) return x.toFixed(0);
    return x.toFixed(digits === undefined ? 1 : digits);
  }

  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const v = seconds * 1000;
    return v >= 100 ? v.toFixed(0) + " ms" : v.toFixed(1) + " ms";
  }

  function text(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  // A line chart of several series sharing one y axis (0..max), x = bucket index.
  function chart(svg, series, classes, bucketS) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const n = series[0].length;
    let max = 1;
    for (const s of series) for (const v of s) if (v > max) max = v;
    const nice = Math.pow(10, Math.floor(Math.log10(max)));
    max = Math.ceil(max / nice) * nice;
    const x = (i) => PADL + (i / Math.max(1, n - 1)) * (W - PADL - 4);
    const y = (v) => 4 + (1 - v / max) * (H - PADB - 8);
    for (const f of [0, 0.5, 1]) {
      el("line", {x1: PADL, x2: W - 4, y1: y(max * f), y2: y(max * f), class: "grid-line"}, svg);
      const t = el("text", {x: PADL - 6, y: y(max * f) + 4, class: "axis", "text-anchor": "end"}, svg);
      t.textContent = fmt(max * f, max * f < 10 ? 1 : 0);
    }
    const minutes = Math.round((n * bucketS) / 60);
    const left = el("text", {x: PADL, y: H - 3, class: "axis"}, svg);
    left.textContent = "-" + minutes + " min";
    const right = el("text", {x: W - 4, y: H - 3, class: "axis", "text-anchor": "end"}, svg);
    right.textContent = "now";
    series.forEach((s, k) => {
      const pts = s.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
      el("polyline", {points: pts, class: "series " + classes[k]}, svg);
    });
  }

  function spark(values) {
    const svg = el("svg", {viewBox: "0 0 120 24", class: "spark", preserveAspectRatio: "none"});
    let max = 1;
    for (const v of values) if (v > max) max = v;
    const pts = values.map((v, i) =>
      ((i / Math.max(1, values.length - 1)) * 120).toFixed(1) + "," + (22 - (v / max) * 20).toFixed(1)).join(" ");
    el("polyline", {points: pts, class: "series tokens"}, svg);
    return svg;
  }

  function cell(row, value, cls) {
    const td = document.createElement("td");
    if (value instanceof Node) td.appendChild(value); else td.textContent = value;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function rows(bodyId, items, empty, colspan, fill) {
    const body = document.getElementById(bodyId);
    while (body.firstChild) body.removeChild(body.firstChild);
    if (!items.length) {
      const tr = document.createElement("tr");
      cell(tr, empty, "empty").setAttribute("colspan", colspan);
      body.appendChild(tr);
      return;
    }
    for (const item of items) {
      const tr = document.createElement("tr");
      fill(tr, item);
      body.appendChild(tr);
    }
  }

  function draw(data) {
    if (data.live) {
      text("running", String(data.running));
      text("waiting", String(data.waiting));
      text("tokens-per-s", fmt(data.tokens_per_s));
      text("cold-loads", String(data.cold_loads));
      chart(document.getElementById("chart-tokens"), [data.series.tokens_per_s], ["tokens"], data.bucket_s);
      chart(document.getElementById("chart-requests"), [data.series.running, data.series.waiting],
            ["running", "waiting"], data.bucket_s);
      rows("adapters-body", data.adapters, "No traffic in the last 5 minutes.", 9, (tr, a) => {
        tr.dataset.adapter = a.label;
        cell(tr, a.label, "mono");
        cell(tr, String(a.running));
        cell(tr, String(a.waiting));
        cell(tr, fmt(a.tokens_per_s), "rate");
        cell(tr, spark(a.series.tokens_per_s));
        cell(tr, ms(a.ttft_p50) + " / " + ms(a.ttft_p99));
        cell(tr, ms(a.itl_p50) + " / " + ms(a.itl_p99));
        cell(tr, String(a.requests));
        cell(tr, String(a.cold_loads));
      });
    }
    if (data.engine) text("slots", data.engine.slots_used + " / " + data.engine.slots_total);
    rows("tiers-body", data.resident, "No adapter is loaded.", 6, (tr, r) => {
      cell(tr, r.ref, "mono");
      cell(tr, r.tier === "slot" ? "device slot" : "host memory");
      cell(tr, r.slot === null ? "–" : String(r.slot));
      cell(tr, r.pinned ? "yes" : "");
      cell(tr, String(r.active_sequences));
      cell(tr, r.size);
    });
    text("tiers-note", data.resident_note || "");
    text("updated", "updated " + new Date().toLocaleTimeString());
  }

  async function poll() {
    try {
      const resp = await fetch(source, {credentials: "same-origin", cache: "no-store"});
      if (resp.status === 401) { window.location.assign("/console/signin?why=expired"); return; }
      if (resp.ok) draw(await resp.json());
      else text("updated", "the server answered " + resp.status);
    } catch (e) {
      text("updated", "cannot reach the server");
    }
    setTimeout(poll, every);
  }
  poll();
})();
