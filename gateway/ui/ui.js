// The gateway's small UI: what it holds, what failed to reach the FHIR server, finding
// studies (QIDO-RS) and cohorts (/api/cohorts). Same-origin calls only; every value from the
// server is shown as text (textContent), never as markup.
"use strict";
const $ = (id) => document.getElementById(id);

async function call(url, options) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(reason);
  }
  return body;
}

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
  const first = element.Value[0];
  if (element.vr === "PN") return first.Alphabetic || "";
  return element.Value.length > 1 ? element.Value.join("\\") : String(first);
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
  table.hidden = $("replay").hidden = publish.failed.length === 0;
}

async function showCohorts() {
  const cohorts = await call("/api/cohorts");
  const table = $("cohorts");
  table.tBodies[0].replaceChildren();
  for (const c of cohorts) {
    row(table, [c.id, c.name, c.counts.patients, c.counts.studies, c.ae_title,
                link(c.dicomweb, c.dicomweb), link(`${c.export}?format=csv`, "CSV")]);
  }
  table.hidden = cohorts.length === 0;
}

$("replay").addEventListener("click", async () => {
  try {
    const answer = await call("/api/publish/replay", { method: "POST" });
    say($("replayed"), `${answer.queued} queued`, false);
    await showPublishing();
  } catch (error) { say($("replayed"), error.message, true); }
});

$("find").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  for (const [key, given] of new FormData(event.target)) if (given.trim()) query.append(key, given.trim());
  query.append("includefield", "StudyDescription");
  const table = $("studies");
  table.tBodies[0].replaceChildren();
  try {
    const studies = await call(`/dicomweb/studies?${query}`);
    for (const s of studies || []) {
      row(table, [value(s, "00100010"), value(s, "00100020"), value(s, "00080020"),
                  value(s, "00080061"), value(s, "00081030"), value(s, "00080050"),
                  value(s, "00201208"), value(s, "0020000D")]);
    }
    table.hidden = !(studies && studies.length);
    say($("find-status"), `${studies ? studies.length : 0} studies`, false);
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
    say($("cohort-status"), `cohort ${cohort.id}: ${cohort.counts.studies} studies of ${cohort.counts.patients} patients`, false);
    await showCohorts();
  } catch (error) { say($("cohort-status"), error.message, true); }
});

Promise.all([showStatus(), showPublishing(), showCohorts()]).catch(
  (error) => say($("publishing"), error.message, true));
