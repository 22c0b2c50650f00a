// Checks Kubernetes manifests against the API's schemas (kubernetes-models: the OpenAPI schemas of each kind, with
// ajv), without an API server: each document's fields must have the types and required members its kind defines.
// Unknown fields pass, as they do in those schemas. Usage: node check.mjs FILE...   (exit 1 on the first invalid file)
import { readFileSync } from "node:fs";
import yaml from "js-yaml";

let invalid = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8")).filter(Boolean)) {
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    const [group, version] = String(doc.apiVersion).includes("/") ? doc.apiVersion.split("/") : ["", doc.apiVersion];
    let Kind;
    try { Kind = (await import(`kubernetes-models/${group ? group + "/" : ""}${version}/${doc.kind}`))[doc.kind]; }
    catch { console.log(`INVALID ${name}: no kind ${doc.kind} in ${doc.apiVersion}`); invalid++; continue; }
    try { new Kind(doc).validate(); console.log(`valid ${name}`); }
    catch (e) { console.log(`INVALID ${name}: ${e.message}`); invalid++; }
  }
}
process.exit(invalid ? 1 : 0);
