import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { type BrowserContext, type Page, chromium } from "playwright-core";
import { ROOT } from "../../scripts/dev-session.mjs";

/**
 * What the browser tests share: the system Chromium (Debian package
 * `chromium`, installed by .ci/run) driven by playwright-core, where the
 * screenshots go (test-results/, kept as CI artifacts, ignored by git), and a
 * watch on a page's console errors and uncaught exceptions.
 */
export const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
export const RESULTS = path.join(ROOT, "test-results");

/** Why the browser tests cannot run, or null. They fail with it, never skip: a missing browser must not pass as green. */
export const MISSING = existsSync(CHROMIUM)
  ? null
  : `no Chromium at ${CHROMIUM}: install it with \`apt-get update && apt-get install -y chromium\` (.ci/run does this when it is missing), or set CHROMIUM_PATH`;

/** A headless Chromium with its profile in `profileDir` (a fresh temporary folder), and test-results/ made. */
export function launchChromium(profileDir: string): Promise<BrowserContext> {
  mkdirSync(RESULTS, { recursive: true });
  return chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1440, height: 900 },
    timeout: 60_000,
  });
}

/** Records the page's console errors and uncaught exceptions in `problems` (a test expects it empty). */
export function watchPage(page: Page, problems: string[]): void {
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
}
