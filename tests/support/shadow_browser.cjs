// An operator at a job's page ($JOB_ID): wait for the shadow comparison the page fills from the API, print it as
// one JSON line (SHADOW {...}) for tests/test_shadow.py to compare with the job's API answer.
"use strict";
const { signedIn, run } = require("./browser.cjs");

run(() => signedIn("/jobs/" + process.env.JOB_ID, async (page) => {
  await page.locator("#shadow-comparisons .shadow-comparison").first().waitFor();
  const shown = await page.evaluate(() => [...document.querySelectorAll("#shadow-comparisons .shadow-comparison")].map(c => ({
    candidate: c.dataset.candidate, state: c.dataset.state,
    dice: Object.fromEntries([...c.querySelectorAll("tr[data-segment]")].map(r => [r.dataset.segment, r.querySelector(".dice").textContent])),
    measurements: c.querySelectorAll(".shadow-measurements tbody tr").length,
  })));
  console.log("SHADOW " + JSON.stringify(shown));
}));
