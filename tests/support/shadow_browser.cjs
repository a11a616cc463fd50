// An operator at a job's page in the dashboard, in headless Chromium (Debian's, driven by Playwright's
// playwright-core): sign in, wait for the shadow comparison the page fills from the API, print it as one JSON
// line (SHADOW {...}) for tests/test_shadow.py to compare with the job's API answer.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

(async () => {
  const base = process.env.CONSOLE_URL;
  const url = base + "/jobs/" + process.env.JOB_ID;
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(60000);
    await page.goto(url);
    await page.waitForURL(/\/login\?next=/);
    await page.fill('input[name="username"]', process.env.CONSOLE_USER);
    await page.fill('input[name="password"]', process.env.CONSOLE_PASSWORD);
    await Promise.all([page.waitForURL(url), page.click('button[type="submit"]')]);
    await page.locator("#shadow-comparisons .shadow-comparison").first().waitFor();
    const shown = await page.evaluate(() => [...document.querySelectorAll("#shadow-comparisons .shadow-comparison")].map(c => ({
      candidate: c.dataset.candidate, state: c.dataset.state,
      dice: Object.fromEntries([...c.querySelectorAll("tr[data-segment]")].map(r => [r.dataset.segment, r.querySelector(".dice").textContent])),
      measurements: c.querySelectorAll(".shadow-measurements tbody tr").length,
    })));
    console.log("SHADOW " + JSON.stringify(shown));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e.message); process.exit(1); });
