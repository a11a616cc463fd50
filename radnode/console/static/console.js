// The dashboard's only script: polls the node's API with the session cookie and redraws the tables in place,
// so a page follows the work without reloading; actions POST with the session's CSRF token.
"use strict";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const PATIENT = document.body.dataset.patientData === "true";
const POLL_MS = 1500;

async function api(path, options = {}) {
  const headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
  if (options.method && options.method !== "GET") { headers["X-CSRF-Token"] = CSRF; headers["Content-Type"] = "application/json"; }
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (response.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); throw new Error("signed out"); }
  const body = response.headers.get("content-type", "").includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error((body && body.detail) ? JSON.stringify(body.detail) : response.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v); }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : ""; }
function toast(text) { const t = document.getElementById("toast"); t.textContent = text; t.style.display = "block"; setTimeout(() => { t.style.display = "none"; }, 4000); }

function jobRow(job) {
  const cells = [el("td", {}, el("a", { href: "/jobs/" + job.id, class: "job-link" }, "#" + job.id))];
  if (PATIENT) cells.push(el("td", {}, job.patient_id || ""));
  cells.push(el("td", { class: "uid" }, job.study_instance_uid), el("td", {}, job.calling_ae), el("td", {}, job.pipeline),
    el("td", {}, el("span", { class: "state " + job.state }, job.state), job.reason ? el("div", { class: "muted" }, job.reason) : ""),
    el("td", {}, job.priority), el("td", {}, when(job.created_at)), el("td", {}, when(job.updated_at)),
    el("td", {}, job.needs_review === true ? "flagged" : job.needs_review === false ? "ok" : ""));
  return el("tr", { "data-job-id": job.id, "data-state": job.state }, ...cells);
}

async function refreshJobs(query) {
  const table = document.getElementById("jobs");
  if (!table) return;
  const data = await api("/api/jobs?" + query);
  table.tBodies[0].replaceChildren(...data.jobs.map(jobRow));
  document.getElementById("jobs-count").textContent = data.total + " job(s)";
}

function filterQuery() {
  const form = document.getElementById("filters");
  const params = new URLSearchParams();
  if (form) for (const [k, v] of new FormData(form)) if (v) params.set(k, v);
  if (document.body.dataset.page === "review") params.set("needs_review", "true");
  if (document.body.dataset.page === "overview") params.set("limit", "20");
  return params.toString();
}

async function refreshHealth() {
  const box = document.getElementById("health");
  if (!box) return;
  const h = await api("/health");
  box.replaceChildren(...Object.entries(h.jobs).map(([state, n]) => el("div", { class: "card" }, el("b", {}, n), state)),
    el("div", { class: "card" }, el("b", {}, h.needs_review), "flagged for review"));
}

async function refreshJob() {
  const section = document.getElementById("job");
  if (!section) return;
  const job = await api("/api/jobs/" + section.dataset.jobId);
  const state = document.getElementById("job-state");
  state.textContent = job.state; state.className = "state " + job.state;
  const facts = [["Study", job.study_instance_uid], ["Pipeline", job.pipeline], ["Priority", job.priority],
    ["From", job.calling_ae + " " + job.peer_address], ["Instances", job.instances], ["Runs", job.runs],
    ["Received", when(job.created_at)], ["Updated", when(job.updated_at)], ["Reason", job.reason || ""],
    ["Review", job.needs_review === true ? "flagged: " + job.review_reasons.join("; ") : job.needs_review === false ? "not flagged" : "not assessed"]];
  if (PATIENT) facts.unshift(["Patient ID", job.patient_id || ""]);
  document.getElementById("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  document.querySelector("#deliveries tbody").replaceChildren(...job.deliveries.map(d => el("tr", { "data-destination": d.destination, "data-state": d.state },
    el("td", {}, d.destination), el("td", {}, d.object), el("td", {}, el("span", { class: "state " + d.state }, d.state)),
    el("td", {}, d.attempts), el("td", {}, d.last_error || ""), el("td", {}))));
  document.querySelector("#events tbody").replaceChildren(...job.events.map(e => el("tr", { "data-kind": e.kind },
    el("td", {}, when(e.at)), el("td", {}, e.kind), el("td", {}, e.message))));
}

async function tick() {
  try {
    const page = document.body.dataset.page;
    if (page === "overview") { await refreshHealth(); await refreshJobs(filterQuery()); }
    else if (page === "jobs" || page === "review") await refreshJobs(filterQuery());
    else if (page === "job") await refreshJob();
  } catch (e) { if (e.message !== "signed out") toast(e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "login") return;
  const form = document.getElementById("filters");
  if (form) form.addEventListener("input", tick);
  tick();
  setInterval(tick, POLL_MS);
});
