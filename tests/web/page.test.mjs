// The web chat page in headless Chromium against the real API, worker and fake LLM.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { MODES, startStack, until } from "./stack.mjs";

const SHOTS = fileURLToPath(new URL("../../artifacts/screenshots/", import.meta.url));
mkdirSync(SHOTS, { recursive: true });
let stack, browser;

// Every test runs against both deployments: the distributed one and `conveyor dev`.
for (const mode of MODES) describe(mode, () => {
  before(async () => {
    stack = await startStack(mode);
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
  });
  after(async () => { await browser?.close(); await stack?.stop(); });

  async function pageFor(user) {
    const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
    page.on("dialog", (d) => d.accept());
    await page.goto(`${stack.url}/?user=${user}`);
    return page;
  }
  async function send(page, text) {
    await page.getByTestId("message-input").fill(text);
    await page.getByRole("button", { name: "Send" }).click();
  }
  const assistantTexts = (page) => page.locator('[data-testid="message"][data-role="assistant"] [data-testid="message-text"]');

  test("add buy milk shows the tool chip and the answer", async () => {
    const page = await pageFor("web1");
    await send(page, "add buy milk");
    await page.getByTestId("tool-chip").filter({ hasText: "add_task" }).waitFor();
    await assistantTexts(page).filter({ hasText: "Added task" }).waitFor();
    await until("Send to be enabled again", async () => page.getByRole("button", { name: "Send" }).isEnabled());
    await page.getByTestId("tool-chip").first().click();
    await page.getByText('"title": "buy milk"').first().waitFor();
    await page.screenshot({ path: SHOTS + mode + "-tool-call-and-answer.png" });
    assert.match(await page.evaluate(() => location.hash), /^#conv_/);
    await page.close();
  });

  test("a reload in the middle of an answer reattaches and completes it exactly once", async () => {
    const page = await pageFor("web2");
    await send(page, "tell me a long story [[chunks=80 chunk_delay_ms=40]]");
    await until("some streamed text", async () => ((await assistantTexts(page).first().textContent()) || "").split(" ").length > 5);
    const hash = await page.evaluate(() => location.hash);
    await page.reload();
    assert.equal(await page.evaluate(() => location.hash), hash);
    await until("the answer to stream again after the reload", async () => ((await assistantTexts(page).first().textContent()) || "").length > 0);
    await page.screenshot({ path: SHOTS + mode + "-reattached-mid-answer.png" });
    const conversation = hash.slice(1);
    let stored;
    await until("the run to finish", async () => {
      const { body } = await stack.json(`/api/web2/conversations/${conversation}/messages`);
      stored = body.data.find((m) => m.role === "assistant");
      return Boolean(stored);
    }, 30000);
    await until("the page to show the whole answer", async () => (await assistantTexts(page).count()) === 1 && (await assistantTexts(page).first().textContent()).trim() === stored.content.trim());
    assert.equal(await assistantTexts(page).count(), 1, "exactly one answer");
    await page.close();
  });

  test("Stop cancels a slow answer", async () => {
    const page = await pageFor("web3");
    await send(page, "tell me a very long story [[chunks=400 chunk_delay_ms=30]]");
    await until("some streamed text", async () => ((await assistantTexts(page).first().textContent()) || "").length > 20);
    await page.getByRole("button", { name: "Stop" }).click();
    await page.getByText("stopped").waitFor({ timeout: 10000 });
    await page.screenshot({ path: SHOTS + mode + "-stopped.png" });
    const conversation = (await page.evaluate(() => location.hash)).slice(1);
    const { body } = await stack.json(`/api/web3/conversations/${conversation}/messages`);
    const answer = body.data.find((m) => m.role === "assistant");
    assert.equal(answer.status, "cancelled");
    const run = await stack.json(`/api/web3/runs/${answer.run_id}`);
    assert.equal(run.body.status, "cancelled");
    await page.close();
  });

  test("a second conversation, and switching between them", async () => {
    const page = await pageFor("web4");
    await send(page, "add first errand");
    await assistantTexts(page).filter({ hasText: "Added task" }).waitFor();
    const first = await page.evaluate(() => location.hash);
    await until("Send to be enabled again", async () => page.getByRole("button", { name: "Send" }).isEnabled());
    await page.getByRole("button", { name: "New chat" }).click();
    await send(page, "add second errand");
    await assistantTexts(page).filter({ hasText: "second errand" }).waitFor();
    const list = page.getByTestId("conversation-list").locator("li");
    await until("two conversations in the list", async () => (await list.count()) === 2);
    assert.equal(await list.first().textContent(), "add second errand", "newest first");
    await list.filter({ hasText: "add first errand" }).click();
    await page.getByTestId("messages").getByText("add first errand").waitFor();
    assert.equal(await page.evaluate(() => location.hash), first);
    assert.equal(await page.getByTestId("messages").getByText("add second errand").count(), 0);
    await page.screenshot({ path: SHOTS + mode + "-two-conversations.png" });
    await page.close();
  });

  test("model output with <script> is shown as text, never run", async () => {
    const page = await pageFor("web5");
    await send(page, "hello [[text=<script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>]]");
    await assistantTexts(page).filter({ hasText: "<script>" }).waitFor();
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.equal(await page.locator('[data-testid="messages"] script, [data-testid="messages"] img').count(), 0);
    await page.screenshot({ path: SHOTS + mode + "-script-as-text.png" });
    await page.close();
  });
});
