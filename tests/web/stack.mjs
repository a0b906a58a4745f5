// Starts a real Conveyor for the browser tests, like the Rust harness does: the fake LLM, then
// either the distributed deployment (API and one worker as processes, on their own database
// and Redis key prefix) or the embedded one (`conveyor dev` on its own SQLite file).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const BIN = process.env.CONVEYOR_BIN_DIR || fileURLToPath(new URL("../../target/debug/", import.meta.url));
const PG = ["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"];
const quiet = !process.env.CONVEYOR_TEST_LOGS;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => { const { port } = server.address(); server.close(() => resolve(port)); });
    server.on("error", reject);
  });
}

function run(name, args, env) {
  return spawn(BIN + name, args, { env: { ...process.env, RUST_LOG: process.env.CONVEYOR_TEST_LOGS || "warn", ...env }, stdio: ["ignore", "pipe", quiet ? "ignore" : "inherit"] });
}

async function until(what, check, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try { if (await check()) return; } catch { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export const MODES = ["distributed", "embedded"];

export async function startStack(mode = "distributed") {
  const children = [];

  const fake = run("fake-llm", ["--addr", "127.0.0.1:0", "--chunk-delay-ms", "10"], {});
  children.push(fake);
  const first = await new Promise((resolve, reject) => {
    createInterface({ input: fake.stdout }).once("line", resolve);
    fake.once("exit", () => reject(new Error("fake-llm exited")));
  });
  const llm = first.replace("listening on ", "").trim();
  const model = { LLM_PROVIDER: "openai-compatible", LLM_BASE_URL: `http://${llm}/v1`, LLM_MODEL: "fake", LLM_API_KEY: "test" };

  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let cleanup;
  if (mode === "embedded") {
    const dir = mkdtempSync(join(tmpdir(), "conveyor-web-"));
    children.push(run("conveyor", ["dev", "--db", join(dir, "conveyor.db"), "--addr", `127.0.0.1:${port}`, "--concurrency", "4"], model));
    cleanup = () => rmSync(dir, { recursive: true, force: true });
  } else {
    const db = `conveyor_web_${Date.now()}_${process.pid}`;
    execFileSync("psql", [...PG, `CREATE DATABASE ${db}`]);
    const env = { DATABASE_URL: `postgres://postgres@127.0.0.1:5432/${db}`, REDIS_URL: "redis://127.0.0.1:6379", REDIS_PREFIX: `webtest:${db}` };
    children.push(run("conveyor-api", [], { ...env, API_ADDR: `127.0.0.1:${port}` }));
    children.push(run("conveyor-worker", ["--concurrency", "4"], { ...env, ...model }));
    cleanup = () => {
      try { execFileSync("psql", [...PG, `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`]); } catch { /* best effort */ }
      try {
        const keys = execFileSync("redis-cli", ["--scan", "--pattern", `webtest:${db}:*`]).toString().split("\n").filter(Boolean);
        if (keys.length) execFileSync("redis-cli", ["del", ...keys]);
      } catch { /* best effort */ }
    };
  }
  await until("the API", async () => (await fetch(`${url}/readyz`)).ok);

  return {
    url,
    async json(path, options) { const r = await fetch(url + path, options); return { status: r.status, body: await r.json().catch(() => null) }; },
    async stop() {
      for (const child of children) child.kill("SIGKILL");
      cleanup();
    },
  };
}

export { until };
