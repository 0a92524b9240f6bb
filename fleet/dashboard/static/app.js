// imu-fleet dashboard: one EventSource, a snapshot then deltas. Every string that came from the
// broker is written with textContent (never innerHTML), so a node id or a label is only text.
"use strict";

const state = {
  nodes: new Map(), rollouts: new Map(), sensors: new Map(), sites: {},
  resultSeq: 0, skew: 0, ethogramLength: 120, stats: null, dirty: false,
};

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function serverNow() { return Date.now() / 1000 + state.skew; }

function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, serverNow() - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function applySnapshot(snap) {
  state.nodes.clear(); state.rollouts.clear(); state.sensors.clear();
  state.resultSeq = snap.result_seq;
  state.sites = snap.sites || {};
  state.ethogramLength = snap.limits.ethogram_length;
  for (const n of snap.nodes) state.nodes.set(n.node_id, n);
  for (const r of snap.rollouts) state.rollouts.set(r.rollout_id, r);
  for (const s of snap.sensors) {
    state.sensors.set(s.sensor_id, {
      sensor_id: s.sensor_id, node_id: s.node_id, model: s.model,
      ethogram: s.ethogram.map(([n, ts, motif, confidence, label]) => ({ n, ts, motif, confidence, label })),
    });
  }
}

function applyDelta(delta) {
  for (const n of delta.nodes) {
    // a delta carries the newest sparkline point only: append it to what the page has
    const history = state.nodes.get(n.node_id)?.history || [];
    for (const point of n.history) {
      if (!history.length || point[0] > history[history.length - 1][0]) history.push(point);
    }
    while (history.length > HISTORY_POINTS) history.shift();
    n.history = history;
    state.nodes.set(n.node_id, n);
  }
  for (const id of delta.removed_nodes) state.nodes.delete(id);
  if (delta.sites) state.sites = delta.sites;  // the whole map of site -> link up
  for (const r of delta.rollouts) state.rollouts.set(r.rollout_id, r);
  for (const id of delta.removed_rollouts) state.rollouts.delete(id);
  for (const id of delta.removed_sensors) state.sensors.delete(id);
  for (const r of delta.results) {
    if (r.n <= state.resultSeq) continue; // already in the snapshot
    state.resultSeq = r.n;
    let sensor = state.sensors.get(r.sensor_id);
    if (!sensor) {
      sensor = { sensor_id: r.sensor_id, node_id: r.node_id, model: r.model, ethogram: [] };
      state.sensors.set(r.sensor_id, sensor);
    }
    sensor.node_id = r.node_id; sensor.model = r.model;
    sensor.ethogram.push({ n: r.n, ts: r.ts, motif: r.motif, confidence: r.confidence, label: r.label });
    if (sensor.ethogram.length > state.ethogramLength) sensor.ethogram.shift();
  }
}

const HISTORY_POINTS = 120, HISTORY_S = 3600;  // sparklines: the last hour
const SVG = "http://www.w3.org/2000/svg";

function sparkline(history) {
  // windows/s and p95 each scaled to their own peak over the hour; a red mark where errors came
  const w = 120, h = 26, svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const start = serverNow() - HISTORY_S;
  const x = (ts) => Math.max(0, Math.min(w, ((ts - start) / HISTORY_S) * w)).toFixed(1);
  const line = (index, cls) => {
    const values = history.map((p) => p[index]).filter((v) => v !== null);
    const peak = Math.max(...values, 1e-9);
    const points = history.filter((p) => p[index] !== null)
      .map((p) => `${x(p[0])},${(h - 2 - (p[index] / peak) * (h - 4)).toFixed(1)}`);
    if (points.length === 1) points.push(points[0].replace(/^[^,]+/, (v) => String(Number(v) + 2)));
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute("class", cls); poly.setAttribute("points", points.join(" "));
    svg.appendChild(poly);
    return values.length ? Math.max(...values) : null;
  };
  const wps = line(1, "wps"), p95 = line(2, "p95");
  let errors = 0;
  for (const p of history) {
    if (!p[3]) continue;
    errors += p[3];
    const mark = document.createElementNS(SVG, "line");
    mark.setAttribute("class", "errors");
    mark.setAttribute("x1", x(p[0])); mark.setAttribute("x2", x(p[0]));
    mark.setAttribute("y1", 0); mark.setAttribute("y2", h);
    svg.appendChild(mark);
  }
  const title = document.createElementNS(SVG, "title");
  title.textContent = `last hour: windows/s up to ${fmt(wps, 1)}, p95 up to ${fmt(p95, 1)} ms, ${errors} errors`;
  svg.appendChild(title);
  return svg;
}

const OUTCOME_TTL_S = 1800;  // a failed move or an error older than this no longer calls for action
const BENIGN = new Set(["sequence_reset"]);  // reported for the record: a sensor restarted

function cell(row, label, cls, text) {
  const td = el("td", cls, text);
  td.setAttribute("data-label", label);
  row.appendChild(td);
  return td;
}

function nodeStatus(n) {
  // a node behind a site bridge that is down: its last report is all the fleet has of it
  if (n.site && state.sites[n.site] === false) return "unreachable";
  const stale = n.state === "online" && n.telemetry_ts && n.interval_s &&
    serverNow() - n.telemetry_ts > 3 * n.interval_s + 2;
  return stale ? "stale" : (n.state || "unknown");
}

function renderNodes() {
  const body = document.querySelector("#nodes tbody");
  // grouped by site when nodes name theirs (sites bridged to this broker), nodes naming none last
  const siteOf = (id) => state.nodes.get(id).site || "";
  const ids = [...state.nodes.keys()].sort((a, b) =>
    (siteOf(a) === "") - (siteOf(b) === "") || siteOf(a).localeCompare(siteOf(b)) || a.localeCompare(b));
  const bySite = ids.some((id) => siteOf(id));
  const rows = [];
  let lastSite = null;
  for (const id of ids) {
    const n = state.nodes.get(id);
    if (bySite && siteOf(id) !== lastSite) {
      lastSite = siteOf(id);
      rows.push(siteRow(lastSite, ids.filter((other) => siteOf(other) === lastSite).length));
    }
    const tr = el("tr");
    tr.setAttribute("data-node", id);
    const who = cell(tr, "node", "node");
    who.appendChild(el("b", null, id));
    if (n.group || n.host) who.appendChild(el("span", "sub", [n.group, n.host].filter(Boolean).join(" · ")));
    const st = nodeStatus(n);
    const live = st === "online";  // an offline, stopped or silent node's figures are history
    if (!live) tr.classList.add("inactive");
    const status = cell(tr, "status", "status");
    status.appendChild(el("span", `badge ${st}`, st));
    if (n.state !== "online" && n.reason) status.appendChild(el("span", "sub", n.reason));
    cell(tr, "backend", "backend", n.backend || "–");
    const model = cell(tr, "model", "model");
    model.appendChild(el("span", null, n.model.name ? `${n.model.name} ${n.model.version}` : "–"));
    const failedLongAgo = n.model.state === "failed" && n.model.ts && serverNow() - n.model.ts > OUTCOME_TTL_S;
    if (n.model.state && !failedLongAgo) {
      const sub = el("span", "sub");
      sub.appendChild(el("span", `badge ${n.model.state}`, n.model.state));
      if (n.model.target && n.model.state !== "active") sub.appendChild(document.createTextNode(` → ${n.model.target}`));
      if (n.model.state === "failed") sub.appendChild(el("span", "when", ` ${ago(n.model.ts)}`));
      model.appendChild(sub);
    }
    cell(tr, "windows/s", "num wps", live ? fmt(n.windows_per_s, 1) : "–");
    cell(tr, "p95 ms", "num p95", live ? fmt(n.p95_ms, 1) : "–");
    const spark = cell(tr, "last hour", "spark");
    if (n.history && n.history.length) spark.appendChild(sparkline(n.history));
    cell(tr, "queue", "num queue", !live || n.queue_depth === null ? "–" : `${n.queue_depth}/${n.queue_capacity}`);
    const temp = n.accelerator_temperature_c !== null ? `${fmt(n.temperature_c, 0)} / ${fmt(n.accelerator_temperature_c, 0)}` : fmt(n.temperature_c, 1);
    cell(tr, "temp °C", "num temp", live ? temp : "–");
    const err = cell(tr, "last error", "err");
    const last = n.last_error;
    if (last) {
      // a sensor that restarted its sequence is an event, not a fault; old errors fade
      const kind = BENIGN.has(last.kind) ? "event" : (serverNow() - last.ts > OUTCOME_TTL_S ? "old" : "fault");
      err.classList.add(kind);
      err.appendChild(el("span", null, `${kind === "event" ? "event" : last.kind}: ${last.reason}`));
      err.appendChild(el("span", "sub", ago(last.ts)));
    } else if (n.model.error && !failedLongAgo) {
      err.appendChild(el("span", null, n.model.error));
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  document.getElementById("nodes-empty").hidden = rows.length > 0;
}

function siteRow(site, count) {
  const tr = el("tr", "site");
  const td = el("td");
  td.colSpan = 10;
  td.appendChild(el("b", null, site ? `site ${site}` : "no site"));
  const up = site ? state.sites[site] : undefined;
  const link = up === undefined ? "link unknown" : (up ? "link up" : "link DOWN: last known state");
  if (site) td.appendChild(el("span", `badge ${up === false ? "unreachable" : (up ? "online" : "stale")}`, link));
  td.appendChild(el("span", "sub", `${count} node${count === 1 ? "" : "s"}`));
  tr.appendChild(td);
  return tr;
}

function renderRollouts() {
  const box = document.getElementById("rollouts");
  const active = (r) => r.state === "running" || r.state === "paused";
  const list = [...state.rollouts.values()].sort((a, b) =>
    (active(b) - active(a)) || (b.updated_at - a.updated_at)).slice(0, 12);
  const items = list.map((r) => {
    const div = el("div", "rollout");
    div.setAttribute("data-rollout", r.rollout_id);
    const title = el("div", "title");
    title.appendChild(el("b", null, `${r.name} ${r.version}`));
    title.appendChild(el("span", `badge ${r.state}`, r.state));
    title.appendChild(el("span", "wavecount", `wave ${r.wave} of ${r.waves_total}`));
    title.appendChild(el("span", "sub", `${r.rollout_id}${r.group ? " · group " + r.group : ""} · failures ${r.failures}/${r.max_failures} allowed · ${ago(r.updated_at)}`));
    div.appendChild(title);
    r.waves.forEach((wave, i) => {
      const row = el("div", i + 1 === r.wave && active(r) ? "wave current" : "wave");
      row.appendChild(el("span", "wlabel", i === 0 ? "canary" : `wave ${i + 1}`));
      for (const node of wave) {
        const chip = el("span", `chip ${node.state || ""}`, node.node_id);
        chip.title = node.error ? `${node.state}: ${node.error}` : (node.state || "");
        row.appendChild(chip);
      }
      div.appendChild(row);
    });
    if (r.hidden_nodes) div.appendChild(el("div", "sub", `and ${r.hidden_nodes} more nodes`));
    if (r.reason) div.appendChild(el("div", "sub", r.reason));
    if (r.timeline && r.timeline.length) {
      const line = el("ol", "timeline");
      for (const [ts, text] of r.timeline) {
        const item = el("li", null);
        item.appendChild(el("time", null, new Date(ts * 1000).toLocaleTimeString()));
        item.appendChild(document.createTextNode(` ${text}`));
        line.appendChild(item);
      }
      div.appendChild(line);
    }
    return div;
  });
  box.replaceChildren(...items);
  document.getElementById("rollouts-empty").hidden = items.length > 0;
}

function bouts(ethogram) {
  const out = [];
  for (const e of ethogram) {
    const last = out[out.length - 1];
    if (last && last.motif === e.motif && last.label === e.label) {
      last.count += 1; last.sum += e.confidence;
    } else {
      out.push({ motif: e.motif, label: e.label, count: 1, sum: e.confidence });
    }
  }
  return out;
}

function renderSensors() {
  const box = document.getElementById("sensors");
  const ids = [...state.sensors.keys()].sort();
  const items = ids.map((id) => {
    const s = state.sensors.get(id);
    const div = el("div", "sensor");
    div.setAttribute("data-sensor", id);
    const who = el("div", "who");
    who.appendChild(el("b", null, id));
    const latest = s.ethogram[s.ethogram.length - 1];
    const now = el("span", "now");
    if (latest) {
      now.appendChild(el("span", "now-label", latest.label));
      now.appendChild(document.createTextNode(" "));
      now.appendChild(el("span", "now-confidence", `${Math.round(latest.confidence * 100)}%`));
    }
    who.appendChild(now);
    who.appendChild(el("span", "sub", `${s.node_id} · ${s.model}`));
    div.appendChild(who);
    const strip = el("div", "strip");
    for (const b of bouts(s.ethogram)) {
      const mean = b.sum / b.count;
      const bout = el("span", `bout m${b.motif}`, b.count >= 6 ? b.label : "");
      bout.style.flexGrow = String(b.count);
      bout.style.flexBasis = "0";
      bout.style.opacity = String(0.35 + 0.65 * mean);
      bout.title = `${b.label}: ${b.count} windows, mean confidence ${Math.round(mean * 100)}%`;
      strip.appendChild(bout);
    }
    const free = state.ethogramLength - s.ethogram.length;
    if (free > 0) {
      const pad = el("span", "bout");
      pad.style.flexGrow = String(free); pad.style.flexBasis = "0"; pad.style.order = "-1";
      strip.appendChild(pad);
    }
    div.appendChild(strip);
    return div;
  });
  box.replaceChildren(...items);
  document.getElementById("sensors-empty").hidden = items.length > 0;
}

function renderSummary() {
  const nodes = [...state.nodes.values()];
  document.getElementById("sum-online").textContent = String(nodes.filter((n) => n.state === "online").length);
  document.getElementById("sum-nodes").textContent = String(nodes.length);
  document.getElementById("sum-rollouts").textContent = String(
    [...state.rollouts.values()].filter((r) => r.state === "running" || r.state === "paused").length);
  document.getElementById("sum-sensors").textContent = String(state.sensors.size);
  const st = state.stats;
  if (st) document.getElementById("stats").textContent =
    `${st.messages} messages read, ${st.rejected} rejected · updated ${new Date().toLocaleTimeString()}`;
}

function render() {
  state.dirty = false;
  renderNodes(); renderRollouts(); renderSensors(); renderSummary();
}

function schedule() {
  if (state.dirty) return;
  state.dirty = true;
  requestAnimationFrame(render);
}

function setLink(up, text) {
  const link = document.getElementById("link");
  link.className = up ? "link up" : "link down";
  link.textContent = text;
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("open", () => setLink(true, "live"));
  source.addEventListener("error", () => setLink(false, "reconnecting"));
  // a snapshot (on connecting) and deltas carry the server's clock and counters alike
  const update = (apply) => (event) => {
    const message = JSON.parse(event.data);
    state.skew = message.now - Date.now() / 1000;
    state.stats = message.stats;
    apply(message);
    schedule();
  };
  source.addEventListener("snapshot", update(applySnapshot));
  source.addEventListener("delta", update(applyDelta));
  setInterval(schedule, 5000); // ages and staleness move on without events
}

document.addEventListener("DOMContentLoaded", connect);
