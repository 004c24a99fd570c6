/**
 * A simulator of the Nuonuo open platform (诺诺开放平台) for tests and the demo,
 * on the simulator framework (server.ts: fault injection, request log).
 *
 *   POST /accessToken        client credentials → {access_token, expires_in}; a token-call quota (070306)
 *   POST /open/v1/services   the gateway: appkey (070101), accessToken (070305) and X-Nuonuo-Sign
 *                            (070601) checked; methods by the `method` header:
 *     *.requestBillingNew          orderNo is the idempotency key (E9106 on a resubmit); issues asynchronously:
 *                                  status 20 for issueDelayMs, then 2 (number, PDF) or 22 with a fail cause
 *                                  when the data is wrong (line tax error over 0.06, invoice tax error over 1.27,
 *                                  totals, a text over its documented length, more than 8 decimals, a buyer the bureau refuses),
 *                                  or 24 (signing failed) for signFailBuyers until reInvoice
 *     nuonuo.OpeMplatform.reInvoice retries the signature of a 24 invoice by serial no. (fpqqlsh)
 *     *.queryInvoiceResult         by serialNos or orderNos (E9500 when none is known)
 *     *.saveInvoiceRedConfirm      数电 red-confirmation form (billId unique: E9106); after issueDelayMs the form
 *     *.queryInvoiceRedConfirm     is 04 and the red invoice is issued (or 02 forever with redAwaitBuyer);
 *                                  forms of one blue invoice must not overlap in lines
 *   GET  /files/<no>.pdf     the invoice's PDF (made with pdf-lib, carrying the invoice number)
 *   POST /__nuonuo/settings  {issueDelayMs, rejectBuyers: {taxNum: cause}, pdfUrlOverride, pdfRedirectTo, signFailBuyers, redAwaitBuyer}:
 *                            the settings given change, the others keep their values; an unknown key or a bad value
 *                            is refused with 400 {error: 'invalid_settings', issues: [{field, message}]} and changes nothing
 *   GET  /__nuonuo/settings  the current settings
 *   GET  /__nuonuo/invoices  the invoices issued (the "ledger" tests count)
 * When an order carries callBackUrl, the simulator posts the form-encoded callback there once the result is final.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { PDFDocument, StandardFonts } from 'pdf-lib';
import { z } from 'zod';
import { startSim, type RouteContext, type RouteResult, type SimServer } from './sim-server.js';

export interface NuonuoSimOptions {
  port?: number;
  host?: string;
  appKey: string;
  appSecret: string;
  /** Token calls allowed (default 50, Nuonuo's "50 per 30 days"). */
  tokenQuota?: number;
  /** Seconds a token lives (default 86400). */
  tokenTtlS?: number;
  issueDelayMs?: number;
}

export interface NuonuoSimSettings {
  issueDelayMs: number;
  /** Buyer tax numbers the "tax bureau" refuses, with the fail cause (status 22). */
  rejectBuyers: Record<string, string>;
  /** Report this pdfUrl instead of the simulator's own (SSRF tests). */
  pdfUrlOverride: string | null;
  /** Answer PDF downloads with a 302 to here (SSRF tests). */
  pdfRedirectTo: string | null;
  /** Buyer tax numbers whose invoice ends 24 (开票成功签章失败) until reInvoice is called for it. */
  signFailBuyers: string[];
  /** Red-confirmation forms stay 02 (销方录入待购方确认): the buyer never confirms. */
  redAwaitBuyer: boolean;
}

export interface SimInvoice {
  orderNo: string;
  serialNo: string;
  status: '20' | '2' | '22' | '24';
  failCause: string;
  /** reInvoice calls received for it. */
  reinvoices: number;
  invoiceNo: string;
  invoiceTime: number;
  red: boolean;
  blueInvoiceNo: string | null;
  buyerTaxNum: string | null;
  exTaxAmount: string;
  taxAmount: string;
  orderAmount: string;
  submits: number;
}

export interface NuonuoSim extends SimServer {
  invoices(): SimInvoice[];
  tokenCalls(): number;
  configure(s: Partial<NuonuoSimSettings>): void;
  pdfOf(invoiceNo: string): Buffer | undefined;
}

interface RedForm {
  billId: string;
  billNo: string;
  billStatus: string;
  blueNo: string;
  redSerial: string | null;
  redInvoiceNo: string | null;
  /** The blue lines it reverses (blueDetailIndex), or null for all. */
  lines: string[] | null;
}

type Obj = Record<string, unknown>;

function signOf(secret: string, appKey: string, path: string, q: URLSearchParams, body: string): string {
  const pieces = path.split('/');
  const msg = `a=${pieces[3] ?? ''}&l=${pieces[2] ?? ''}&p=${pieces[1] ?? ''}&k=${appKey}&i=${q.get('senid') ?? ''}&n=${q.get('nonce') ?? ''}&t=${q.get('timestamp') ?? ''}&f=${body}`;
  return createHmac('sha1', secret).update(msg, 'utf8').digest('base64');
}

/** What POST /__nuonuo/settings takes: every key optional, none unknown (a typo must not pass as "no change"). */
const settingsPatch = z.strictObject({
  // a delay the simulator can schedule: whole milliseconds, up to 10 minutes
  issueDelayMs: z.number().int().min(0).max(600_000),
  rejectBuyers: z.record(z.string().min(1), z.string().min(1)),
  pdfUrlOverride: z.string().url().nullable(),
  pdfRedirectTo: z.string().url().nullable(),
  signFailBuyers: z.array(z.string().min(1)),
  redAwaitBuyer: z.boolean(),
}).partial();

/** requestBillingNew lengths (诺税通 doc), counted in characters as the 数电 platform counts them. */
const ORDER_TEXT_LIMITS: Record<string, number> = {
  buyerName: 100, buyerTel: 50, buyerAddress: 80, buyerAccount: 100, salerTel: 20, salerAddress: 80, salerAccount: 100,
  email: 50, clerk: 20, remark: 200,
};
const DETAIL_TEXT_LIMITS: Record<string, number> = { goodsName: 90, specType: 40, unit: 20 };

function chars(v: unknown): number {
  return typeof v === 'string' ? [...v].length : 0;
}

function cents(v: unknown): number {
  return Math.round(Number(v) * 100);
}

function money(c: number): string {
  return (c / 100).toFixed(2);
}

async function makePdf(inv: SimInvoice): Promise<Buffer> {
  const doc = await PDFDocument.create();
  doc.setTitle(`Invoice ${inv.invoiceNo}`);
  const page = doc.addPage([595, 420]);
  const font = await doc.embedFont(StandardFonts.Helvetica);
  const lines = [
    inv.red ? 'Electronic invoice - RED (simulated, Nuonuo simulator)' : 'Electronic invoice (simulated, Nuonuo simulator)',
    `Invoice No: ${inv.invoiceNo}`,
    `Order No: ${inv.orderNo}`,
    `Buyer tax no: ${inv.buyerTaxNum ?? '-'}`,
    `Amount excl. tax: ${inv.exTaxAmount}   Tax: ${inv.taxAmount}   Total: ${inv.orderAmount}`,
    ...(inv.blueInvoiceNo ? [`Reverses invoice: ${inv.blueInvoiceNo}`] : []),
  ];
  lines.forEach((text, i) => page.drawText(text, { x: 40, y: 370 - i * 24, size: 12, font }));
  return Buffer.from(await doc.save());
}

export async function startNuonuoSim(o: NuonuoSimOptions): Promise<NuonuoSim> {
  const settings: NuonuoSimSettings = { issueDelayMs: o.issueDelayMs ?? 300, rejectBuyers: {}, pdfUrlOverride: null, pdfRedirectTo: null, signFailBuyers: [], redAwaitBuyer: false };
  const tokenQuota = o.tokenQuota ?? 50;
  const tokenTtlS = o.tokenTtlS ?? 86400;
  const tokens = new Map<string, number>();
  let tokenCalls = 0;
  const byOrder = new Map<string, SimInvoice>();
  const bySerial = new Map<string, SimInvoice>();
  const byNumber = new Map<string, SimInvoice>();
  const pdfs = new Map<string, Buffer>();
  const forms = new Map<string, RedForm>();
  const timers = new Set<NodeJS.Timeout>();
  let seq = 0;
  let baseUrl = '';

  const later = (ms: number, fn: () => void): void => {
    const t = setTimeout(() => {
      timers.delete(t);
      fn();
    }, ms);
    timers.add(t);
  };
  const ok = (result: unknown, describe = '成功'): RouteResult => ({ status: 200, body: { code: 'E0000', describe, result } });
  const err = (code: string, describe: string): RouteResult => ({ status: 200, body: { code, describe, result: null } });
  const nextNumber = (): string => {
    seq += 1;
    const yy = String(new Date().getFullYear() % 100).padStart(2, '0');
    return `${yy}352${String(seq).padStart(15, '0')}`; // 20 digits: year, region 35, channel 2, sequence
  };
  const serial = (): string => `${Date.now()}${randomBytes(3).readUIntBE(0, 3).toString().padStart(8, '0')}`.slice(0, 20);

  async function sendCallback(url: string, inv: SimInvoice): Promise<void> {
    const content = {
      c_status: inv.status === '2' ? '1' : inv.status === '24' ? '3' : '2', c_fpqqlsh: inv.serialNo, c_orderno: inv.orderNo, c_fpdm: '', c_fphm: inv.invoiceNo,
      c_kprq: inv.invoiceTime, c_bhsje: inv.exTaxAmount, c_hjse: inv.taxAmount, c_url: `${baseUrl}/files/${inv.invoiceNo}.pdf`,
      c_errorMessage: inv.failCause,
    };
    const form = new URLSearchParams({ operater: 'callback', orderno: inv.orderNo, content: JSON.stringify(content) });
    try {
      await fetch(url, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: form.toString() });
    } catch {
      // a real platform retries later; the receiver's side is a hint anyway
    }
  }

  async function finish(inv: SimInvoice, failCause: string | null, callBackUrl: string | null): Promise<void> {
    if (inv.status !== '20') return;
    if (failCause) {
      inv.status = '22';
      inv.failCause = failCause;
    } else {
      inv.invoiceNo = nextNumber();
      inv.invoiceTime = Date.now();
      byNumber.set(inv.invoiceNo, inv);
      if (inv.buyerTaxNum && settings.signFailBuyers.includes(inv.buyerTaxNum) && inv.reinvoices === 0) {
        inv.status = '24'; // issued, the signature failed: reInvoice retries it
        inv.failCause = '签章失败';
      } else {
        pdfs.set(inv.invoiceNo, await makePdf(inv));
        inv.status = '2';
      }
    }
    if (callBackUrl) void sendCallback(callBackUrl, inv);
  }

  function dataProblem(order: Obj, details: Obj[]): string | null {
    const buyer = typeof order.buyerTaxNum === 'string' ? order.buyerTaxNum : '';
    if (buyer && settings.rejectBuyers[buyer]) return settings.rejectBuyers[buyer]!;
    for (const [key, max] of Object.entries(ORDER_TEXT_LIMITS)) {
      if (chars(order[key]) > max) return `${key}长度超过${max}个字符`;
    }
    if (chars(order.buyerAddress) + chars(order.buyerTel) > 100) return '购方地址+电话总共不能超过100个字符';
    let deviation = 0;
    for (const [i, d] of details.entries()) {
      const ex = cents(d.taxExcludedAmount);
      const tax = cents(d.tax);
      const inc = cents(d.taxIncludedAmount);
      if (!/^\d{19}$/.test(String(d.goodsCode ?? ''))) return `第${i + 1}行商品编码不合法`;
      for (const [key, max] of Object.entries(DETAIL_TEXT_LIMITS)) {
        if (chars(d[key]) > max) return `第${i + 1}行${key}长度超过${max}个字符`;
      }
      if ([d.num, d.price].some((v) => typeof v === 'string' && /\.\d{9,}$/.test(v))) return `第${i + 1}行单价或数量超过8位小数`;
      if (ex + tax !== inc) return `第${i + 1}行价税合计不一致`;
      if (Math.abs(tax - ex * Number(d.taxRate)) > 6) return `第${i + 1}行税额误差大于6分钱`;
      deviation += tax - ex * Number(d.taxRate);
    }
    // the whole invoice: Σ(tax − excl × rate) within 1.27 (127 fen; a hair of float slack)
    if (Math.abs(deviation) > 127 + 1e-6) return '整张发票税额误差大于1.27元，建议拆分开票';
    return null;
  }

  function issue(order: Obj): RouteResult {
    const orderNo = String(order.orderNo ?? '');
    const details = Array.isArray(order.invoiceDetail) ? (order.invoiceDetail as Obj[]) : [];
    if (!orderNo || !order.buyerName || details.length === 0 || !order.salerTaxNum) return err('E9999', '请求参数不完整 (orderNo, buyerName, salerTaxNum, invoiceDetail)');
    const seen = byOrder.get(orderNo);
    if (seen) {
      seen.submits += 1;
      return err('E9106', '订单编号或流水号不能重复');
    }
    const sum = (k: string) => money(details.reduce((s, d) => s + cents(d[k]), 0));
    const inv: SimInvoice = {
      orderNo, serialNo: serial(), status: '20', failCause: '', reinvoices: 0, invoiceNo: '', invoiceTime: 0, red: false, blueInvoiceNo: null,
      buyerTaxNum: typeof order.buyerTaxNum === 'string' ? order.buyerTaxNum : null,
      exTaxAmount: sum('taxExcludedAmount'), taxAmount: sum('tax'), orderAmount: sum('taxIncludedAmount'), submits: 1,
    };
    byOrder.set(orderNo, inv);
    bySerial.set(inv.serialNo, inv);
    const problem = dataProblem(order, details);
    const cb = typeof order.callBackUrl === 'string' && order.callBackUrl !== '' ? order.callBackUrl : null;
    later(settings.issueDelayMs, () => void finish(inv, problem, cb));
    return ok({ invoiceSerialNum: inv.serialNo }, '开票提交成功');
  }

  function view(inv: SimInvoice): Obj {
    const done = inv.status === '2';
    return {
      serialNo: inv.serialNo, orderNo: inv.orderNo, status: inv.status,
      statusMsg: { '20': '开票中', '2': '开票完成（最终状态）', '22': '开票失败', '24': '开票成功签章失败' }[inv.status], failCause: inv.failCause,
      pdfUrl: done ? settings.pdfUrlOverride ?? `${baseUrl}/files/${inv.invoiceNo}.pdf` : '',
      ofdUrl: done ? `${baseUrl}/files/${inv.invoiceNo}.ofd` : '', xmlUrl: done ? `${baseUrl}/files/${inv.invoiceNo}.xml` : '',
      invoiceTime: done ? inv.invoiceTime : null, invoiceCode: '', invoiceNo: inv.invoiceNo, allElectronicInvoiceNumber: inv.invoiceNo,
      exTaxAmount: inv.exTaxAmount, taxAmount: inv.taxAmount, orderAmount: inv.orderAmount, payerTaxNo: inv.buyerTaxNum,
      invoiceKind: inv.red ? '红票' : '蓝票', oldEleInvoiceNumber: inv.blueInvoiceNo ?? '',
    };
  }

  function query(body: Obj): RouteResult {
    const serials = Array.isArray(body.serialNos) ? body.serialNos.map(String) : null;
    const orders = Array.isArray(body.orderNos) ? body.orderNos.map(String) : null;
    if ((serials === null) === (orders === null)) return err('E9999', 'serialNos 与 orderNos 必须且只能传一个');
    const found = (serials ?? []).map((s) => bySerial.get(s)).concat((orders ?? []).map((n) => byOrder.get(n))).filter((i): i is SimInvoice => !!i);
    if (found.length === 0) return err('E9500', '发票不存在');
    return ok(found.map(view));
  }

  function redConfirm(body: Obj): RouteResult {
    const billId = String(body.billId ?? '');
    if (!billId) return err('E9999', 'billId 不能为空');
    if (forms.has(billId)) return err('E9106', '单据编号不能重复');
    const blue = byNumber.get(String(body.blueElecInvoiceNumber ?? ''));
    if (!blue || blue.red) return err('E9999', '蓝字发票不存在');
    const detail = Array.isArray(body.detail) ? (body.detail as Obj[]) : null;
    const lines = detail ? detail.map((d) => String(d.blueDetailIndex)) : null;
    // a line is reversed once: a full form excludes any other, partial forms must not overlap
    const overlaps = (f: RedForm): boolean => f.lines === null || lines === null || f.lines.some((l) => lines.includes(l));
    if ([...forms.values()].some((f) => f.blueNo === blue.invoiceNo && !['16', '07'].includes(f.billStatus) && overlaps(f))) return err('E9999', '该蓝票已存在红字确认单');
    if (!['1', '2', '3', '4'].includes(String(body.redReason))) return err('E9999', '冲红原因不合法');
    const form: RedForm = { billId, billNo: `${Date.now()}${seq}`.slice(0, 20), billStatus: '15', blueNo: blue.invoiceNo, redSerial: null, redInvoiceNo: null, lines };
    forms.set(billId, form);
    later(settings.issueDelayMs, () => {
      if (settings.redAwaitBuyer) {
        form.billStatus = '02'; // 销方录入待购方确认: waits for a buyer who never answers
        return;
      }
      void (async () => {
        const exC = detail ? detail.reduce((s, d) => s + cents(d.taxExcludedAmount), 0) : -cents(blue.exTaxAmount);
        const taxC = detail ? detail.reduce((s, d) => s + cents(d.taxAmount), 0) : -cents(blue.taxAmount);
        const red: SimInvoice = {
          orderNo: String(body.orderNo ?? billId), serialNo: serial(), status: '20', failCause: '', reinvoices: 0, invoiceNo: '', invoiceTime: 0,
          red: true, blueInvoiceNo: blue.invoiceNo, buyerTaxNum: blue.buyerTaxNum,
          exTaxAmount: money(exC), taxAmount: money(taxC), orderAmount: money(exC + taxC), submits: 1,
        };
        byOrder.set(red.orderNo, red);
        bySerial.set(red.serialNo, red);
        await finish(red, null, null);
        form.billStatus = '04';
        form.redSerial = red.serialNo;
        form.redInvoiceNo = red.invoiceNo;
      })();
    });
    return ok(billId, '红字确认单提交成功');
  }

  /** reInvoice {fpqqlsh, orderno}: retries the signature of a 24 invoice (at most 20 per day: E9613). */
  function reInvoice(body: Obj): RouteResult {
    const inv = bySerial.get(String(body.fpqqlsh ?? ''));
    if (!inv) return err('E9500', '发票不存在');
    if (inv.status !== '24') return err('E9999', '发票状态不是开票成功签章失败');
    if (inv.reinvoices >= 20) return err('E9613', '重试次数超过限制');
    inv.reinvoices += 1;
    later(settings.issueDelayMs, () => {
      void (async () => {
        pdfs.set(inv.invoiceNo, await makePdf(inv));
        inv.status = '2';
        inv.failCause = '';
      })();
    });
    return ok(null, '重新开票提交成功');
  }

  function redQuery(body: Obj): RouteResult {
    const form = forms.get(String(body.billId ?? ''));
    const list = form ? [{
      billId: form.billId, billNo: form.billNo, billUuid: form.billId, billStatus: form.billStatus,
      openStatus: form.redInvoiceNo ? '1' : '0', redInvoiceNumber: form.redInvoiceNo ?? '', invoiceSerialNum: form.redSerial ?? '',
      blueElecInvoiceNumber: form.blueNo,
    }] : [];
    return ok({ total: list.length, list });
  }

  function gateway(ctx: RouteContext): RouteResult {
    const q = ctx.query;
    if (q.get('appkey') !== o.appKey) return err('070101', 'appKey 不存在');
    if (!/^[0-9a-zA-Z]{32}$/.test(q.get('senid') ?? '') || !/^\d{1,8}$/.test(q.get('nonce') ?? '') || !/^\d{10}$/.test(q.get('timestamp') ?? '')) {
      return err('070102', 'senid / nonce / timestamp 不合法');
    }
    const token = String(ctx.headers.accesstoken ?? '');
    const exp = tokens.get(token);
    if (!exp || exp < Date.now()) return err('070305', 'accessToken 无效或已过期');
    if (ctx.headers['x-nuonuo-sign'] !== signOf(o.appSecret, o.appKey, ctx.path, q, ctx.rawBody)) return err('070601', '签名不匹配');
    const body = (typeof ctx.body === 'object' && ctx.body !== null ? ctx.body : {}) as Obj;
    const method = String(ctx.headers.method ?? '');
    if (method.endsWith('.requestBillingNew')) return issue((body.order ?? {}) as Obj);
    if (method.endsWith('.queryInvoiceResult')) return query(body);
    if (method === 'nuonuo.OpeMplatform.saveInvoiceRedConfirm') return redConfirm(body);
    if (method === 'nuonuo.OpeMplatform.queryInvoiceRedConfirm') return redQuery(body);
    if (method === 'nuonuo.OpeMplatform.reInvoice') return reInvoice(body);
    return err('070201', `method ${method} 不存在`);
  }

  function token(ctx: RouteContext): RouteResult {
    const form = new URLSearchParams(ctx.rawBody);
    tokenCalls += 1;
    if (form.get('grant_type') !== 'client_credentials' || form.get('client_id') !== o.appKey || form.get('client_secret') !== o.appSecret) {
      return { status: 400, body: { error: 'invalid_client', error_description: 'client_id 或 client_secret 错误' } };
    }
    if (tokenCalls > tokenQuota) return { status: 200, body: { error: '070306', error_description: 'token 调用次数已达上限' } };
    const t = randomBytes(16).toString('hex');
    tokens.set(t, Date.now() + tokenTtlS * 1000);
    return { status: 200, body: { access_token: t, expires_in: tokenTtlS } };
  }

  function file(ctx: RouteContext): RouteResult {
    if (settings.pdfRedirectTo) return { status: 302, headers: { location: settings.pdfRedirectTo } };
    const m = /^\/files\/(\d+)\.pdf$/.exec(ctx.path);
    const pdf = m ? pdfs.get(m[1]!) : undefined;
    if (!pdf) return { status: 404, body: { error: 'not_found' } };
    return { status: 200, raw: pdf, headers: { 'content-type': 'application/pdf' } };
  }

  function control(ctx: RouteContext): RouteResult {
    if (ctx.method === 'GET') return { status: 200, body: { invoices: [...byOrder.values()], tokenCalls } };
    const parsed = settingsPatch.safeParse(ctx.body ?? {});
    if (!parsed.success) {
      const issues = parsed.error.issues.map((i) => ({
        // an unknown key is reported under its own name, not under the object's (empty) path
        field: i.code === 'unrecognized_keys' ? i.keys.join(', ') : i.path.join('.') || '(body)',
        message: i.message,
      }));
      return { status: 400, body: { error: 'invalid_settings', issues } };
    }
    Object.assign(settings, parsed.data);
    return { status: 200, body: { ok: true, settings } };
  }

  function currentSettings(): RouteResult {
    return { status: 200, body: { settings } };
  }

  const sim = await startSim({
    port: o.port,
    host: o.host,
    name: 'nuonuo',
    routes: [
      { method: 'POST', path: '/accessToken', handler: token, idempotent: false },
      // Nuonuo's idempotency key is the orderNo (E9106), not a header: the framework's ledger stays out of it
      { method: 'POST', path: '/open/v1/services', handler: gateway, idempotent: false },
      { method: 'GET', path: /^\/files\//, handler: file, idempotent: false },
      { method: 'POST', path: '/__nuonuo/settings', handler: control, idempotent: false },
      { method: 'GET', path: '/__nuonuo/settings', handler: currentSettings, idempotent: false },
      { method: 'GET', path: '/__nuonuo/invoices', handler: control, idempotent: false },
    ],
  });
  baseUrl = sim.url;
  return {
    ...sim,
    async close() {
      for (const t of timers) clearTimeout(t);
      timers.clear();
      await sim.close();
    },
    reset() {
      sim.reset();
      byOrder.clear();
      bySerial.clear();
      byNumber.clear();
      pdfs.clear();
      forms.clear();
      tokens.clear();
      tokenCalls = 0;
    },
    invoices: () => [...byOrder.values()].map((i) => ({ ...i })),
    tokenCalls: () => tokenCalls,
    configure: (s) => Object.assign(settings, s),
    pdfOf: (n) => pdfs.get(n),
  };
}
