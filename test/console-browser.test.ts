/**
 * The operations console end to end, in a real browser: Debian's chromium
 * driven by playwright-core, the console signed in through erp-cloud's own
 * OpenID Provider (a jump ticket, as the ERP's button makes it, then the
 * authorization code flow with PKCE), a listener and the Nuonuo, YonBIP and
 * webhook simulators behind it. Screenshots of every main page land in
 * test/artifacts/ (git-ignored).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync } from 'node:fs';
import { chromium, type Browser, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConsoleConfig } from '../listener/console/config.js';
import { startConsoleServer, type ConsoleServer } from '../listener/console/console-server.js';
import { createLogger } from '../listener/kernel/logger.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/sim-server.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { waitFor } from './helpers/db.js';
import { approve, configureTax, customer, requestReversal, settlement, USCC_OK } from './helpers/invoicing.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { addPo, addSuppliers, asnDoc, setupYonbip } from './helpers/scm.js';
import { freePort, startSsoWorld, type SsoWorld } from './helpers/sso.js';

const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = 'test/artifacts';
const APP_KEY = 'console-app';
const APP_SECRET = randomBytes(12).toString('hex');
const REFUSED_TAX_ID = USCC_OK[2]!;
const CORRECT_TAX_ID = USCC_OK[1]!;
const REFUSAL = '购买方纳税人识别号在税务局登记信息中不存在';

if (!existsSync(CHROMIUM)) {
  throw new Error(`${CHROMIUM} is missing: the browser tests need Debian's chromium (as root: apt-get install -y chromium; scripts/setup-browser.sh does it)`);
}

let world: SsoWorld;
let nuonuo: NuonuoSim;
let yonbip: YonbipSim;
let hooks: SimServer;
let listener: InProcessListener;
let consoleServer: ConsoleServer;
let consoleUrl: string;
let browser: Browser;
const contexts: BrowserContext[] = [];
let refusedSettlement: { id: number; no: string };
let goodSettlement: { id: number; no: string };
let dead: string[] = [];

beforeAll(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
  world = await startSsoWorld('console_browser');
  const db = world.db;
  const client = await world.registerClient('console');
  consoleUrl = `http://127.0.0.1:${client.port}`;
  await db.pool.query(`select sso.put_user('ops', '运维 王强'), sso.put_user('fin', '财务 李敏'), sso.put_user('guest', '访客 赵六')`);
  await db.pool.query(`select cloud.put_console_role('ops', 'operator'), cloud.put_console_role('fin', 'finance')`);

  // the clouds: Nuonuo (invoices), YonBIP (orders), and a webhook endpoint that is down at first
  nuonuo = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 100 });
  await configureTax(db.pool, nuonuo.url, APP_KEY);
  nuonuo.configure({ rejectBuyers: { [REFUSED_TAX_ID]: REFUSAL } });
  yonbip = await startYonbipSim();
  await setupYonbip(db.pool, yonbip);
  hooks = await startSim({ port: 0, host: '127.0.0.1', routes: webhookRoutes(), name: 'webhook' });
  await db.pool.query(`select cloud.put_endpoint('hooks', $1, 'webhook', p_max_attempts => 1, p_timeout_ms => 1000)`, [`http://127.0.0.1:${await freePort()}/`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hooks', '{}', '{}', true)`);

  listener = await startListener(db.url);

  // the ERP's work: an invoice the platform refuses, one it issues, an order, an ASN, a quarantined event, two dead messages
  refusedSettlement = await settlement(db.pool, await customer(db.pool, { name: '杭州拒收贸易有限公司', taxId: REFUSED_TAX_ID }), [{ item: '软件服务', amount: 1060, rate: 0.06 }]);
  await approve(db.pool, refusedSettlement.id);
  const good = await settlement(db.pool, await customer(db.pool, { name: '华东机电有限公司' }), [{ item: '技术服务', amount: 530, rate: 0.06 }]);
  goodSettlement = good;
  await approve(db.pool, good.id);
  const { s1 } = await addSuppliers(db.pool);
  await addPo(db.pool, 'PO-CONSOLE-1', s1);
  await db.pool.query(`select scm.ingest_asn($1::jsonb, 'push')`, [JSON.stringify(asnDoc('ASN-CONSOLE-1', 'PO-CONSOLE-1', [{ line: 1, qty: 10 }]))]);
  await db.pool.query(`select scm.quarantine_pushed_event('{"type": "SUPPLIER_CHANGED"}', 'evt-console-1', 'ES018', 'event type SUPPLIER_CHANGED is not configured as an ASN')`);
  dead = (await db.pool.query(`select cloud.enqueue_message('hooks', 'demo.ping', jsonb_build_object('n', n)) as id from generate_series(1, 3) n`)).rows.map((r) => String(r.id));

  await waitFor(async () => {
    const { rows } = await db.pool.query(`select
        (select count(*) from cloud.outbox where endpoint = 'hooks' and status = 'dead') = 3 as hooks_dead,
        (select bool_and(status = 'failed') from tax.invoice_status where reference = $1) as refused,
        (select bool_and(status = 'issued' and pdf_attachment_id is not null) from tax.invoice_status where reference = $2) as issued,
        (select cloud_status = 'published' from scm.order_status where po_no = 'PO-CONSOLE-1') as published`, [`settlement/${refusedSettlement.no}`, `settlement/${good.no}`]);
    const r = rows[0];
    return r.hooks_dead && r.refused && r.issued && r.published;
  }, { timeoutMs: 45_000, intervalMs: 200, what: 'the seeded documents to settle' });
  // the issued invoice is reversed in full (开票有误): a red-letter pair
  const blue = (await db.pool.query(`select invoice_id from tax.invoice_status where reference = $1`, [`settlement/${good.no}`])).rows[0].invoice_id;
  await requestReversal(db.pool, blue, '2');
  await waitFor(async () => (await db.pool.query(`select status = 'issued' and pdf_attachment_id is not null as done from tax.red_invoice_status where original_invoice_id = $1`, [blue])).rows[0]?.done,
    { timeoutMs: 45_000, intervalMs: 200, what: 'the red-letter invoice to be issued' });

  const config = loadConsoleConfig({
    DATABASE_URL: db.url, ERP_CLOUD_CONSOLE_URL: consoleUrl, ERP_CLOUD_CONSOLE_PORT: String(client.port), ERP_CLOUD_CONSOLE_ISSUER: world.issuer,
    ERP_CLOUD_CONSOLE_CLIENT_ID: 'console', ERP_CLOUD_CONSOLE_CLIENT_SECRET: client.secret, ERP_CLOUD_LOG_LEVEL: 'silent',
  });
  consoleServer = await startConsoleServer({ config, pool: db.pool, log: createLogger('silent') });
  browser = await chromium.launch({
    executablePath: CHROMIUM, headless: true, timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-dev-shm-usage'],
  });
}, 120_000);

afterAll(async () => {
  for (const c of contexts) await c.close().catch(() => undefined);
  await browser?.close();
  await consoleServer?.close();
  await listener?.stop();
  await hooks?.close();
  await yonbip?.close();
  await nuonuo?.close();
  await world?.close();
}, 60_000);

/** A browser of its own for `login`, signed in the way the ERP's "open the console" button does it. */
async function signIn(login: string, lang: 'zh' | 'en' = 'zh'): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 }, locale: lang === 'zh' ? 'zh-CN' : 'en-US' });
  contexts.push(context);
  context.setDefaultTimeout(20_000);
  const page = await context.newPage();
  const jump = await world.issue(login, 'console');
  await page.goto(jump);
  await page.waitForURL(`${consoleUrl}/`);
  return page;
}

async function shot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: `${ARTIFACTS}/console-${name}.png`, fullPage: true });
}

const csrfOf = (page: Page) => page.locator('form[action="/logout"] input[name=csrf]').getAttribute('value');
const statusOf = async (id: string) => (await world.db.pool.query('select status from cloud.outbox where request_id = $1', [id])).rows[0].status as string;

describe('the operations console in a browser', () => {
  let ops: Page;
  let fin: Page;

  it('the overview shows each endpoint\'s real numbers from the database, in Chinese by default', async () => {
    ops = await signIn('ops');
    const { rows } = await world.db.pool.query(`select endpoint, pending, failed, dead from cloud.endpoint_status order by endpoint`);
    expect(rows.map((r) => r.endpoint)).toEqual(['hooks', 'nuonuo', 'yonbip']);
    const hooksCard = ops.locator('[data-endpoint=hooks]');
    expect(await hooksCard.locator('[data-count=dead]').textContent()).toBe('3');
    expect(await ops.locator('[data-endpoint=nuonuo] [data-count=failed]').textContent()).toBe(String(rows[1].failed));
    // the chart counts what cloud.log holds for the last hours
    const ok = Number((await world.db.pool.query(`select count(*) from cloud.log where endpoint = 'nuonuo' and outcome = 'ok'`)).rows[0].count);
    expect(ok).toBeGreaterThan(0);
    await expect.poll(async () => (await ops.locator('[data-endpoint=nuonuo] svg.chart .legend').textContent()) ?? '').toContain(`送达 ${ok}`);
    expect(await ops.locator('header nav').textContent()).toContain('待处理');
    await shot(ops, 'overview');
  });

  it('the language switch shows the same page in English', async () => {
    await ops.goto(`${consoleUrl}/?lang=en`);
    expect(await ops.locator('header nav').textContent()).toContain('Needs attention');
    expect(await ops.locator('[data-endpoint=hooks] [data-count=dead]').textContent()).toBe('3');
    await shot(ops, 'overview-en');
    await ops.goto(`${consoleUrl}/?lang=zh`);
    expect(await ops.locator('header nav').textContent()).toContain('待处理');
  });

  it('a refused invoice is listed under needs attention with the platform\'s reason and what to do', async () => {
    await ops.goto(`${consoleUrl}/attention`);
    const card = ops.locator('section.invoice[data-outcome=refused]');
    expect(await card.count()).toBe(1);
    const reason = (await card.locator('.advice').textContent()) ?? '';
    expect(reason).toContain(REFUSAL);
    expect(reason).toContain('重新开票');
    expect(await ops.locator('tr.message[data-status=dead]').count()).toBe(3);
    await shot(ops, 'attention');
  });

  it('a finance user corrects the buyer and reissues from the page: the invoice is issued, and the page shows its number and PDF', async () => {
    fin = await signIn('fin');
    await fin.goto(`${consoleUrl}/attention`);
    // finance sees no replay button
    expect(await fin.locator('form[data-action=replay]').count()).toBe(0);
    const form = fin.locator('form[data-action=reissue]');
    await form.locator('input[name=buyer_tax_id]').fill(CORRECT_TAX_ID);
    await form.locator('input[name=reason]').fill('客户税号录错，已更正');
    await form.locator('button[value=form]').click();
    await fin.waitForURL(`${consoleUrl}/attention`);
    expect(await fin.locator('.flash.ok').textContent()).toContain('重新开票');
    const ref = `settlement/${refusedSettlement.no}`;
    const issued = await waitFor(async () => {
      const { rows } = await world.db.pool.query(`select invoice_no, buyer_tax_id from tax.invoice_status where reference = $1 and status = 'issued' and pdf_attachment_id is not null`, [ref]);
      return rows[0];
    }, { timeoutMs: 30_000, intervalMs: 200, what: 'the reissued invoice to be issued with its PDF' });
    expect(issued.buyer_tax_id).toBe(CORRECT_TAX_ID);
    const audit = (await world.db.pool.query(`select login, console_role, action from cloud.console_audit where action = 'reissue'`)).rows;
    expect(audit).toEqual([{ login: 'fin', console_role: 'finance', action: 'reissue' }]);

    // found by the number the clerk knows, without the ERP's "settlement/" prefix
    await fin.goto(`${consoleUrl}/documents?q=${encodeURIComponent(refusedSettlement.no)}`);
    await fin.waitForURL(/\/documents\/tax\/\d+$/);
    expect(await fin.locator('section.invoice[data-status=issued] .invoice-no').textContent()).toBe(issued.invoice_no);
    const frame = fin.locator('iframe.pdf');
    expect(await frame.count()).toBe(1);
    const pdf = await fin.request.get(`${consoleUrl}${await frame.getAttribute('src')}`);
    expect(pdf.status()).toBe(200);
    expect(pdf.headers()['content-type']).toBe('application/pdf');
    expect((await pdf.body()).subarray(0, 5).toString()).toBe('%PDF-');
    // the timeline: the refused try and the issued one, each attempt with its redacted request
    expect(await fin.locator('.message').count()).toBeGreaterThan(1);
    expect(await fin.locator('table.attempts tr').count()).toBeGreaterThan(2);
    await fin.waitForTimeout(1500); // the browser's PDF viewer draws the first page (for the screenshot only)
    await shot(fin, 'document');
  });

  it('a reversed invoice\'s document shows the red-letter pair: the blue invoice reversed, the red one with its number and PDF', async () => {
    await ops.goto(`${consoleUrl}/documents?q=${encodeURIComponent(goodSettlement.no)}`);
    await ops.waitForURL(/\/documents\/tax\/\d+$/);
    const { rows } = await world.db.pool.query(`select r.invoice_id, r.invoice_no, b.status as blue_status from tax.red_invoice_status r
                                                  join tax.invoice_status b on b.invoice_id = r.original_invoice_id where b.reference = $1`, [`settlement/${goodSettlement.no}`]);
    expect(rows[0].blue_status).toBe('reversed');
    expect(await ops.locator('section.invoice[data-status=reversed]').count()).toBe(1);
    const red = ops.locator(`section.invoice[data-invoice-id="${rows[0].invoice_id}"]`);
    expect(await red.locator('.invoice-no').textContent()).toBe(rows[0].invoice_no);
    expect(await red.locator('iframe.pdf').count()).toBe(1);
    await ops.waitForTimeout(2500); // the PDF viewers draw (for the screenshot only)
    await shot(ops, 'document-red');
  });

  it('a finance user cannot replay a message: the page offers no button, and the database refuses the request too', async () => {
    const csrf = await csrfOf(fin);
    const res = await fin.request.post(`${consoleUrl}/actions/replay`, { form: { csrf: csrf!, request_id: dead[1]!, reason: '试试', back: '/attention' } });
    expect(res.status()).toBe(200); // back on the page (the redirect followed), with the database's refusal
    expect(await res.text()).toMatch(/class="flash bad"[^>]*>[^<]*42501/);
    expect(await statusOf(dead[1]!)).toBe('dead');
  });

  it('an operator replays a dead message from the page: it is queued again, sent, and the page shows it sent', async () => {
    // the endpoint is fixed (as an operator would, outside the console)
    await world.db.pool.query(`select cloud.put_endpoint('hooks', $1, 'webhook', p_max_attempts => 1, p_timeout_ms => 1000)`, [`${hooks.url}/webhook`]);
    await ops.goto(`${consoleUrl}/attention`);
    const row = ops.locator(`tr.message[data-request-id="${dead[0]}"]`);
    await row.locator('form[data-action=replay] input[name=reason]').fill('接收端已恢复');
    await row.locator('form[data-action=replay] button').click();
    await ops.waitForURL(`${consoleUrl}/attention`);
    expect(await ops.locator('.flash.ok').textContent()).toContain(dead[0]!);
    await waitFor(async () => (await statusOf(dead[0]!)) === 'sent', { timeoutMs: 20_000, intervalMs: 100, what: 'the replayed message to be sent' });
    await ops.goto(`${consoleUrl}/documents?q=${dead[0]}`);
    await ops.waitForURL(`${consoleUrl}/documents/message/${dead[0]}`);
    expect(await ops.locator(`.message[data-request-id="${dead[0]}"]`).getAttribute('data-status')).toBe('sent');
    expect(await ops.locator('table.audit').textContent()).toContain('console:ops');
    await shot(ops, 'message');
  });

  it('an action without its CSRF token is refused and changes nothing', async () => {
    const before = Number((await world.db.pool.query('select count(*) from cloud.console_audit')).rows[0].count);
    const res = await ops.request.post(`${consoleUrl}/actions/replay`, { form: { request_id: dead[2]!, reason: '没有令牌', back: '/attention' } });
    expect(res.status()).toBe(403);
    expect(await res.text()).toContain('CSRF');
    const wrong = await ops.request.post(`${consoleUrl}/actions/skip`, { form: { csrf: 'x'.repeat(43), request_id: dead[2]!, reason: '错误令牌' } });
    expect(wrong.status()).toBe(403);
    expect(await statusOf(dead[2]!)).toBe('dead');
    expect(Number((await world.db.pool.query('select count(*) from cloud.console_audit')).rows[0].count)).toBe(before);
  });

  it('a signed-in user without a console role sees nothing and can do nothing, and signing out ends the session', async () => {
    const guest = await signIn('guest');
    expect(await guest.locator('#no-role').count()).toBe(1);
    expect(await guest.locator('header nav a').count()).toBe(0);
    expect(await guest.locator('[data-endpoint]').count()).toBe(0);
    await shot(guest, 'no-role');
    for (const path of ['/attention', '/documents?q=PO-CONSOLE-1', '/settings', '/procurement']) {
      const res = await guest.request.get(`${consoleUrl}${path}`);
      expect(res.status(), path).toBe(403);
      expect(await res.text(), path).not.toContain('PO-CONSOLE-1</a>');
    }
    const res = await guest.request.post(`${consoleUrl}/actions/replay`, { form: { csrf: (await csrfOf(guest))!, request_id: dead[2]!, reason: '访客' } });
    expect(res.status()).toBe(403);
    expect(await statusOf(dead[2]!)).toBe('dead');
    // signing out ends the console session: the same browser is asked to sign in again
    await guest.locator('form[action="/logout"] button').click();
    await guest.waitForURL(`${consoleUrl}/signed-out`);
    const after = await guest.request.get(`${consoleUrl}/attention`, { maxRedirects: 0 });
    expect(after.status()).toBe(302);
    expect(after.headers().location).toBe('/login');
  });

  it('procurement shows the order with its cloud status, the ASN with its source, and the quarantined event with its reason', async () => {
    await ops.goto(`${consoleUrl}/procurement`);
    expect(await ops.locator('table.orders').textContent()).toContain('PO-CONSOLE-1');
    expect(await ops.locator('table.orders').textContent()).toContain('已发布');
    const asns = (await ops.locator('table.asns').textContent()) ?? '';
    expect(asns).toContain('ASN-CONSOLE-1');
    expect(asns).toContain('推送');
    expect(await ops.locator('table.quarantine').textContent()).toContain('SUPPLIER_CHANGED is not configured');
    await shot(ops, 'procurement');
  });

  it('settings are read-only and never show a secret', async () => {
    await ops.goto(`${consoleUrl}/settings`);
    const text = (await ops.content());
    expect(text).toContain('hooks');
    expect(text).toContain('nuonuo');
    expect(await ops.locator('form').count()).toBe(1); // sign-out only
    for (const secret of [APP_SECRET, 'nuonuo.app_secret', 'app_secret', world.rpSecret]) expect(text).not.toContain(secret);
    await shot(ops, 'settings');
  });

  it('the documents page finds a purchase order by its number and shows its ASNs', async () => {
    await ops.goto(`${consoleUrl}/documents`);
    await shot(ops, 'documents');
    await ops.fill('input[name=q]', 'PO-CONSOLE-1');
    await ops.press('input[name=q]', 'Enter');
    await ops.waitForURL(/\/documents\/po\/\d+$/);
    expect(await ops.locator('table.asns').textContent()).toContain('ASN-CONSOLE-1');
    await shot(ops, 'order');
  });

  it('needs attention pages by keyset: the first page holds 50 messages, "more" shows the rest, none twice', async () => {
    const db = world.db;
    await db.pool.query(`select cloud.put_endpoint('bulk', $1, 'webhook', p_max_attempts => 1, p_timeout_ms => 1000)`, [`http://127.0.0.1:${await freePort()}/`]);
    await db.pool.query(`select cloud.put_endpoint_allowlist('bulk', '{}', '{}', true)`);
    await db.pool.query(`select cloud.put_endpoint_limits('bulk', null, p_circuit_threshold => 1000, p_circuit_window => 1000)`);
    await db.pool.query(`select cloud.enqueue_message('bulk', 'demo.ping', jsonb_build_object('n', n)) from generate_series(1, 55) n`);
    const expected = await waitFor(async () => {
      const { rows } = await db.pool.query(`select request_id::text as rid from cloud.outbox where status in ('failed', 'dead') order by id desc`);
      return rows.length >= 57 && (await db.pool.query(`select count(*)::int n from cloud.outbox where endpoint = 'bulk' and status <> 'dead'`)).rows[0].n === 0
        ? rows.map((r) => r.rid as string) : null;
    }, { timeoutMs: 40_000, intervalMs: 200, what: 'the bulk messages to go dead' });
    await ops.goto(`${consoleUrl}/attention`);
    const first = await ops.locator('tr.message').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-request-id')));
    expect(first).toEqual(expected.slice(0, 50));
    await ops.locator('a.more').click();
    await ops.waitForURL(/messages_before=\d+/);
    const second = await ops.locator('tr.message').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-request-id')));
    expect(second).toEqual(expected.slice(50));
    expect(await ops.locator('a.more').count()).toBe(0);
  });
});
