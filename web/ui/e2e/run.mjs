// The web UI in a real browser: Debian's Chromium driven by playwright-core (which never
// downloads a browser). Started by cli/tests/web_ui.rs against a cluster it made, with:
//   GH_PROXY        host:port of the proxy
//   GH_USER/GH_PASSWORD/GH_OTP_SECRET  a user whose role requires a second factor (base32 secret)
//   GH_BRIEF_USER/GH_BRIEF_PASSWORD    a user whose certificates live 20 s (expired session)
//   GH_NODE, GH_LOGIN                   the node and OS login to open a terminal on
//   GH_SHOTS        where screenshots go
//   GH_CHROMIUM     the browser (default /usr/bin/chromium)
// Prints one line per step; exits non-zero on the first failure.
import { chromium, request as pwRequest } from 'playwright-core';
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const base = `https://${env('GH_PROXY')}`;
const shots = env('GH_SHOTS');
mkdirSync(shots, { recursive: true });
const step = (s) => console.log(`e2e: ${s}`);

function base32(text) {
  const abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0, val = 0;
  const out = [];
  for (const c of text.replace(/=+$/, '').toUpperCase()) {
    val = (val << 5) | abc.indexOf(c);
    bits += 5;
    if (bits >= 8) { bits -= 8; out.push((val >>> bits) & 0xff); }
  }
  return Buffer.from(out);
}

// RFC 6238: the code of the 30-second step `offset` steps from now.
function totp(secret, offset = 0) {
  const counter = Math.floor(Date.now() / 1000 / 30) + offset;
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const mac = createHmac('sha1', base32(secret)).update(msg).digest();
  const o = mac[mac.length - 1] & 0xf;
  const n = (mac.readUInt32BE(o) & 0x7fffffff) % 1_000_000;
  return String(n).padStart(6, '0');
}

async function screenText(page) {
  return page.evaluate(() => {
    const t = window.gatehouseTerminal;
    if (!t) return '';
    const b = t.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i)?.translateToString(true) ?? '');
    return lines.join('\n');
  });
}

async function waitForScreen(page, text, what, timeout = 20000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const s = await screenText(page);
    if (s.includes(text)) return s;
    if (Date.now() > deadline) throw new Error(`${what}: "${text}" not on screen; screen:\n${s}`);
    await page.waitForTimeout(100);
  }
}

async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`) });
}

const browser = await chromium.launch({
  executablePath: process.env.GH_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage'],
});
const problemsSeen = [];
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 760 } });
  const page = await context.newPage();
  const problems = problemsSeen;
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));

  // --- login: a wrong code is refused, the right one logs in ---
  await page.goto(`${base}/`);
  await page.waitForSelector('#user');
  const secret = env('GH_OTP_SECRET');
  const good = totp(secret, 1);
  let wrong = '000000';
  while ([totp(secret, -1), totp(secret, 0), totp(secret, 1)].includes(wrong)) wrong = String(Number(wrong) + 1).padStart(6, '0');
  await page.fill('#user', env('GH_USER'));
  await page.fill('#password', env('GH_PASSWORD'));
  await page.fill('#otp', wrong);
  await page.click('#login-submit');
  await page.waitForFunction(() => document.querySelector('#login-error')?.textContent.includes('wrong one-time code'));
  step('a wrong one-time code is refused');
  await page.fill('#otp', '');
  await page.click('#login-submit');
  await page.waitForFunction(() => document.querySelector('#login-error')?.textContent.includes('one-time code'));
  step('a login without the code is asked for it');
  await page.fill('#otp', good);
  await shot(page, 'login');
  await page.click('#login-submit');
  await page.waitForSelector('#nodes tbody tr');
  step('logged in with password and TOTP');

  // --- nodes, search ---
  const node = env('GH_NODE');
  await page.waitForSelector(`tr[data-node="${node}"]`);
  await shot(page, 'nodes');
  await page.fill('#node-search', 'no-such-node-xyz');
  await page.waitForFunction(() => document.querySelectorAll('#nodes tbody tr').length === 0);
  await page.fill('#node-search', 'env=dev');
  await page.waitForSelector(`tr[data-node="${node}"]`);
  step('the node is listed, and found by label');

  // --- web terminal ---
  await page.click(`tr[data-node="${node}"] button.connect`);
  await page.waitForSelector('#terminal .xterm');
  await waitForScreen(page, '$', 'shell prompt').catch(() => waitForScreen(page, '#', 'shell prompt'));
  const marker = `web-${Date.now()}`;
  await page.keyboard.type(`echo hello-${marker}\n`);
  await waitForScreen(page, `hello-${marker}`, 'echo output');
  step('the terminal runs echo');
  await shot(page, 'terminal');

  // --- a second page watches the live session ---
  const watcher = await context.newPage();
  await watcher.goto(`${base}/#/sessions`);
  await watcher.waitForSelector('#sessions a.join');
  await shot(watcher, 'sessions');
  await watcher.click('#sessions a.join');
  await watcher.waitForSelector('#join-terminal .xterm');
  await waitForScreen(watcher, `hello-${marker}`, 'what happened before joining');
  await page.bringToFront();
  await page.keyboard.type(`echo live-${marker}\n`);
  await waitForScreen(watcher, `live-${marker}`, 'live output in the watcher');
  step('a second page watches the live session');
  await shot(watcher, 'join');

  // --- paste and resize reach the shell ---
  await page.evaluate((m) => window.gatehouseTerminal.paste(`echo pasted-${m}\n`), marker);
  await waitForScreen(page, `pasted-${marker}`, 'paste');
  await page.setViewportSize({ width: 1000, height: 600 });
  await page.keyboard.type('stty size\n');
  await page.waitForTimeout(500);
  step('paste works; resize sent');

  await page.keyboard.type('exit\n');
  await page.waitForFunction(() => document.querySelector('#term-status')?.textContent.includes('Session ended'));
  await waitForScreen(watcher, `live-${marker}`, 'watcher keeps the output');
  await watcher.close();
  step('the session ended');

  // --- the recording plays ---
  await page.setViewportSize({ width: 1280, height: 760 });
  await page.goto(`${base}/#/recordings`);
  await page.waitForSelector('#recordings a.play');
  await shot(page, 'recordings');
  await page.click('#recordings a.play');
  await page.waitForSelector('#player .xterm');
  await waitForScreen(page, `hello-${marker}`, 'playback');
  await page.waitForFunction(() => document.querySelector('#player-status')?.textContent.includes('events'));
  const max = await page.$eval('#player-seek', (e) => Number(e.max));
  await page.$eval('#player-seek', (e) => { e.value = e.max; e.dispatchEvent(new Event('input')); });
  await waitForScreen(page, `pasted-${marker}`, 'seek to the end');
  await shot(page, 'player');
  await page.$eval('#player-seek', (e) => { e.value = '0'; e.dispatchEvent(new Event('input')); });
  step(`the recording plays and seeks (${max.toFixed(1)} s with idle skipped)`);

  // --- audit: the web terminal's session is there ---
  await page.goto(`${base}/#/audit`);
  await page.fill('#audit-type', 'session.start');
  await page.fill('#audit-user', env('GH_USER'));
  await page.click('#audit-apply');
  await page.waitForSelector('#events tr[data-type="session.start"]');
  await shot(page, 'audit');
  step('the session is in the audit log');

  await page.goto(`${base}/#/account`);
  await page.waitForSelector('#account-roles .chip');
  await shot(page, 'account');
  step('account page shows roles and logins');

  // --- CSRF and cross-site requests ---
  const noToken = await page.evaluate(async () => (await fetch('/v1/webapi/logout', { method: 'POST' })).status);
  if (noToken !== 403) throw new Error(`a POST without the CSRF token got ${noToken}`);
  const cookies = await context.cookies();
  const sessionCookie = cookies.find((c) => c.name === '__Host-gatehouse_session');
  if (!sessionCookie || !sessionCookie.httpOnly || !sessionCookie.secure || sessionCookie.sameSite !== 'Strict') {
    throw new Error(`session cookie flags: ${JSON.stringify(sessionCookie)}`);
  }
  const csrf = await page.evaluate(async () => (await (await fetch('/v1/webapi/session')).json()).csrf);
  const evil = await pwRequest.newContext({ ignoreHTTPSErrors: true });
  const cross = await evil.post(`${base}/v1/webapi/logout`, {
    headers: { Origin: 'https://evil.example', Cookie: `${sessionCookie.name}=${sessionCookie.value}`, 'X-CSRF-Token': csrf },
  });
  if (cross.status() !== 403) throw new Error(`a cross-site POST got ${cross.status()}`);
  const still = await page.evaluate(async () => (await fetch('/v1/webapi/session')).status);
  if (still !== 200) throw new Error(`the session did not survive refused requests: ${still}`);
  step('a POST without the CSRF token and a cross-site POST are refused (403)');

  // --- logout revokes the session server-side ---
  await page.click('#logout');
  await page.waitForSelector('#user');
  const replay = await evil.get(`${base}/v1/webapi/session`, {
    headers: { Cookie: `${sessionCookie.name}=${sessionCookie.value}` },
  });
  if (replay.status() !== 401) throw new Error(`the logged-out cookie still works: ${replay.status()}`);
  const foreign = await evil.get(`${base}/v1/webapi/nodes`, {
    headers: { Cookie: `${sessionCookie.name}=a-session-of-another-cluster` },
  });
  if (foreign.status() !== 401) throw new Error(`a foreign cookie got ${foreign.status()}`);
  step('logout revokes the cookie; an unknown cookie is refused');
  await evil.dispose();

  // --- an expired session is refused ---
  await page.fill('#user', env('GH_BRIEF_USER'));
  await page.fill('#password', env('GH_BRIEF_PASSWORD'));
  await page.click('#login-submit');
  await page.waitForSelector('#nodes');
  const expires = await page.evaluate(async () => (await (await fetch('/v1/webapi/session')).json()).expires);
  const wait = expires * 1000 - Date.now() + 1500;
  step(`brief session: waiting ${Math.round(wait / 1000)} s for it to expire`);
  await page.waitForTimeout(Math.max(0, wait));
  const expired = await page.evaluate(async () => (await fetch('/v1/webapi/nodes')).status);
  if (expired !== 401) throw new Error(`an expired session got ${expired}`);
  await page.reload();
  await page.waitForSelector('#user');
  step('an expired session is refused and the page asks for a login');

  // Refused requests are expected; xterm.js's renderer may fire one refresh after a terminal is
  // disposed on leaving its page (a known xterm race: "reading 'dimensions'"), harmless.
  const real = problems.filter((p) => !p.includes('401') && !p.includes('403') && !p.includes("reading 'dimensions'"));
  if (real.length) throw new Error(`browser errors: ${real.join('\n')}`);
  step('all passed');
} catch (e) {
  // What the page showed when it failed, for the test's log.
  for (const p of browser.contexts().flatMap((c) => c.pages())) {
    try {
      await p.screenshot({ path: join(shots, `failure-${Date.now()}.png`) });
      console.log(`e2e: page ${p.url()} shows:\n${await p.evaluate(() => document.body.innerText)}`);
    } catch { /* closed */ }
  }
  console.log(`e2e: browser console: ${problemsSeen.join('\n')}`);
  throw e;
} finally {
  await browser.close();
}
