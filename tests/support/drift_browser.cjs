// An operator at the dashboard's Local performance page: wait for the drift panel the page fills from
// /api/drift, print its open alerts and drifting rows as one JSON line (DRIFT {...}) for tests/test_drift.py to
// compare with the API.
"use strict";
const { signedIn, run } = require("./browser.cjs");

run(() => signedIn("/performance", async (page) => {
  await page.locator("#drift section.drift tr[data-attribute]").first().waitFor();
  const shown = await page.evaluate(() => ({
    alerts: [...document.querySelectorAll("#drift p.drift-alert")].map(p => p.dataset.attribute).sort(),
    drifting: [...document.querySelectorAll("#drift tr.drifting")].map(r => r.dataset.attribute).sort(),
    psi: Object.fromEntries([...document.querySelectorAll("#drift tr[data-attribute]")].map(r =>
      [r.dataset.attribute, r.querySelector(".psi").textContent])),
  }));
  console.log("DRIFT " + JSON.stringify(shown));
}));
