// A quality reviewer at the dashboard's Local performance page in headless Chromium (Debian's, driven by
// Playwright's playwright-core): sign in, wait for the figures the page fills from the API, print them as one
// JSON line (FIGURES {...}) for tests/test_feedback.py to compare with the CLI and /metrics.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

(async () => {
  const base = process.env.CONSOLE_URL;
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(60000);
    await page.goto(base + "/performance");
    await page.waitForURL(/\/login\?next=/);
    await page.fill('input[name="username"]', process.env.CONSOLE_USER);
    await page.fill('input[name="password"]', process.env.CONSOLE_PASSWORD);
    await Promise.all([page.waitForURL(base + "/performance"), page.click('button[type="submit"]')]);
    await page.locator("#performance section.pipeline").first().waitFor();
    const figures = await page.evaluate(() => [...document.querySelectorAll("#performance section.pipeline")].map(s => ({
      pipeline: s.dataset.pipeline,
      segments: Object.fromEntries([...s.querySelectorAll("tr[data-segment]")].map(r => [r.dataset.segment,
        [r.querySelector(".median-dice").textContent, r.querySelector(".worst-dice").textContent]])),
      spearman: Object.fromEntries([...s.querySelectorAll("p.spearman")].map(p => [p.dataset.score, p.textContent])),
      auroc: s.querySelector("p.auroc").textContent,
    })));
    console.log("FIGURES " + JSON.stringify(figures));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e.message); process.exit(1); });
