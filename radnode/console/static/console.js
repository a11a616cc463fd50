// The dashboard's only script: polls the node's API with the session cookie and redraws the tables in place,
// so a page follows the work without reloading; actions POST with the session's CSRF token.
"use strict";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const PATIENT = document.body.dataset.patientData === "true";
const POLL_MS = 1500;
const WITHHELD = "withheld for your role";  // a text the API withholds from this role (named in `withheld`)

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

function shown(doc, field, empty = "") {  // a document's text, or the marker where the API withheld it
  return (doc.withheld || []).includes(field) ? WITHHELD : (doc[field] || empty);
}
function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : ""; }
function toast(text) { const t = document.getElementById("toast"); t.textContent = text; t.style.display = "block"; setTimeout(() => { t.style.display = "none"; }, 4000); }

const OPERATOR = document.body.dataset.operator === "true";

function jobRow(job) {
  const cells = [el("td", {}, el("a", { href: "/jobs/" + job.id, class: "job-link" }, "#" + job.id))];
  if (PATIENT) cells.push(el("td", {}, job.patient_id || ""));
  cells.push(el("td", { class: "uid" }, job.study_instance_uid), el("td", {}, job.calling_ae), el("td", {}, job.pipeline),
    el("td", {}, (job.modalities || []).join(", ")), el("td", {}, job.study_description || ""));
  if (PATIENT) cells.push(el("td", {}, job.accession_number || ""));
  const reason = shown(job, "reason");
  cells.push(el("td", {}, el("span", { class: "state " + job.state }, job.state), reason ? el("div", { class: "muted" }, reason) : ""),
    el("td", {}, job.priority), el("td", {}, when(job.created_at)), el("td", {}, when(job.updated_at)),
    el("td", {}, job.needs_review === true ? (job.reviewed_by ? "reviewed by " + job.reviewed_by : "flagged") : job.needs_review === false ? "ok" : ""));
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
  if (document.body.dataset.page === "review") { params.set("needs_review", "true"); params.set("reviewed", "false"); }
  if (document.body.dataset.page === "overview") params.set("limit", "20");
  return params.toString();
}

function gb(bytes) { return (bytes / 1e9).toFixed(1) + " GB"; }

async function refreshOverview() {
  const box = document.getElementById("overview");
  if (!box) return;
  const o = await api("/api/overview");
  const card = (value, label, cls = "") => el("div", { class: "card " + cls }, el("b", {}, value), label);
  box.replaceChildren(card(o.ae_title + " :" + o.dicom_port, o.orthanc ? "DICOM, Orthanc in front" : "DICOM listener"),
    card(o.running + " / " + o.workers, "workers busy"), card(o.queued, o.queue_paused ? "queued (PAUSED)" : "queued", o.queue_paused ? "warn" : ""),
    card(gb(o.spool_free_bytes), "spool free of " + gb(o.spool_total_bytes)),
    card(o.done_last_hour, "done last hour"), card(o.done_last_24h, "done last 24 h"),
    card(o.failed_last_24h, "failed last 24 h", o.failed_last_24h ? "bad" : ""));
  const actions = document.getElementById("queue-actions");
  if (OPERATOR) actions.replaceChildren(o.queue_paused
    ? el("button", { class: "primary", id: "queue-resume", onclick: () => act("/api/queue/resume", {}, "queue resumed") }, "Resume the queue")
    : el("button", { id: "queue-pause", onclick: () => act("/api/queue/pause", {}, "queue paused") }, "Pause the queue"));
}

async function act(path, body, done) {
  try { const answer = await api(path, { method: "POST", body: JSON.stringify(body) }); toast(answer.message || done); }
  catch (e) { toast(e.message); }
  tick();
}

function jobActions(job) {
  if (!OPERATOR) return [];
  const id = job.id, buttons = [];
  if (job.state === "failed") buttons.push(el("button", { class: "primary", id: "action-retry", onclick: () => act(`/api/jobs/${id}/retry`, {}) }, "Retry"));
  if (job.failure === "refused") buttons.push(el("button", { id: "action-retry-without-refused", onclick: () => {
    const note = window.prompt("Process the study without its refused instances (listed in the events). Why may it be processed without them?");
    if (note && note.trim()) act(`/api/jobs/${id}/retry`, { without_refused: true, note });
  } }, "Retry without the refused instances"));
  if (["done", "failed", "delivering"].includes(job.state) && job.deliveries.length)
    buttons.push(el("button", { id: "action-resend", onclick: () => act(`/api/jobs/${id}/resend`, {}) }, "Re-send all results"));
  if (!["done", "failed"].includes(job.state)) buttons.push(el("button", { id: "action-cancel", onclick: () => act(`/api/jobs/${id}/cancel`, {}) }, "Cancel"));
  if (job.needs_review === true && !job.reviewed_by) buttons.push(el("button", { id: "action-review", onclick: () => act(`/api/jobs/${id}/review`, {}) }, "Mark reviewed"));
  return buttons;
}

async function refreshJob() {
  const section = document.getElementById("job");
  if (!section) return;
  const id = section.dataset.jobId;
  const job = await api("/api/jobs/" + id);
  const state = document.getElementById("job-state");
  state.textContent = job.state + (job.failure ? ": " + job.failure : ""); state.className = "state " + job.state;
  const banner = document.getElementById("job-banner");
  banner.replaceChildren(...(job.failure === "delivery" ? [el("p", { class: "error banner" }, "Delivery failed: " + job.reason + " ",
    OPERATOR ? el("button", { class: "primary", id: "resend-undelivered", onclick: () => act(`/api/jobs/${id}/resend`, { failed_only: true }) }, "Re-send undelivered") : "")] : []));
  const facts = [["Study", job.study_instance_uid], ["Description", job.study_description], ["Modalities", (job.modalities || []).join(", ")],
    ["Pipeline", job.pipeline], ["Priority", job.priority], ["From", job.calling_ae + " " + job.peer_address], ["Instances", job.instances],
    ["Runs", job.runs], ["Received", when(job.created_at)], ["Updated", when(job.updated_at)],
    ["Reason", shown(job, "reason")],
    ["Review", job.needs_review === true ? "flagged: " + job.review_reasons.join("; ") + (job.reviewed_by ? " (reviewed by " + job.reviewed_by + ")" : "") : job.needs_review === false ? "not flagged" : "not assessed"]];
  if (PATIENT) facts.unshift(["Patient ID", job.patient_id || ""], ["Accession", job.accession_number || ""]);
  document.getElementById("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  document.getElementById("job-actions").replaceChildren(...jobActions(job));
  document.querySelector("#deliveries tbody").replaceChildren(...job.deliveries.map(d => el("tr", { "data-destination": d.destination, "data-state": d.state },
    el("td", {}, d.destination), el("td", {}, d.object), el("td", {}, el("span", { class: "state " + d.state }, d.state)),
    el("td", {}, d.attempts), el("td", {}, shown(d, "last_error")), el("td", { class: "uid" }, d.sent_uid || ""))));
  const destinations = [...new Set(job.deliveries.map(d => d.destination))];
  document.getElementById("destination-actions").replaceChildren(...(OPERATOR && ["done", "failed"].includes(job.state) ? destinations.map(d =>
    el("button", { class: "resend-one", "data-destination": d, onclick: () => act(`/api/jobs/${id}/resend`, { destination: d }) }, "Re-send to " + d)) : []));
  document.querySelector("#events tbody").replaceChildren(...job.events.map(e => el("tr", { "data-kind": e.kind },
    el("td", {}, when(e.at)), el("td", {}, e.kind), el("td", {}, shown(e, "message")))));
  document.getElementById("shadow-comparisons").replaceChildren(...(job.shadow_comparisons.length ? job.shadow_comparisons.map(shadowComparison)
    : [el("p", { class: "muted" }, job.shadow ? "A shadow run: results kept, never delivered; compared once this job and job " + job.sibling_of + " are final."
      : "No candidate pipeline shadows this job.")]));
  const files = await api(`/api/jobs/${id}/files`);
  document.querySelector("#series tbody").replaceChildren(...files.series.map(s => el("tr", {}, el("td", { class: "uid" }, s.series_instance_uid),
    el("td", {}, s.modality), el("td", {}, s.instances), el("td", {}, s.late))));
  document.getElementById("outputs").replaceChildren(...files.outputs.map(o => el("li", {},
    PATIENT ? el("a", { href: `/api/jobs/${id}/outputs/${encodeURIComponent(o.name)}` }, o.name) : o.name, " (" + o.bytes + " bytes)")));
  document.getElementById("stderr").textContent = shown(files, "stderr_tail", "(empty)");
}

function shadowComparison(c) {
  const seconds = v => v === null || v === undefined ? "n/a" : v.toFixed(1) + " s";
  return el("div", { class: "shadow-comparison", "data-candidate": c.candidate_pipeline, "data-state": c.state },
    el("p", {}, `${c.candidate_pipeline} (shadow job `, el("a", { href: "/jobs/" + c.shadow_job_id }, String(c.shadow_job_id)),
      `) vs ${c.production_pipeline} (job `, el("a", { href: "/jobs/" + c.production_job_id }, String(c.production_job_id)), `): ${c.message}`),
    el("p", {}, `wall ${seconds(c.production_wall_seconds)} production, ${seconds(c.candidate_wall_seconds)} candidate; ` +
      `CPU ${seconds(c.production_cpu_seconds)} production, ${seconds(c.candidate_cpu_seconds)} candidate`),
    el("table", { class: "shadow-segments" }, el("thead", {}, el("tr", {}, ...["segment", "Dice", "HD95 mm", "production mL", "candidate mL"].map(h => el("th", {}, h)))),
      el("tbody", {}, ...c.segments.map(s => el("tr", { "data-segment": s.segment }, el("td", {}, s.segment), el("td", { class: "dice" }, figure(s.dice)),
        el("td", {}, figure(s.hd95_mm)), el("td", {}, figure(s.production_volume_ml)), el("td", {}, figure(s.candidate_volume_ml)))))),
    el("table", { class: "shadow-measurements" }, el("thead", {}, el("tr", {}, ...["measurement", "unit", "production", "candidate", "difference"].map(h => el("th", {}, h)))),
      el("tbody", {}, ...c.measurements.map(m => el("tr", {}, el("td", {}, m.measurement), el("td", {}, m.unit || ""), el("td", {}, figure(m.production)),
        el("td", {}, figure(m.candidate)), el("td", {}, figure(m.difference)))))));
}

async function refreshDestinations() {
  const table = document.getElementById("destinations");
  if (!table || table.dataset.loaded) return;
  table.dataset.loaded = "yes";
  const list = await api("/api/destinations");
  table.tBodies[0].replaceChildren(...list.map(d => {
    const result = el("td", { class: "check" });
    const button = OPERATOR ? el("button", { onclick: async () => {
      result.textContent = "checking…";
      try { const r = await api("/api/destinations/check?name=" + encodeURIComponent(d.name), { method: "POST", body: "{}" });
        result.textContent = (r.ok ? "OK " : "FAILED ") + r.detail + " (" + r.seconds + " s)"; result.className = "check " + (r.ok ? "ok" : "bad"); }
      catch (e) { result.textContent = e.message; } } }, "Check") : "";
    return el("tr", { "data-destination": d.name }, el("td", {}, d.name), el("td", {}, d.kind), el("td", {}, d.address), result, el("td", {}, button));
  }));
}

async function refreshRules() {
  const text = document.getElementById("rules-text");
  if (!text || text.dataset.loaded) return;
  text.dataset.loaded = "yes";
  const rules = await api("/api/rules");
  document.getElementById("rules-path").textContent = rules.path;
  text.textContent = rules.text;
  document.getElementById("rules-test").addEventListener("submit", async (event) => {
    event.preventDefault();
    const job = new FormData(event.target).get("job_id");
    try { document.getElementById("rules-report").textContent = (await api("/api/rules/test?job_id=" + job, { method: "POST", body: "{}" })).report; }
    catch (e) { document.getElementById("rules-report").textContent = e.message; }
  });
}

function figure(value) { return value === null || value === undefined ? "n/a" : value.toFixed(3); }

async function refreshPerformance() {
  const box = document.getElementById("performance");
  if (!box) return;
  const answer = await api("/api/performance");
  if (!answer.pipelines.length) { box.replaceChildren(el("p", {}, "No processed studies yet.")); return; }
  box.replaceChildren(...answer.pipelines.map(p => el("section", { class: "pipeline", "data-pipeline": p.pipeline },
    el("h2", {}, p.pipeline + (p.model_versions.length ? " (" + p.model_versions.join(", ") + ")" : "")),
    el("p", {}, `studies processed ${p.processed}, reviewed ${p.reviewed}: accepted unchanged ${p.accepted_unchanged}, ` +
                `corrected ${p.corrected}, rejected ${p.rejected}`),
    el("table", {}, el("thead", {}, el("tr", {}, ...["segment", "corrections", "median Dice", "worst 10% Dice",
                                                      "median HD95 mm", "median |dV| %"].map(h => el("th", {}, h)))),
      el("tbody", {}, ...p.segments.map(s => el("tr", { "data-segment": s.segment }, el("td", {}, s.segment),
        el("td", {}, String(s.corrections)), el("td", { class: "median-dice" }, figure(s.median_dice)),
        el("td", { class: "worst-dice" }, figure(s.worst_decile_dice)), el("td", {}, figure(s.median_hd95_mm)),
        el("td", {}, figure(s.median_abs_volume_difference_percent)))))),
    ...Object.entries(p.spearman).map(([code, rho]) => el("p", { class: "spearman", "data-score": code },
      `Spearman(${code}, 1 - Dice) = ${figure(rho)}`)),
    el("p", { class: "auroc" }, `review flag AUROC for 'needed a correction': ${figure(p.review_flag_auroc)}`))));
}

async function refreshDrift() {
  const box = document.getElementById("drift");
  if (!box) return;
  const answer = await api("/api/drift");
  const rule = el("p", { class: "drift-method" }, `Baseline: ${answer.baseline}; window: the last ${answer.window} ` +
    `studies after it; alert at PSI \u2265 ${answer.psi_alert}` + (answer.p_value === null ? "" : ` with p < ${answer.p_value}`));
  if (!answer.pipelines.length) { box.replaceChildren(rule, el("p", {}, "No studies recorded yet.")); return; }
  box.replaceChildren(rule, ...answer.pipelines.map(p => el("section", { class: "drift", "data-pipeline": p.pipeline },
    el("h3", {}, `${p.pipeline}: ${p.studies} studies recorded`),
    ...p.alerts.filter(a => a.cleared_at === null).map(a => el("p", { class: "drift-alert", "data-attribute": a.attribute }, a.message)),
    p.attributes.length ? el("table", {}, el("thead", {}, el("tr", {}, ...["kind", "attribute", "PSI", "p", "baseline", "window"]
      .map(h => el("th", {}, h)))),
      el("tbody", {}, ...p.attributes.map(a => el("tr", { "data-attribute": a.attribute, class: a.drifting ? "drifting" : "" },
        el("td", {}, a.kind), el("td", {}, a.attribute), el("td", { class: "psi" }, figure(a.psi)),
        el("td", {}, a.p_value.toPrecision(2)), el("td", {}, a.baseline), el("td", {}, a.window)))))
      : el("p", {}, "Not compared yet: the baseline and a whole window after it are needed."))));
}

async function refreshAudit() {
  const list = document.getElementById("audit");
  if (!list) return;
  const log = await api("/api/audit?limit=200");
  document.getElementById("audit-status").textContent = log.available ? log.messages.length + " latest message(s), newest first"
    : "This node has no audit trail (radnode.security is not installed).";
  list.replaceChildren(...log.messages.map(m => el("li", {}, el("code", {}, m))));
}

async function tick() {
  try {
    const page = document.body.dataset.page;
    if (page === "overview") { await refreshOverview(); await refreshJobs(filterQuery()); }
    else if (page === "jobs" || page === "review") await refreshJobs(filterQuery());
    else if (page === "job") await refreshJob();
    else if (page === "destinations") await refreshDestinations();
    else if (page === "rules") await refreshRules();
    else if (page === "audit") await refreshAudit();
    else if (page === "performance") { await refreshPerformance(); await refreshDrift(); }
  } catch (e) { if (e.message !== "signed out") toast(e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "login") return;
  const form = document.getElementById("filters");
  if (form) form.addEventListener("input", tick);
  tick();
  setInterval(tick, POLL_MS);
});
