// An operator at the dashboard's Local performance page in headless Chromium (Debian's, driven by Playwright's
// playwright-core): sign in, wait for the drift panel the page fills from /api/drift, print its open alerts and
// drifting rows as one JSON line (DRIFT {...}) for tests/test_drift.py to compare with the API.
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
    page.on("pageerror", (e) => console.error("page error: " + e.message));
    page.on("console", (m) => { if (m.type() === "error") console.error("console: " + m.text()); });
    await page.goto(base + "/performance");
    await page.waitForURL(/\/login\?next=/);
    await page.fill('input[name="username"]', process.env.CONSOLE_USER);
    await page.fill('input[name="password"]', process.env.CONSOLE_PASSWORD);
    await Promise.all([page.waitForURL(base + "/performance"), page.click('button[type="submit"]')]);
    await page.locator("#drift section.drift tr[data-attribute]").first().waitFor();
    const shown = await page.evaluate(() => ({
      alerts: [...document.querySelectorAll("#drift p.drift-alert")].map(p => p.dataset.attribute).sort(),
      drifting: [...document.querySelectorAll("#drift tr.drifting")].map(r => r.dataset.attribute).sort(),
      psi: Object.fromEntries([...document.querySelectorAll("#drift tr[data-attribute]")].map(r =>
        [r.dataset.attribute, r.querySelector(".psi").textContent])),
    }));
    console.log("DRIFT " + JSON.stringify(shown));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e.message); process.exit(1); });
