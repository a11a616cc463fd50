// An operator at a job that failed because an instance of its study was refused at ingest (one no sender can
// correct): retry it without the refused instances from its page, giving the reason the prompt asks for, and
// see the job processed. Run by tests/test_console.py; settings from the environment ($JOB_ID, $NOTE beside
// the sign-in's).
"use strict";
const { signedIn, run } = require("./browser.cjs");

run(() => signedIn("/jobs/" + process.env.JOB_ID, async (page) => {
  await page.locator("#job-state:has-text('failed: refused')").waitFor();
  console.log("STEP the job page says why it failed");
  page.once("dialog", (dialog) => dialog.accept(process.env.NOTE));
  await page.locator("#action-retry-without-refused").click();
  await page.locator("#events tbody tr[data-kind='refusals-waived']").waitFor();
  await page.locator("#job-state:has-text('done')").waitFor();
  console.log("DONE " + (await page.locator("#events tbody tr[data-kind='refusals-waived'] td").nth(2).textContent()));
}));
