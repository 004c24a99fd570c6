/**
 * The foreign-shaped example ERP (sql/examples/acme), end to end through the listener and the Nuonuo
 * simulator: an ERP whose tables erp-cloud has never seen (pinyin columns, its own status codes, its own
 * customer table) issues, corrects, reissues and reverses invoices through the public contracts only,
 * and gets the results in its own columns through its callback.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { migrationsDir } from '../../listener/kernel/db.js';
import { MigrationError, MigrationReason, runMigrations } from '../../listener/kernel/migrations.js';
import { startNuonuoSim, type NuonuoSim } from '../../listener/sim/nuonuo.js';
import { createTestDb, inTransaction, waitFor, type TestDb } from '../helpers/db.js';
import { installExample } from '../helpers/examples.js';
import { startListener, type InProcessListener } from '../helpers/listener.js';

const run = promisify(execFile);
const EXAMPLE_DIR = path.resolve(migrationsDir, '../examples/acme');
const APP_KEY = 'acme-app';
const APP_SECRET = randomBytes(12).toString('hex');
/** Valid 统一社会信用代码 (GB 32100 check digit right). */
const USCC = ['91330106MA2AYNWD8M', '91350100M000100Y43', '91440101MA5APD8X8J', '91310230674560485R'] as const;
const SOFTWARE = '3040201030000000000';
/** ADR 0001 §3: what an example may name (e-invoicing, procurement). */
const CONTRACTS = ['tax.put_source', 'tax.enqueue_invoices', 'tax.enqueue_reversal', 'tax.requery_invoices', 'tax.reissue_invoices',
  'tax.replay_callbacks', 'tax.invoice_status', 'tax.red_invoice_status', 'tax.invoice_result',
  'scm.put_source', 'scm.enqueue_order', 'scm.enqueue_order_close', 'scm.order_enqueued', 'scm.order_status', 'scm.order_result',
  'scm.asn_delivery'];
const GOODS = '1090613010000000000';

let db: TestDb;
let sim: NuonuoSim;
let listener: InProcessListener;
let installedFirst: string[];

beforeAll(async () => {
  process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
  db = await createTestDb('acme');
  installedFirst = await installExample(db, 'acme');
  sim = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 200 });
  await configureTax(1);
  listener = await startListener(db.url);
});
afterAll(async () => {
  await listener?.stop();
  await sim?.close();
  await db?.drop();
});
beforeEach(async () => {
  sim.configure({ rejectBuyers: {}, issueDelayMs: 200 });
  await configureTax(200);
});

async function configureTax(maxLines: number): Promise<void> {
  await db.pool.query(`select cloud.put_endpoint('nuonuo', $1, 'nuonuo', 'invoice_request', p_timeout_ms => 2000, p_max_attempts => 8,
                        p_backoff_base_ms => 100, p_backoff_cap_ms => 500, p_config => $2)`,
  [`${sim.url}/open/v1/services`, JSON.stringify({ app_key: APP_KEY, app_secret_name: 'nuonuo.app_secret' })]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('nuonuo', '{}', '{}', true)`);
  await db.pool.query(`select tax.put_config(p_seller_tax_id => '339902999999789113', p_seller_name => '浙江诺诺网络科技', p_clerk => '张三',
                        p_max_invoice_lines => $1, p_first_poll_ms => 200, p_poll_cap_ms => 1000, p_max_polls => 30,
                        p_unset => '{max_invoice_amount,callback_url}')`, [maxLines]);
}

let seq = 0;
interface AcmeLine { spmc: string; ssbm?: string; je: number; slv?: number; sl?: number; dj?: number }

/** A customer (客户) and a 销售开票单 in draft (zt 0) with its lines, written the way the ERP writes them. */
async function document(lines: AcmeLine[], o: { khsh?: string; fplx?: '01' | '02' } = {}): Promise<{ djbh: string; khbh: string }> {
  const n = ++seq;
  const khbh = `KH${process.pid}-${n}`;
  const djbh = `XS${process.pid}-${n}`;
  await db.pool.query(`insert into acme.customer (khbh, khmc, khsh, dz, dh, khh, zh) values ($1, '华东机电有限公司', $2, '杭州市文三路 1 号', '0571-88888888', '工商银行杭州分行', '1202020209900000001')`,
    [khbh, o.khsh ?? USCC[0]]);
  await db.pool.query(`insert into acme.so_invoice_head (djbh, khbh, fplx) values ($1, $2, $3)`, [djbh, khbh, o.fplx ?? '02']);
  for (const [i, l] of lines.entries()) {
    await db.pool.query(`insert into acme.so_invoice_line (djbh, hh, spmc, ssbm, je, slv, sl, dj) values ($1, $2, $3, $4, $5, $6, $7, $8)`,
      [djbh, i + 1, l.spmc, l.ssbm ?? SOFTWARE, l.je, l.slv ?? 0.06, l.sl ?? null, l.dj ?? null]);
  }
  return { djbh, khbh };
}

/** 审核: the clerk approves the document in the ERP's own table. */
const approve = (djbh: string) => db.pool.query(`update acme.so_invoice_head set zt = '1' where djbh = $1`, [djbh]);

interface PartStatus { invoice_id: string; part_no: number; status: string; invoice_no: string | null; has_pdf: boolean }

/** Waits until every invoice of the document is final (issued with its PDF, or failed) and none of its messages is open. */
async function settled(reference: string, parts = 1, view = 'tax.invoice_status'): Promise<PartStatus[]> {
  return waitFor(async () => {
    const { rows } = await db.pool.query<PartStatus>(`select invoice_id::text, ${view === 'tax.invoice_status' ? 'part_no' : '1 as part_no'}, status, invoice_no,
        pdf is not null as has_pdf from ${view} where source = 'acme' and reference = $1 order by invoice_id`, [reference]);
    if (rows.length !== parts || rows.some((r) => r.status !== 'failed' && !(r.invoice_no && r.has_pdf))) return null;
    const open = await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_id = any ($1::text[]) and status in ('pending', 'in_flight')`,
      [rows.map((r) => r.invoice_id)]);
    return open.rows[0].n === 0 ? rows : null;
  }, { timeoutMs: 40_000, intervalMs: 100, what: `the invoices of ${reference} to settle` });
}

const head = async (djbh: string) => (await db.pool.query(`select * from acme.so_invoice_head where djbh = $1`, [djbh])).rows[0];
const parts = async (djbh: string) => (await db.pool.query(`select * from acme.so_invoice_fp where djbh = $1 order by xh`, [djbh])).rows;
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** The pg error a promise rejects with. */
async function pgError(p: Promise<unknown>): Promise<{ code?: string; message: string; detail?: string; hint?: string }> {
  try {
    await p;
  } catch (err) {
    return err as { code?: string; message: string; detail?: string; hint?: string };
  }
  throw new Error('expected the statement to fail');
}

describe('acme approves a 销售开票单 in its own table', () => {
  it('the invoice number, the state Y and the PDF land in the ERP\'s own columns through its callback', async () => {
    const { djbh } = await document([{ spmc: '伺服电机', ssbm: GOODS, slv: 0.13, sl: 2, dj: 56.5, je: 113 }, { spmc: '安装调试服务', je: 106 }]);
    await inTransaction(db.pool, async (c) => {
      await c.query(`update acme.so_invoice_head set zt = '1' where djbh = $1`, [djbh]);
      // the trigger marks it submitted in the approving transaction
      expect((await c.query(`select kpzt from acme.so_invoice_head where djbh = $1`, [djbh])).rows[0].kpzt).toBe('Q');
    });
    const [inv] = await settled(djbh);
    expect(inv).toMatchObject({ status: 'issued' });
    expect(inv!.invoice_no).toMatch(/^\d{20}$/);

    const h = await head(djbh);
    expect(h).toMatchObject({ zt: '1', kpzt: 'Y', fphm: inv!.invoice_no, cwxx: null });
    expect(h.kprq).toBeInstanceOf(Date);
    const [fp, ...more] = await parts(djbh);
    expect(more).toHaveLength(0);
    expect(fp).toMatchObject({ xh: 1, fphm: inv!.invoice_no, kpzt: 'Y' });
    const pdf: Buffer = fp.pdf;
    expect(pdf.subarray(0, 5).toString('latin1')).toBe('%PDF-');
    expect(pdf.equals(sim.pdfOf(inv!.invoice_no!)!)).toBe(true);
    // the platform issued it once, to the buyer in acme.customer, for the document's total
    expect(sim.invoices().filter((i) => i.invoiceNo === inv!.invoice_no)).toMatchObject([{ status: '2', buyerTaxNum: USCC[0], orderAmount: '219.00', submits: 1 }]);
  });

  it('a document split into several invoices gets one so_invoice_fp row per part, each with its own number and PDF', async () => {
    await configureTax(1);
    const { djbh } = await document([{ spmc: '服务一', je: 10.6 }, { spmc: '服务二', je: 21.2 }, { spmc: '服务三', je: 31.8 }]);
    await approve(djbh);
    const invs = await settled(djbh, 3);
    const fps = await parts(djbh);
    expect(fps.map((f) => [f.xh, f.fphm, f.kpzt])).toEqual(invs.map((i) => [i.part_no, i.invoice_no, 'Y']));
    expect(new Set(fps.map((f) => f.fphm)).size).toBe(3);
    for (const f of fps) expect((f.pdf as Buffer).equals(sim.pdfOf(f.fphm)!)).toBe(true);
    expect(await head(djbh)).toMatchObject({ kpzt: 'Y', fphm: invs.map((i) => i.invoice_no).join(',') });
  });

  it('approving again (作废 to 录入 and back to 审核) issues nothing more', async () => {
    const { djbh } = await document([{ spmc: '软件维护', je: 53 }]);
    await approve(djbh);
    const [inv] = await settled(djbh);
    const messages = async () => (await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_id = $1`, [inv!.invoice_id])).rows[0].n;
    const before = { messages: await messages(), platform: sim.invoices().length, fp: await parts(djbh) };
    await db.pool.query(`update acme.so_invoice_head set zt = '0' where djbh = $1`, [djbh]);
    await approve(djbh);
    expect(await messages()).toBe(before.messages);
    expect((await db.pool.query(`select count(*)::int n from tax.invoice_status where source = 'acme' and reference = $1`, [djbh])).rows[0].n).toBe(1);
    expect(sim.invoices().length).toBe(before.platform);
    expect(await head(djbh)).toMatchObject({ kpzt: 'Y', fphm: inv!.invoice_no });
    expect(await parts(djbh)).toEqual(before.fp);
  });
});

describe('validation errors are in the ERP\'s own terms', () => {
  it('a bad khsh fails the approval with EI001 naming customer.khsh, the JSON path in DETAIL, and nothing is written', async () => {
    const { djbh } = await document([{ spmc: '软件维护', je: 53 }], { khsh: '9133010' });
    const outbox = async () => (await db.pool.query(`select count(*)::int n from cloud.outbox`)).rows[0].n;
    const before = await outbox();
    const err = await pgError(approve(djbh));
    expect(err.code).toBe('EI001');
    expect(err.message).toContain('customer.khsh');
    expect(err.message).toContain(djbh);
    expect(err.message).not.toMatch(/buyer_tax_id|erp\.customer|buyerTaxNum/);
    expect(err.detail).toBe('$.buyer.tax_id');
    expect(err.hint).toContain('customer.khsh');
    // the approval was rolled back with everything the contract would have written
    expect(await head(djbh)).toMatchObject({ zt: '0', kpzt: null, fphm: null });
    expect(await parts(djbh)).toEqual([]);
    expect((await db.pool.query(`select count(*)::int n from tax.invoice_status where source = 'acme' and reference = $1`, [djbh])).rows[0].n).toBe(0);
    expect(await outbox()).toBe(before);
  });

  it('a bad ssbm on the second line fails with EI003 naming so_invoice_line.ssbm and the path $.lines[1].tax_code', async () => {
    const { djbh } = await document([{ spmc: '软件维护', je: 53 }, { spmc: '咨询服务', ssbm: '30402010', je: 106 }]);
    const err = await pgError(approve(djbh));
    expect(err.code).toBe('EI003');
    expect(err.message).toContain('so_invoice_line.ssbm');
    expect(err.detail).toBe('$.lines[1].tax_code');
    expect((await head(djbh)).zt).toBe('0');
  });
});

describe('a refused invoice, corrected in acme.customer and reissued', () => {
  it('goes out again with the corrected tax id read from the ERP\'s own customer row', async () => {
    sim.configure({ rejectBuyers: { [USCC[2]]: '购买方纳税人识别号在税务局登记信息中不存在' } });
    const { djbh, khbh } = await document([{ spmc: '软件维护', je: 106 }], { khsh: USCC[2] });
    await approve(djbh);
    const [refused] = await settled(djbh);
    expect(refused).toMatchObject({ status: 'failed', invoice_no: null });
    expect(await head(djbh)).toMatchObject({ kpzt: 'S', fphm: null, cwxx: '购买方纳税人识别号在税务局登记信息中不存在' });
    expect((await parts(djbh))[0]).toMatchObject({ kpzt: 'S', fphm: null });

    // the clerk corrects the customer in the ERP; the operator reissues by the ERP's own document number
    await db.pool.query(`update acme.customer set khsh = $1 where khbh = $2`, [USCC[3], khbh]);
    await db.pool.query(`select tax.reissue_invoices('acme', $1)`, [djbh]);
    const [again] = await settled(djbh);
    expect(again).toMatchObject({ invoice_id: refused!.invoice_id, status: 'issued' });
    expect(await head(djbh)).toMatchObject({ kpzt: 'Y', fphm: again!.invoice_no, cwxx: null });
    // the platform's ledger: the refused one under the old tax id, the issued one under the corrected one
    expect(sim.invoices().filter((i) => i.buyerTaxNum === USCC[2]).map((i) => i.status)).toContain('22');
    expect(sim.invoices().filter((i) => i.invoiceNo === again!.invoice_no)).toMatchObject([{ status: '2', buyerTaxNum: USCC[3] }]);
  });
});

describe('a red invoice (红冲) from acme.so_red_head', () => {
  it('issues a red invoice for the named line and leaves the blue part\'s number and PDF as they were', async () => {
    const { djbh } = await document([{ spmc: '伺服电机', ssbm: GOODS, slv: 0.13, je: 113 }, { spmc: '安装调试服务', je: 106 }]);
    await approve(djbh);
    const [blue] = await settled(djbh);
    const [fpBefore] = await parts(djbh);
    const headBefore = await head(djbh);

    const hcdh = `HC${process.pid}-${++seq}`;
    await db.pool.query(`insert into acme.so_red_head (hcdh, djbh, hh, yy) values ($1, $2, '{2}', '2')`, [hcdh, djbh]);
    const [red] = await settled(hcdh, 1, 'tax.red_invoice_status');
    expect(red).toMatchObject({ status: 'issued' });
    expect(red!.invoice_no).not.toBe(blue!.invoice_no);
    const redHead = (await db.pool.query(`select * from acme.so_red_head where hcdh = $1`, [hcdh])).rows[0];
    expect(redHead).toMatchObject({ kpzt: 'Y', fphm: red!.invoice_no, cwxx: null });
    expect(sim.invoices().find((i) => i.invoiceNo === red!.invoice_no)).toMatchObject({ red: true, blueInvoiceNo: blue!.invoice_no, orderAmount: '-106.00' });

    // the blue part keeps its number and its PDF; only its state says part of it is reversed
    await waitFor(async () => (await parts(djbh))[0].kpzt === 'B', { what: 'the blue part to show 部分红冲' });
    const [fpAfter, ...more] = await parts(djbh);
    expect(more).toHaveLength(0);
    expect(fpAfter).toMatchObject({ fphm: fpBefore.fphm, kprq: fpBefore.kprq });
    expect(sha(fpAfter.pdf)).toBe(sha(fpBefore.pdf));
    expect(await head(djbh)).toMatchObject({ fphm: headBefore.fphm, kpzt: 'B' });
  });
});

describe('the callback', () => {
  it('that gives way (an ERP job holds so_invoice_fp) does not fail the write-back; the call is kept once per invoice, with its latest event, and the listener calls it again once the job lets go, no operator needed', async () => {
    const { djbh } = await document([{ spmc: '软件维护', je: 212 }]);
    const erpJob = await db.pool.connect();
    let invoiceId: string;
    try {
      await erpJob.query(`begin`);
      await erpJob.query(`lock table acme.so_invoice_fp in share mode`); // inserts and updates wait for it
      await approve(djbh);
      // erp-cloud's own record completes: issued, PDF stored, the chain done
      const [inv] = await settled(djbh);
      expect(inv).toMatchObject({ status: 'issued' });
      invoiceId = inv!.invoice_id;
      const failures = await db.pool.query(`select event, sqlstate, attempts, replayed_at from tax.callback_failure where source = 'acme' and invoice_id = $1 order by id`,
        [invoiceId]);
      // one row, however many events and however often the listener tried again meanwhile; the last event is the PDF's
      expect(failures.rows).toHaveLength(1);
      expect(failures.rows[0]).toMatchObject({ sqlstate: '55P03', replayed_at: null, event: 'pdf_stored' });
      expect(failures.rows[0].attempts).toBeGreaterThanOrEqual(3); // submitted, issued, pdf_stored at least
      // the callback's writes were rolled back with it: the ERP still shows only what its trigger wrote
      expect(await head(djbh)).toMatchObject({ kpzt: 'Q', fphm: null });
    } finally {
      await erpJob.query('rollback').catch(() => undefined);
      erpJob.release();
    }
    // nobody calls tax.replay_callbacks: the listener's maintenance round does it
    const inv = await waitFor(async () => (await head(djbh))?.kpzt === 'Y' && (await settled(djbh))[0], { what: 'the deferred callback called again' });
    expect(await head(djbh)).toMatchObject({ kpzt: 'Y', fphm: inv.invoice_no });
    await waitFor(async () => {
      const [fp] = await parts(djbh);
      return fp?.pdf ? fp : null;
    }, { what: 'the PDF in so_invoice_fp' });
    const [fp] = await parts(djbh);
    expect(fp).toMatchObject({ fphm: inv.invoice_no, kpzt: 'Y' });
    expect((fp.pdf as Buffer).equals(sim.pdfOf(inv.invoice_no!)!)).toBe(true);
    const open = await db.pool.query(`select count(*)::int n from tax.callback_failure where source = 'acme' and invoice_id = $1 and replayed_at is null`,
      [invoiceId!]);
    expect(open.rows[0].n).toBe(0);
  });
});

describe('the example itself', () => {
  const installSql = readFileSync(path.join(EXAMPLE_DIR, 'install.sql'), 'utf8');

  it('uses only the public contracts: of erp-cloud\'s schemas its SQL names only the functions, views and types of ADR 0001 §3', () => {
    const code = installSql.replace(/--.*$/gm, '');
    const named = new Set([...code.matchAll(/\b(cloud|tax|scm|sso|vault|erp)\.([a-z_]+)/g)].map((m) => `${m[1]}.${m[2]}`));
    expect([...named].filter((n) => !CONTRACTS.includes(n))).toEqual([]);
    expect(named).toContain('tax.enqueue_invoices');
    expect(named).toContain('scm.enqueue_order');
  });

  it('runs as its own nologin owner, never a superuser: every function SECURITY DEFINER with an empty search_path and a comment, none executable by PUBLIC', async () => {
    const { rows } = await db.pool.query(`select p.oid::regprocedure::text fn, r.rolname owner, r.rolsuper, r.rolcanlogin, p.prosecdef, p.proconfig,
        obj_description(p.oid, 'pg_proc') is not null commented, has_function_privilege('public', p.oid, 'execute') public_exec
        from pg_proc p join pg_roles r on r.oid = p.proowner where p.pronamespace = 'acme'::regnamespace order by 1`);
    expect(rows.map((r) => r.fn)).toEqual(['acme._enqueue_order(text)', 'acme.buyer_of(text)', 'acme.on_asn(scm.asn_delivery)',
      'acme.on_invoice(tax.invoice_result)', 'acme.on_order(scm.order_result)', 'acme.tg_po_head__500_publish()',
      'acme.tg_po_line__500_publish()', 'acme.tg_so_invoice_head__500_issue()', 'acme.tg_so_red_head__500_reverse()']);
    for (const r of rows) {
      expect(r, r.fn).toMatchObject({ owner: 'acme_owner', rolsuper: false, rolcanlogin: false, prosecdef: true, commented: true, public_exec: false });
      expect(r.proconfig, r.fn).toContain('search_path=""');
    }
    const member = await db.pool.query(`select pg_has_role('acme_owner', 'erp_cloud_app', 'member') ok`);
    expect(member.rows[0].ok).toBe(true);
  });

  it('is installed by the runner (migrate --with-example): recorded in erp_cloud.example with the file\'s sha256; a second run leaves it as it is', async () => {
    expect(installedFirst).toEqual(['acme']);
    const { rows } = await db.pool.query(`select name, sha256 from erp_cloud.example where name = 'acme'`);
    expect(rows).toEqual([{ name: 'acme', sha256: sha(readFileSync(path.join(EXAMPLE_DIR, 'install.sql'))) }]);
    const comments = await db.pool.query(`select obj_description('erp_cloud.example'::regclass, 'pg_class') is not null as ok
      union all select col_description(attrelid, attnum) is not null from pg_attribute where attrelid = 'erp_cloud.example'::regclass and attnum > 0 and not attisdropped`);
    expect(comments.rows.map((r) => r.ok)).toEqual([true, true, true, true]);
    expect(await installExample(db, 'acme')).toEqual([]);
    const { stdout } = await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate', '--with-example', 'acme'], { env: { PATH: process.env.PATH } });
    expect(stdout).toContain('example acme is installed and unchanged');
  });

  it('an unknown example is refused before anything runs (unknown_example), naming the examples there are', async () => {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect();
    try {
      const err = await runMigrations(c, migrationsDir, () => undefined, { examples: ['acme', 'odoo'] }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(MigrationError);
      expect(err).toMatchObject({ reason: MigrationReason.unknownExample });
      expect((err as Error).message).toMatch(/odoo.*acme/);
    } finally {
      await c.end();
    }
    const cli = await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate', '--with-example', 'odoo'], { env: { PATH: process.env.PATH } })
      .then(() => ({ code: 0, stderr: '' }), (e: { code: number; stderr: string }) => e);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain('the examples are acme');
  });

  it('uninstall.sql disconnects it and keeps the ERP\'s data and erp-cloud\'s invoices; installing again reconnects it', async () => {
    const count = async (sql: string) => (await db.pool.query(sql)).rows[0].n as number;
    const before = { heads: await count(`select count(*)::int n from acme.so_invoice_head`), fp: await count(`select count(*)::int n from acme.so_invoice_fp`),
      invoices: await count(`select count(*)::int n from tax.invoice_status where source = 'acme'`) };
    await db.pool.query(readFileSync(path.join(EXAMPLE_DIR, 'uninstall.sql'), 'utf8'));
    expect(await count(`select count(*)::int n from pg_trigger where tgrelid in ('acme.so_invoice_head'::regclass, 'acme.so_red_head'::regclass, 'acme.po_head'::regclass, 'acme.po_line'::regclass) and not tgisinternal`)).toBe(0);
    expect(await count(`select count(*)::int n from pg_proc where pronamespace = 'acme'::regnamespace`)).toBe(0);
    expect(await count(`select count(*)::int n from erp_cloud.example where name = 'acme'`)).toBe(0);
    expect({ heads: await count(`select count(*)::int n from acme.so_invoice_head`), fp: await count(`select count(*)::int n from acme.so_invoice_fp`),
      invoices: await count(`select count(*)::int n from tax.invoice_status where source = 'acme'`) }).toEqual(before);
    // a draft approved while disconnected issues nothing
    const { djbh } = await document([{ spmc: '软件维护', je: 53 }]);
    await approve(djbh);
    expect(await count(`select count(*)::int n from tax.invoice_status where source = 'acme' and reference = '${djbh}'`)).toBe(0);
    expect(await installExample(db, 'acme')).toEqual(['acme']);
    expect(await count(`select count(*)::int n from pg_trigger where tgrelid in ('acme.so_invoice_head'::regclass, 'acme.so_red_head'::regclass, 'acme.po_head'::regclass, 'acme.po_line'::regclass) and not tgisinternal`)).toBe(4);
  });
});
