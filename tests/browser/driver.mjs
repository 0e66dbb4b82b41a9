// Drives headless Chromium for tests/browser with playwright-core, one JSON object a line.
//
//   node driver.mjs PROFILE_DIR
//
// stdin:  {"id": 1, "op": "open", "url": "..."}      one request a line (ops below)
// stdout: {"id": 1, "ok": true, "value": ...}        its answer (or "ok": false, "error")
//         {"event": "console", "page": 1, ...}       what happens meanwhile, as it happens
//
// It launches Chromium once, prints {"event": "ready"}, and closes it and exits when stdin
// ends or on SIGTERM, so the test that spawned it controls its lifetime.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

// Without the background-networking flags Chromium's own connections to the closed network fail.
const FLAGS = [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
// Playwright's own limit for each operation, in milliseconds (the test bounds its waits too).
const OP_LIMIT = 20000;

const profileDir = process.argv[2];
if (!profileDir) {
    process.stderr.write('usage: node driver.mjs PROFILE_DIR\n');
    process.exit(2);
}

function send(message) {
    process.stdout.write(JSON.stringify(message) + '\n');
}

const context = await chromium.launchPersistentContext(profileDir, {
    executablePath: process.env.TNOVNC_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
    viewport: { width: 640, height: 480 },
    deviceScaleFactor: 1,
});
context.setDefaultTimeout(OP_LIMIT);

// The test numbers its pages, so it can file console lines that arrive before `open` answers.
const pages = new Map();

const ops = {
    async open({ page: id, url }) {
        const page = await context.newPage();
        pages.set(id, page);
        page.on('console', (m) => send({ event: 'console', page: id, type: m.type(), text: m.text() }));
        page.on('pageerror', (e) => send({ event: 'pageerror', page: id, text: String(e) }));
        await page.goto(url);
        return true;
    },
    async evaluate({ page, expression }) {
        return pages.get(page).evaluate(expression);
    },
    // Polled from here with evaluate (the DevTools protocol's, which the page's
    // Content-Security-Policy does not govern): waitForFunction evals the expression inside
    // the page, which a policy without 'unsafe-eval' (the viewer page's) refuses.
    async wait({ page, expression, timeout }) {
        const end = Date.now() + timeout;
        while (!(await pages.get(page).evaluate(expression))) {
            if (Date.now() > end) {
                throw new Error(`timed out after ${timeout} ms`);
            }
            await new Promise((resolve) => setTimeout(resolve, 50));
        }
        return true;
    },
    async click({ page, selector, x, y, button }) {
        await pages.get(page).locator(selector).click({ position: { x, y }, button });
        return true;
    },
    async press({ page, key }) {
        await pages.get(page).keyboard.press(key);
        return true;
    },
    async close({ page }) {
        await pages.get(page).close();
        pages.delete(page);
        return true;
    },
};

let closing = null;
function shutdown() {
    closing ??= context.close().finally(() => process.exit(0));
    return closing;
}
process.on('SIGTERM', shutdown);

const lines = createInterface({ input: process.stdin });
lines.on('line', async (line) => {
    let request = {};
    try {
        request = JSON.parse(line);
        const op = ops[request.op];
        if (!op) {
            throw new Error(`unknown op ${request.op}`);
        }
        send({ id: request.id, ok: true, value: (await op(request)) ?? null });
    } catch (e) {
        send({ id: request.id, ok: false, error: String(e && e.stack || e) });
    }
});
lines.on('close', shutdown);

send({ event: 'ready', version: context.browser()?.version() ?? null });
