// A quality reviewer at the dashboard's Local performance page: wait for the figures the page fills from the
// API, print them as one JSON line (FIGURES {...}) for tests/test_feedback.py to compare with the CLI and
// /metrics.
"use strict";
const { signedIn, run } = require("./browser.cjs");

run(() => signedIn("/performance", async (page) => {
  await page.locator("#performance section.pipeline").first().waitFor();
  const figures = await page.evaluate(() => [...document.querySelectorAll("#performance section.pipeline")].map(s => ({
    pipeline: s.dataset.pipeline,
    segments: Object.fromEntries([...s.querySelectorAll("tr[data-segment]")].map(r => [r.dataset.segment,
      [r.querySelector(".median-dice").textContent, r.querySelector(".worst-dice").textContent]])),
    spearman: Object.fromEntries([...s.querySelectorAll("p.spearman")].map(p => [p.dataset.score, p.textContent])),
    auroc: s.querySelector("p.auroc").textContent,
  })));
  console.log("FIGURES " + JSON.stringify(figures));
}));
