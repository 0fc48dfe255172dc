// The gateway's small UI: what it holds, what failed to reach the FHIR server, finding
// studies (QIDO-RS) and cohorts (/api/cohorts). Same-origin calls only; every value from the
// server is shown as text (textContent), never as markup.
"use strict";
const $ = (id) => document.getElementById(id);

// The JSON answer of a same-origin request; an Error with the server's reason otherwise.
// `warnings` receives the answer's Warning header (QIDO-RS: more matches than shown).
async function call(url, options, warnings) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(reason);
  }
  if (warnings) warnings.push(response.headers.get("Warning") || "");
  return body;
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell ?? "";
    tr.appendChild(td);
  }
  table.tBodies[0].appendChild(tr);
}

function link(href, text) {
  const a = document.createElement("a");
  a.href = href; a.textContent = text;
  return a;
}

function say(element, text, isError) {
  element.textContent = text;
  element.className = isError ? "error" : "ok";
}

// DICOM JSON (PS3.18 F.2): the first value of a tag, a person name as its alphabetic form.
function value(dataset, tag) {
  const element = dataset[tag];
  if (!element || !element.Value || !element.Value.length) return "";
  if (element.vr === "PN") {
    return element.Value.map((name) => name.Alphabetic || name.Ideographic || name.Phonetic || "")
      .join("\\");
  }
  return element.Value.join("\\");
}

async function showStatus() {
  const status = await call("/api/status");
  $("ae").textContent = status.ae_title;
  $("dicomweb").textContent = status.dicomweb;
  for (const cell of document.querySelectorAll("[data-count]")) {
    cell.textContent = status.counts[cell.dataset.count];
  }
}

async function showPublishing() {
  const publish = await call("/api/publish");
  $("publishing").textContent = publish.enabled
    ? `on: ${publish.pending} waiting, ${publish.failed.length} failed, ${publish.retrying.length} retrying`
    : "off (no [fhir] base_url configured)";
  const table = $("failed");
  table.tBodies[0].replaceChildren();
  for (const failure of publish.failed) row(table, [failure.study, failure.attempts, failure.error]);
  table.hidden = publish.failed.length === 0;
  $("replay").hidden = table.hidden || !publish.enabled;  // nothing would publish them
}

async function showCohorts() {
  const cohorts = await call("/api/cohorts");
  const table = $("cohorts");
  table.tBodies[0].replaceChildren();
  for (const c of cohorts) {
    // The DICOMweb base is for DICOMweb clients (it has no page of its own); the export link
    // stays on this origin, whatever http.public_url says.
    row(table, [c.id, c.name, c.counts.patients, c.counts.studies, c.ae_title, c.dicomweb,
                link(`/api/cohorts/${encodeURIComponent(c.id)}/export?format=csv`, "CSV")]);
  }
  table.hidden = cohorts.length === 0;
}

$("replay").addEventListener("click", async () => {
  try {
    const answer = await call("/api/publish/replay", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    say($("replayed"), `${answer.queued} queued`, false);
    await showPublishing();
  } catch (error) { say($("replayed"), error.message, true); }
});

$("find").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  for (const [key, given] of new FormData(event.target)) if (given.trim()) query.append(key, given.trim());
  const table = $("studies");
  table.tBodies[0].replaceChildren();
  try {
    const warnings = [];
    const studies = (await call(`/dicomweb/studies?${query}`, undefined, warnings)) || [];
    for (const s of studies) {
      row(table, [value(s, "00100010"), value(s, "00100020"), value(s, "00080020"),
                  value(s, "00080061"), value(s, "00081030"), value(s, "00080050"),
                  value(s, "00201208"), value(s, "0020000D")]);
    }
    table.hidden = studies.length === 0;
    const more = warnings[0] ? ` shown; more match (${warnings[0]})` : "";
    say($("find-status"), plural(studies.length, "study", "studies") + more, false);
  } catch (error) {
    table.hidden = true;
    say($("find-status"), error.message, true);
  }
});

$("cohort").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const imaging = {};
  for (const key of ["ModalitiesInStudy", "StudyDate"]) {
    const given = form.get(key).trim();
    if (given) imaging[key] = given;
  }
  try {
    const cohort = await call("/api/cohorts", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: form.get("name"), fhir: form.get("fhir"), imaging }) });
    say($("cohort-status"), `cohort ${cohort.id}: ${plural(cohort.counts.studies, "study", "studies")} of ` +
        plural(cohort.counts.patients, "patient", "patients"), false);
  } catch (error) { say($("cohort-status"), error.message, true); return; }
  showCohorts().catch((error) => say($("cohort-list-status"), error.message, true));
});

// Each part says its own trouble where it shows.
showStatus().catch((error) => say($("status"), error.message, true));
showPublishing().catch((error) => say($("publishing"), error.message, true));
showCohorts().catch((error) => say($("cohort-list-status"), error.message, true));
