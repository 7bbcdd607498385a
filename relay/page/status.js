// The status page: polls the relay's own JSON endpoints every 2 s and renders
// them; no framework, no other origin (the Content-Security-Policy forbids it).
"use strict";

const REFRESH_MS = 2000;
let actions = false;

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(id, rows, render) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  for (const item of rows) render(body.insertRow(), item);
}

async function get(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function post(path) {
  const token = window.prompt("Admin action token (admin.actions.token_file)");
  if (!token) return;
  const response = await fetch(path, { method: "POST", headers: { Authorization: `Bearer ${token}` } });
  window.alert(`${path}: ${response.status} ${await response.text()}`);
}

function renderStatus(s) {
  actions = s.actions;
  document.getElementById("version").textContent = s.version;
  const summary = document.getElementById("summary");
  summary.textContent = `${s.ready ? "ready" : "draining"} · up ${Math.round(s.uptime_s)} s · ` +
    `${s.tunnels} tunnels · ${s.pending} pending heads`;
  summary.className = s.ready ? "" : "draining";
  const rows = [
    ["config", s.config],
    ["last reload", s.last_reload ? `${s.last_reload.result} at ${s.last_reload.at}` +
      (s.last_reload.errors.length ? `: ${s.last_reload.errors.join("; ")}` : "") : "none"],
    ["open files", `${s.open_files.open} of ${s.open_files.limit}`],
  ];
  for (const e of s.egress) {
    rows.push([`egress ${e.name}`, (e.up === null ? "dials per tunnel" : e.up ? "up" : "DOWN") +
      ` · ${e.reconnects} reconnects`]);
  }
  fill("relay", rows, (row, [k, v]) => { cell(row, k); cell(row, v); });
  if (actions) {
    const row = document.querySelector("#relay tbody").insertRow();
    cell(row, "actions");
    const b = document.createElement("button");
    b.textContent = "drain"; b.addEventListener("click", () => post("/drain"));
    row.insertCell().append(b);
  }
  fill("denied", Object.entries(s.denied), (row, [reason, n]) => {
    cell(row, reason); cell(row, n, "num");
  });
}

function renderClients(list) {
  fill("clients", list, (row, c) => {
    cell(row, c.identity);
    const state = row.insertCell();
    const badge = document.createElement("span");
    badge.className = `state state-${c.state}`;
    badge.textContent = c.state;
    state.append(badge);
    cell(row, c.control_planes.map(p =>
      `${p.control_plane || "(other)"}${p.region ? "." + p.region : ""}: ` +
      `${p.config} / ${p.telemetry} / ${p.other}`).join(", "));
    cell(row, c.tunnels, "num");
    cell(row, c.reconnects, "num");
    cell(row, `${c.bytes_up} / ${c.bytes_down}`, "num");
    cell(row, c.last_seen);
    cell(row, c.last_refusal ? `${c.last_refusal.at} ${c.last_refusal.status} ` +
      `${c.last_refusal.reason} ${c.last_refusal.target}` : "");
  });
}

function renderTunnels(list) {
  const host = document.getElementById("filter-host").value;
  const client = document.getElementById("filter-client").value;
  const shown = list
    .filter(t => (!host || t.host.includes(host)) && (!client || t.client.includes(client)))
    .sort((a, b) => b.last_activity.localeCompare(a.last_activity));
  fill("tunnels", shown, (row, t) => {
    cell(row, t.id, "num"); cell(row, t.client); cell(row, `${t.host}:${t.port}`);
    cell(row, t.listener); cell(row, t.egress); cell(row, t.opened_at);
    cell(row, `${t.bytes_up} / ${t.bytes_down}`, "num"); cell(row, t.last_activity);
    const td = row.insertCell();
    if (actions && t.worker === undefined) {
      const b = document.createElement("button");
      b.textContent = "close";
      b.addEventListener("click", () => post(`/tunnels/${t.id}/close`));
      td.append(b);
    }
  });
}

function renderRefusals(list) {
  fill("refusals", list, (row, r) => {
    cell(row, r.at); cell(row, r.client); cell(row, r.identity); cell(row, r.target);
    cell(row, r.status, "num"); cell(row, r.reason);
  });
}

async function refresh() {
  try {
    const [status, clients, tunnels, refusals] = await Promise.all(
      ["/status", "/clients", "/tunnels", "/refusals"].map(get));
    renderStatus(status); renderClients(clients); renderTunnels(tunnels); renderRefusals(refusals);
    document.body.dataset.loaded = "true";
  } catch (err) {
    document.getElementById("summary").textContent = `cannot reach the relay: ${err.message}`;
  } finally {
    window.setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
