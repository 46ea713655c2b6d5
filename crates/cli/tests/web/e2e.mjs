// Drives the web page of `visenc serve` in headless Chromium, as a person would: types a query,
// uploads an image, and checks the result tiles (a thumbnail that loaded, a score, a file name).
// Usage: node e2e.mjs BASE_URL QUERY UPLOAD_PATH EXPECTED_TILES [SCREENSHOT.png]
// Prints one JSON line with what it saw; exits 1 on any failed check.
import { chromium } from "playwright-core";
import { basename } from "node:path";

const [base, query, upload, expected, screenshot] = process.argv.slice(2);
const want = Number(expected);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function check(ok, what) {
  if (!ok) throw new Error("check failed: " + what);
}

// The result tiles once there are `want` of them with their thumbnails loaded, read in the same
// step as the check (a search that starts in between cannot empty them under us).
async function tiles(page) {
  const seen = await page.waitForFunction(
    (n) => {
      const ts = [...document.querySelectorAll("#results .tile")];
      if (ts.length !== n || !ts.every((t) => t.querySelector("img").complete)) return null;
      return ts.map((t) => ({
        score: Number(t.querySelector(".score").textContent),
        name: t.querySelector("figcaption").textContent,
        loaded: t.querySelector("img").naturalWidth > 0,
      }));
    },
    want,
    { timeout: 30000 },
  );
  return seen.jsonValue();
}

const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
let failed = false;
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base);
  await page.fill("#k", String(want));

  await page.fill("#query", query);
  await page.press("#query", "Enter");
  const byText = await tiles(page);
  check(byText.length === want, `${want} tiles for the text query`);
  check(byText.every((t) => Number.isFinite(t.score) && t.loaded), "every tile has a score and a loaded thumbnail");
  check(byText.every((t, i) => i === 0 || byText[i - 1].score >= t.score), "best first");

  // The upload's search starts after the file is read: wait until it has replaced the text
  // query's tiles (the status reads "N results" for both).
  const previous = await page.$("#results .tile");
  await page.setInputFiles("#upload", upload);
  await page.waitForFunction((tile) => !tile.isConnected, previous, { timeout: 30000 });
  await page.waitForFunction((n) => document.getElementById("status").textContent === n + " results", want);
  const byImage = await tiles(page);
  check(byImage[0].name.includes(basename(upload)), "an indexed image finds itself first");
  check(Math.abs(byImage[0].score - 1) < 1e-3, "with cosine 1");
  check(errors.length === 0, "no script errors: " + errors.join("; "));
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ text: byText, image: byImage }));
} catch (e) {
  console.error(String(e));
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
