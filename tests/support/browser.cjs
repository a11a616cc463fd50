// The one way the browser tests open the dashboard: Debian's Chromium, headless, driven by Playwright's
// playwright-core (its path in $PLAYWRIGHT_CORE); signed in through the login page the console redirects to, as
// $CONSOLE_USER with $CONSOLE_PASSWORD, at $CONSOLE_URL + path. Page errors and console errors go to stderr; any
// failed step exits non-zero with its reason.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

/** Sign in at `path` and run `act(page, base)` on the page it lands on; the browser is closed afterwards. */
async function signedIn(path, act, { viewport, timeoutMs = 60000 } = {}) {
  const base = process.env.CONSOLE_URL;
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage(viewport ? { viewport } : {});
    page.setDefaultTimeout(timeoutMs);
    page.on("pageerror", (e) => console.error("page error: " + e.message));
    page.on("console", (m) => { if (m.type() === "error") console.error("console: " + m.text()); });
    await page.goto(base + path);
    await page.waitForURL(/\/login\?next=/);
    await page.fill('input[name="username"]', process.env.CONSOLE_USER);
    await page.fill('input[name="password"]', process.env.CONSOLE_PASSWORD);
    await Promise.all([page.waitForURL(base + path), page.click('button[type="submit"]')]);
    await act(page, base);
  } finally {
    await browser.close();
  }
}

/** Run a browser script's body, exiting 1 with the error's stack when it fails. */
function run(body) {
  body().catch((error) => { console.error("FAILED " + (error && error.stack || error)); process.exit(1); });
}

module.exports = { signedIn, run };
