// An operator at the dashboard in headless Chromium (Debian's, driven by Playwright's playwright-core): sign in,
// watch the jobs page while a study arrives and runs (no reload), open its job, re-send a result to one
// destination and see the delivery recorded. Run by tests/test_console.py, which sends the study when this
// prints READY. Settings come from the environment; any failed step exits non-zero with its reason.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const base = process.env.CONSOLE_URL, study = process.env.STUDY_UID, shot = process.env.SCREENSHOT;
const step = (text) => console.log("STEP " + text);

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.setDefaultTimeout(Number(process.env.STEP_TIMEOUT_MS || 60000));
    await page.goto(base + "/jobs");
    await page.waitForURL(/\/login\?next=/);
    await page.fill('input[name="username"]', process.env.CONSOLE_USER);
    await page.fill('input[name="password"]', process.env.CONSOLE_PASSWORD);
    await Promise.all([page.waitForURL(base + "/jobs"), page.click('button[type="submit"]')]);
    step("signed in");
    await page.waitForSelector("#jobs-count:has-text('job(s)')");
    await page.evaluate(() => { window.__sameDocument = true; });  // a reload would lose it
    console.log("READY");
    const row = page.locator("#jobs tbody tr", { hasText: study });
    await row.waitFor();
    step("the study appeared: " + (await row.getAttribute("data-state")));
    await page.locator(`#jobs tbody tr[data-state="done"]`, { hasText: study }).waitFor();
    if (!(await page.evaluate(() => window.__sameDocument === true))) throw new Error("the jobs page was reloaded");
    step("the job is done, the page never reloaded");
    await Promise.all([page.waitForURL(/\/jobs\/\d+$/), row.locator("a.job-link").click()]);
    await page.locator("#deliveries tbody tr[data-state='done']").first().waitFor();
    const delivered = await page.locator("#events tbody tr[data-kind='delivered']").count();
    const resend = page.locator("button.resend-one").first();
    const destination = await resend.getAttribute("data-destination");
    await resend.click();
    await page.locator("#events tbody tr[data-kind='resend']").waitFor();
    await page.waitForFunction((n) => document.querySelectorAll("#events tbody tr[data-kind='delivered']").length > n, delivered);
    await page.locator("#job-state:has-text('done')").waitFor();
    step(`re-sent to ${destination} and delivered again`);
    console.log("RESENT " + destination);
    await page.screenshot({ path: shot, fullPage: true });
  } finally {
    await browser.close();
  }
})().catch((error) => { console.error("FAILED " + (error && error.stack || error)); process.exit(1); });
