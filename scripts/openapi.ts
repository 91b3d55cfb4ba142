// `npm run openapi`: writes docs/openapi.json from the zod schemas (src/openapi.ts).
// `npm run openapi -- --check`: fails when the committed file is not what the generator writes.
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { buildOpenApiDocument } from "../src/openapi.ts";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const file = path.join(root, "docs/openapi.json");
const text = `${JSON.stringify(buildOpenApiDocument(), null, 2)}\n`;

if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(file, "utf8");
  } catch {}
  if (current !== text) {
    console.error("docs/openapi.json is stale: run `npm run openapi` and commit the result");
    process.exit(1);
  }
  console.log("docs/openapi.json is up to date");
} else {
  writeFileSync(file, text);
  console.log(`wrote ${path.relative(root, file)} (${text.length} bytes)`);
}
