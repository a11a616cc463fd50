// A person at a job's page: print what its Reason fact, its events and its stderr show once drawn (a viewer
// sees "withheld for your role" where an operator sees the text). Run by tests/test_console.py; $JOB_ID beside
// the sign-in's settings.
"use strict";
const { signedIn, run } = require("./browser.cjs");

run(() => signedIn("/jobs/" + process.env.JOB_ID, async (page) => {
  await page.locator("#events tbody tr[data-kind='cancelled']").waitFor();
  await page.locator("#stderr:not(:empty)").waitFor();
  const eventText = async (kind) => page.locator(`#events tbody tr[data-kind='${kind}'] td`).nth(2).textContent();
  const reason = page.locator("#job-facts dt:text-is('Reason') + dd");
  const stderr = await page.locator("#stderr").textContent();
  console.log(JSON.stringify({ reason: await reason.textContent(), retry: await eventText("retry"),
                               cancelled: await eventText("cancelled"), stderr }));
}));
