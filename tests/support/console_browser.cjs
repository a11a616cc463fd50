// An operator at the dashboard: watch the jobs page while a study arrives and runs (no reload), open its job,
// re-send a result to one destination and see the delivery recorded. Run by tests/test_console.py, which sends
// the study when this prints READY. Settings come from the environment ($STUDY_UID, $SCREENSHOT,
// $STEP_TIMEOUT_MS beside the sign-in's).
"use strict";
const { signedIn, run } = require("./browser.cjs");

const study = process.env.STUDY_UID, shot = process.env.SCREENSHOT;
const step = (text) => console.log("STEP " + text);

run(() => signedIn("/jobs", async (page) => {
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
}, { viewport: { width: 1400, height: 1000 }, timeoutMs: Number(process.env.STEP_TIMEOUT_MS || 60000) }));
