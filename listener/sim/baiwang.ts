/**
 * A simulator of the Baiwang open platform (百望云) for tests, the demo and the
 * benchmark, on the simulator framework (sim-server.ts: fault injection, request log).
 *
 *   POST /router/rest?method=baiwang.oauth.token&grant_type=password|refresh_token&client_id=…
 *        password grant: body {username, password: SHA-256(plain + salt), client_secret};
 *        refresh grant: refresh_token in the query (the old refresh token is spent: rotation).
 *        → {success, response: {access_token, expires_in, refresh_token, refresh_expires_in}}
 *   POST /router/rest?method=…&appKey=…&token=…&timestamp=…&sign=…   the gateway. Checked in order:
 *        appKey (100003), token (100001 unknown, 100002 expired), sign (100007: upper MD5 of
 *        appSecret + sorted key+value + the raw body + appSecret); then by method:
 *     baiwang.output.invoice.issue   serialNo is the idempotency key (70016 on a resubmit); issues
 *                                    synchronously (the number in response.success[]) or, with
 *                                    asyncIssue, answers 01 (开具中) and issues after issueDelayMs;
 *                                    data the bureau refuses (line tax over 0.06, invoice over 1.27,
 *                                    totals, tax codes, buyers in rejectBuyers) → response.fail[]
 *                                    (or 02 开具失败 when asynchronous)
 *     baiwang.output.invoice.query   by data.serialNo (70018 when unknown)
 *     baiwang.output.redinvoice.add  the 数电 红字确认单 (redConfirmSerialNo unique: 70017); after
 *                                    issueDelayMs the form is 04 and the red invoice issued under
 *                                    serialNo = redConfirmSerialNo (or stays 02 with redAwaitBuyer)
 *     baiwang.output.redinvoice.operate       confirmType 01 agree (→ 04, red issued), 02 deny (→ 05), 03 revoke (→ 08)
 *     baiwang.output.redinvoice.redforminfo   one form by redConfirmSerialNo / redConfirmUuid / redConfirmNo
 *     baiwang.output.redinvoice.formlist      the forms (of originalInvoiceNo, if given)
 *   GET  /files/<no>.pdf|.ofd|.xml   the invoice's files (the PDF made with pdf-lib, carrying the number)
 *   POST /__baiwang/settings  {asyncIssue, issueDelayMs, rejectBuyers, pdfUrlOverride, pdfRedirectTo, redAwaitBuyer}
 *   GET  /__baiwang/settings, GET /__baiwang/invoices (the ledger tests count)
 *
 * The gateway codes are Baiwang's (cloud-protocols §2.1: 100001/100002 token, 100007 sign); the
 * others (100003, 100005, 700xx) are this simulator's, shared with the adapter (providers/baiwang.ts).
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { PDFDocument, StandardFonts } from 'pdf-lib';
import { z } from 'zod';
import { baiwangPasswordHash, baiwangSign, queryRecord } from '../providers/baiwang-crypto.js';
import {
  BAIWANG_DUPLICATE_FORM, BAIWANG_DUPLICATE_SERIAL, BAIWANG_NOT_FOUND, BAIWANG_SIGN_WRONG, BAIWANG_TOKEN_EXPIRED, BAIWANG_TOKEN_INVALID,
} from '../providers/baiwang.js';
import { startSim, type RouteContext, type RouteResult, type SimServer } from './sim-server.js';

export interface BaiwangSimOptions {
  port?: number;
  host?: string;
  appKey: string;
  appSecret: string;
  username: string;
  /** The user's plain password and salt: the token call must carry SHA-256(password + salt). */
  password: string;
  salt: string;
  /** Seconds an access token lives (default 28800, about 8 h). */
  tokenTtlS?: number;
  /** Seconds a refresh token lives (default 30 days). */
  refreshTtlS?: number;
  issueDelayMs?: number;
}

export interface BaiwangSimSettings {
  /** Answer issue with 01 (开具中) and issue after issueDelayMs, instead of synchronously. */
  asyncIssue: boolean;
  issueDelayMs: number;
  /** Buyer tax numbers the "tax bureau" refuses, with the reason. */
  rejectBuyers: Record<string, string>;
  pdfUrlOverride: string | null;
  pdfRedirectTo: string | null;
  /** Red-confirmation forms stay 02 (销方录入待购方确认) until operate confirms them. */
  redAwaitBuyer: boolean;
}

export interface BaiwangSimInvoice {
  /** The serialNo (the idempotency key); orderNo is the same value, for tests shared with Nuonuo's ledger. */
  serialNo: string;
  orderNo: string;
  /** 01 开具中, 00 开具成功, 02 开具失败. */
  status: '00' | '01' | '02';
  failCause: string;
  invoiceNo: string;
  invoiceDate: string;
  red: boolean;
  blueInvoiceNo: string | null;
  buyerTaxNum: string | null;
  exTaxAmount: string;
  taxAmount: string;
  orderAmount: string;
  submits: number;
}

export interface BaiwangSim extends SimServer {
  invoices(): BaiwangSimInvoice[];
  /** Password-grant token calls. */
  tokenCalls(): number;
  /** Refresh-token calls. */
  refreshCalls(): number;
  /** Every access token issued so far expires now (the next call with one gets 100002). */
  expireTokens(): void;
  configure(s: Partial<BaiwangSimSettings>): void;
  pdfOf(invoiceNo: string): Buffer | undefined;
  /** The buyer confirms (01), denies (02) or the seller revokes (03) a red form, as operate does. */
  operate(billId: string, confirmType: '01' | '02' | '03'): string | null;
}

interface RedForm {
  uuid: string;
  no: string;
  serial: string;
  confirmState: string;
  blueNo: string;
  redInvoiceNo: string | null;
  details: Obj[] | null;
  lines: string[] | null;
}

type Obj = Record<string, unknown>;

const settingsPatch = z.strictObject({
  asyncIssue: z.boolean(),
  issueDelayMs: z.number().int().min(0).max(600_000),
  rejectBuyers: z.record(z.string().min(1), z.string().min(1)),
  pdfUrlOverride: z.string().url().nullable(),
  pdfRedirectTo: z.string().url().nullable(),
  redAwaitBuyer: z.boolean(),
}).partial();

const TEXT_LIMITS: Record<string, number> = { buyerName: 100, buyerAddressPhone: 100, buyerBankAccount: 100, remarks: 200, drawer: 20 };

const cents = (v: unknown): number => Math.round(Number(v) * 100);
const money = (c: number): string => (c / 100).toFixed(2);
const chars = (v: unknown): number => (typeof v === 'string' ? [...v].length : 0);

/** YYYYMMDDHHmmss in China time. */
function chinaTime(ms: number): string {
  const d = new Date(ms + 8 * 3_600_000);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getUTCFullYear()}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}`;
}

async function makePdf(inv: BaiwangSimInvoice): Promise<Buffer> {
  const doc = await PDFDocument.create();
  doc.setTitle(`Invoice ${inv.invoiceNo}`);
  const page = doc.addPage([595, 420]);
  const font = await doc.embedFont(StandardFonts.Helvetica);
  const lines = [
    inv.red ? 'Electronic invoice - RED (simulated, Baiwang simulator)' : 'Electronic invoice (simulated, Baiwang simulator)',
    `Invoice No: ${inv.invoiceNo}`,
    `Serial No: ${inv.serialNo}`,
    `Buyer tax no: ${inv.buyerTaxNum ?? '-'}`,
    `Amount excl. tax: ${inv.exTaxAmount}   Tax: ${inv.taxAmount}   Total: ${inv.orderAmount}`,
    ...(inv.blueInvoiceNo ? [`Reverses invoice: ${inv.blueInvoiceNo}`] : []),
  ];
  lines.forEach((t, i) => page.drawText(t, { x: 40, y: 370 - i * 24, size: 12, font }));
  return Buffer.from(await doc.save());
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(b: Buffer): number {
  let c = 0xffffffff;
  for (const x of b) c = CRC_TABLE[(c ^ x) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** An OFD container: a zip with one stored OFD.xml naming the invoice (enough for a reader to see the number). */
function makeOfd(inv: BaiwangSimInvoice): Buffer {
  const name = Buffer.from('OFD.xml');
  const data = Buffer.from(`<?xml version="1.0" encoding="UTF-8"?><ofd:OFD xmlns:ofd="http://www.ofdspec.org/2016" Version="1.1"><ofd:DocBody><ofd:DocInfo><ofd:Title>Invoice ${inv.invoiceNo}</ofd:Title></ofd:DocInfo></ofd:DocBody></ofd:OFD>`);
  const crc = crc32(data);
  const local = Buffer.alloc(30);
  local.writeUInt32LE(0x04034b50, 0); local.writeUInt16LE(20, 4); local.writeUInt32LE(crc, 14);
  local.writeUInt32LE(data.length, 18); local.writeUInt32LE(data.length, 22); local.writeUInt16LE(name.length, 26);
  const central = Buffer.alloc(46);
  central.writeUInt32LE(0x02014b50, 0); central.writeUInt16LE(20, 4); central.writeUInt16LE(20, 6); central.writeUInt32LE(crc, 16);
  central.writeUInt32LE(data.length, 20); central.writeUInt32LE(data.length, 24); central.writeUInt16LE(name.length, 28);
  const end = Buffer.alloc(22);
  const cdOffset = local.length + name.length + data.length;
  end.writeUInt32LE(0x06054b50, 0); end.writeUInt16LE(1, 8); end.writeUInt16LE(1, 10);
  end.writeUInt32LE(central.length + name.length, 12); end.writeUInt32LE(cdOffset, 16);
  return Buffer.concat([local, name, data, central, name, end]);
}

function makeXml(inv: BaiwangSimInvoice): Buffer {
  return Buffer.from(`<?xml version="1.0" encoding="UTF-8"?><EInvoice><InvoiceNumber>${inv.invoiceNo}</InvoiceNumber><SerialNo>${inv.serialNo}</SerialNo>`
    + `<TotalAmount>${inv.exTaxAmount}</TotalAmount><TotalTax>${inv.taxAmount}</TotalTax><TotalTaxIncluded>${inv.orderAmount}</TotalTaxIncluded></EInvoice>`);
}

export async function startBaiwangSim(o: BaiwangSimOptions): Promise<BaiwangSim> {
  const settings: BaiwangSimSettings = { asyncIssue: false, issueDelayMs: o.issueDelayMs ?? 300, rejectBuyers: {}, pdfUrlOverride: null, pdfRedirectTo: null, redAwaitBuyer: false };
  const tokenTtlS = o.tokenTtlS ?? 28_800;
  const refreshTtlS = o.refreshTtlS ?? 30 * 86_400;
  const tokens = new Map<string, number>();
  const refreshTokens = new Map<string, number>();
  let tokenCalls = 0;
  let refreshCalls = 0;
  const bySerial = new Map<string, BaiwangSimInvoice>();
  const byNumber = new Map<string, BaiwangSimInvoice>();
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
  const ok = (method: string, response: unknown): RouteResult => ({ status: 200, body: { method, requestId: randomUUID(), success: true, response } });
  const fail = (method: string, code: string, message: string): RouteResult =>
    ({ status: 200, body: { method, requestId: randomUUID(), success: false, errorResponse: { code: Number(code), message, subCode: '', subMessage: '' } } });
  const nextNumber = (): string => {
    seq += 1;
    const yy = String(new Date().getFullYear() % 100).padStart(2, '0');
    return `${yy}442${String(seq).padStart(15, '0')}`; // 20 digits: year, region 44, channel 2, sequence
  };

  async function finish(inv: BaiwangSimInvoice, problem: string | null): Promise<void> {
    if (inv.status !== '01') return;
    if (problem) {
      inv.status = '02';
      inv.failCause = problem;
      return;
    }
    inv.invoiceNo = nextNumber();
    inv.invoiceDate = chinaTime(Date.now());
    byNumber.set(inv.invoiceNo, inv);
    pdfs.set(inv.invoiceNo, await makePdf(inv));
    inv.status = '00';
  }

  function dataProblem(d: Obj, details: Obj[]): string | null {
    const buyer = typeof d.buyerTaxNo === 'string' ? d.buyerTaxNo : '';
    if (buyer && settings.rejectBuyers[buyer]) return settings.rejectBuyers[buyer]!;
    for (const [key, max] of Object.entries(TEXT_LIMITS)) {
      if (chars(d[key]) > max) return `${key}长度超过${max}个字符`;
    }
    let deviation = 0;
    let ex = 0;
    let tax = 0;
    let inc = 0;
    for (const [i, l] of details.entries()) {
      const e = cents(l.goodsTotalPrice);
      const t = cents(l.goodsTotalTax);
      const n = cents(l.goodsTotalPriceTax);
      if (!/^\d{19}$/.test(String(l.goodsCode ?? ''))) return `第${i + 1}行商品编码不合法`;
      if (e + t !== n) return `第${i + 1}行价税合计不一致`;
      if (Math.abs(t - e * Number(l.goodsTaxRate)) > 6) return `第${i + 1}行税额误差大于6分钱`;
      deviation += t - e * Number(l.goodsTaxRate);
      ex += e;
      tax += t;
      inc += n;
    }
    if (Math.abs(deviation) > 127 + 1e-6) return '整张发票税额误差大于1.27元，建议拆分开票';
    if (cents(d.invoiceTotalPrice) !== ex || cents(d.invoiceTotalTax) !== tax || cents(d.invoiceTotalPriceTax) !== inc) return '发票合计金额与明细不一致';
    return null;
  }

  function view(inv: BaiwangSimInvoice): Obj {
    const done = inv.status === '00';
    return {
      serialNo: inv.serialNo, invoiceStatus: inv.status,
      statusMessage: { '01': '开具中', '00': '开具成功', '02': '开具失败' }[inv.status],
      errorCode: inv.status === '02' ? '70001' : undefined, errorMessage: inv.failCause || undefined,
      invoiceNo: inv.invoiceNo, invoiceDate: inv.invoiceDate, invoiceType: inv.red ? '1' : '0',
      invoiceTotalPrice: inv.exTaxAmount, invoiceTotalTax: inv.taxAmount, invoiceTotalPriceTax: inv.orderAmount, buyerTaxNo: inv.buyerTaxNum,
      pdfUrl: done ? settings.pdfUrlOverride ?? `${baseUrl}/files/${inv.invoiceNo}.pdf` : '',
      ofdUrl: done ? `${baseUrl}/files/${inv.invoiceNo}.ofd` : '', xmlUrl: done ? `${baseUrl}/files/${inv.invoiceNo}.xml` : '',
      originalInvoiceNo: inv.blueInvoiceNo ?? undefined,
    };
  }

  async function issue(method: string, body: Obj): Promise<RouteResult> {
    const d = (body.data ?? {}) as Obj;
    const serialNo = String(d.serialNo ?? '');
    const details = Array.isArray(d.invoiceDetailsList) ? (d.invoiceDetailsList as Obj[]) : [];
    if (!serialNo || !d.buyerName || details.length === 0 || !body.taxNo) return fail(method, '70002', '请求参数不完整 (taxNo, serialNo, buyerName, invoiceDetailsList)');
    const seen = bySerial.get(serialNo);
    if (seen && seen.status !== '02') {
      seen.submits += 1;
      return ok(method, { success: [], fail: [{ serialNo, errorCode: BAIWANG_DUPLICATE_SERIAL, errorMessage: '流水号重复' }] });
    }
    const inv: BaiwangSimInvoice = {
      serialNo, orderNo: serialNo, status: '01', failCause: '', invoiceNo: '', invoiceDate: '', red: false, blueInvoiceNo: null,
      buyerTaxNum: typeof d.buyerTaxNo === 'string' ? d.buyerTaxNo : null,
      exTaxAmount: money(details.reduce((s, l) => s + cents(l.goodsTotalPrice), 0)),
      taxAmount: money(details.reduce((s, l) => s + cents(l.goodsTotalTax), 0)),
      orderAmount: money(details.reduce((s, l) => s + cents(l.goodsTotalPriceTax), 0)),
      submits: (seen?.submits ?? 0) + 1,
    };
    bySerial.set(serialNo, inv);
    const problem = dataProblem(d, details);
    if (settings.asyncIssue) {
      later(settings.issueDelayMs, () => void finish(inv, problem));
      return ok(method, { success: [{ serialNo, invoiceStatus: '01' }], fail: [] });
    }
    await finish(inv, problem);
    if (inv.status === '02') return ok(method, { success: [], fail: [{ serialNo, errorCode: '70001', errorMessage: inv.failCause }] });
    return ok(method, { success: [{ serialNo, invoiceNo: inv.invoiceNo, invoiceDate: inv.invoiceDate, invoiceStatus: '00', invoiceTotalPriceTax: inv.orderAmount }], fail: [] });
  }

  function query(method: string, body: Obj): RouteResult {
    const inv = bySerial.get(String(((body.data ?? {}) as Obj).serialNo ?? ''));
    if (!inv) return fail(method, BAIWANG_NOT_FOUND, '发票不存在');
    return ok(method, [view(inv)]);
  }

  function formView(f: RedForm): Obj {
    return {
      redConfirmUuid: f.uuid, redConfirmNo: f.no, redConfirmSerialNo: f.serial, confirmState: f.confirmState, originalInvoiceNo: f.blueNo,
      redInvoiceNo: f.redInvoiceNo ?? '', redInvoiceSerialNo: f.redInvoiceNo ? f.serial : '',
    };
  }

  /** The bureau's confirmation: the red invoice is issued automatically (autoIssueSwitch Y) under the form's serial. */
  async function confirmed(f: RedForm): Promise<void> {
    const blue = byNumber.get(f.blueNo)!;
    const exC = f.details ? f.details.reduce((s, d) => s + cents(d.goodsTotalPrice), 0) : -cents(blue.exTaxAmount);
    const taxC = f.details ? f.details.reduce((s, d) => s + cents(d.goodsTotalTax), 0) : -cents(blue.taxAmount);
    const red: BaiwangSimInvoice = {
      serialNo: f.serial, orderNo: f.serial, status: '01', failCause: '', invoiceNo: '', invoiceDate: '', red: true, blueInvoiceNo: blue.invoiceNo,
      buyerTaxNum: blue.buyerTaxNum, exTaxAmount: money(exC), taxAmount: money(taxC), orderAmount: money(exC + taxC), submits: 1,
    };
    bySerial.set(red.serialNo, red);
    f.confirmState = '04';
    await finish(red, null);
    f.redInvoiceNo = red.invoiceNo;
  }

  function redAdd(method: string, body: Obj): RouteResult {
    const serial = String(body.redConfirmSerialNo ?? '');
    if (!serial || !body.taxNo) return fail(method, '70002', 'redConfirmSerialNo 与 taxNo 不能为空');
    if (forms.has(serial)) return fail(method, BAIWANG_DUPLICATE_FORM, '红字确认单流水号重复');
    const blue = byNumber.get(String(body.originalInvoiceNo ?? ''));
    if (!blue || blue.red) return fail(method, '70003', '蓝字发票不存在');
    if (!['01', '02', '03', '04'].includes(String(body.redInvoiceLabel))) return fail(method, '70004', '红冲原因不合法');
    const details = Array.isArray(body.redInvoiceDetails) ? (body.redInvoiceDetails as Obj[]) : null;
    const lines = details ? details.map((d) => String(d.originalInvoiceDetailNo)) : null;
    const overlaps = (f: RedForm): boolean => f.lines === null || lines === null || f.lines.some((l) => lines.includes(l));
    if ([...forms.values()].some((f) => f.blueNo === blue.invoiceNo && !['05', '06', '07', '08'].includes(f.confirmState) && overlaps(f))) {
      return fail(method, '70005', '该蓝票已存在红字确认单');
    }
    seq += 1;
    const form: RedForm = { uuid: randomBytes(16).toString('hex'), no: `${Date.now()}${seq}`.slice(0, 20), serial, confirmState: '02', blueNo: blue.invoiceNo, redInvoiceNo: null, details, lines };
    forms.set(serial, form);
    later(settings.issueDelayMs, () => {
      if (!settings.redAwaitBuyer && form.confirmState === '02') void confirmed(form);
    });
    return ok(method, formView(form));
  }

  function findForm(body: Obj): RedForm | undefined {
    return forms.get(String(body.redConfirmSerialNo ?? ''))
      ?? [...forms.values()].find((f) => (body.redConfirmUuid && f.uuid === body.redConfirmUuid) || (body.redConfirmNo && f.no === body.redConfirmNo));
  }

  function operateForm(f: RedForm, confirmType: string): string | null {
    if (f.confirmState !== '02') return `确认单状态为${f.confirmState}，不能操作`;
    if (confirmType === '01') void confirmed(f);
    else if (confirmType === '02') f.confirmState = '05';
    else if (confirmType === '03') f.confirmState = '08';
    else return `confirmType ${confirmType} 不合法`;
    return null;
  }

  function gatewayMethod(method: string, body: Obj): RouteResult | Promise<RouteResult> {
    switch (method) {
      case 'baiwang.output.invoice.issue': return issue(method, body);
      case 'baiwang.output.invoice.query': return query(method, body);
      case 'baiwang.output.redinvoice.add': return redAdd(method, body);
      case 'baiwang.output.redinvoice.redforminfo': {
        const f = findForm(body);
        return f ? ok(method, formView(f)) : ok(method, null);
      }
      case 'baiwang.output.redinvoice.formlist':
        return ok(method, [...forms.values()].filter((f) => !body.originalInvoiceNo || f.blueNo === body.originalInvoiceNo).map(formView));
      case 'baiwang.output.redinvoice.operate': {
        const f = findForm(body);
        if (!f) return fail(method, BAIWANG_NOT_FOUND, '红字确认单不存在');
        const problem = operateForm(f, String(body.confirmType ?? ''));
        return problem ? fail(method, '70006', problem) : ok(method, formView(f));
      }
      default: return fail(method, '100004', `method ${method} 不存在`);
    }
  }

  function newGrant(): Obj {
    const access = randomBytes(16).toString('hex');
    const refresh = randomBytes(16).toString('hex');
    tokens.set(access, Date.now() + tokenTtlS * 1000);
    refreshTokens.set(refresh, Date.now() + refreshTtlS * 1000);
    return { access_token: access, token_type: 'bearer', expires_in: tokenTtlS, refresh_token: refresh, refresh_expires_in: refreshTtlS, scope: 'all' };
  }

  function token(ctx: RouteContext): RouteResult {
    const method = 'baiwang.oauth.token';
    const q = ctx.query;
    const body = (typeof ctx.body === 'object' && ctx.body !== null ? ctx.body : {}) as Obj;
    if (q.get('client_id') !== o.appKey || body.client_secret !== o.appSecret) return fail(method, '100003', 'client_id 或 client_secret 错误');
    if (q.get('grant_type') === 'refresh_token') {
      refreshCalls += 1;
      const r = q.get('refresh_token') ?? '';
      const exp = refreshTokens.get(r);
      if (!exp || exp < Date.now()) return fail(method, BAIWANG_TOKEN_INVALID, 'refresh_token 无效或已过期');
      refreshTokens.delete(r); // spent: a refresh token is used once
      return ok(method, newGrant());
    }
    if (q.get('grant_type') !== 'password') return fail(method, '100005', `grant_type ${q.get('grant_type') ?? ''} 不支持`);
    tokenCalls += 1;
    if (body.username !== o.username || body.password !== baiwangPasswordHash(o.password, o.salt)) return fail(method, '100005', '用户名或密码错误');
    return ok(method, newGrant());
  }

  function gateway(ctx: RouteContext): RouteResult | Promise<RouteResult> {
    const q = ctx.query;
    const method = q.get('method') ?? '';
    if (method === 'baiwang.oauth.token') return token(ctx);
    if (q.get('appKey') !== o.appKey) return fail(method, '100003', 'appKey 不存在');
    const exp = tokens.get(q.get('token') ?? '');
    if (exp === undefined) return fail(method, BAIWANG_TOKEN_INVALID, 'token 无效');
    if (exp < Date.now()) return fail(method, BAIWANG_TOKEN_EXPIRED, 'token 已过期');
    if (q.get('sign') !== baiwangSign(o.appSecret, queryRecord(q), ctx.rawBody)) return fail(method, BAIWANG_SIGN_WRONG, '签名错误');
    const body = (typeof ctx.body === 'object' && ctx.body !== null ? ctx.body : {}) as Obj;
    return gatewayMethod(method, body);
  }

  function file(ctx: RouteContext): RouteResult {
    if (settings.pdfRedirectTo) return { status: 302, headers: { location: settings.pdfRedirectTo } };
    const m = /^\/files\/(\d+)\.(pdf|ofd|xml)$/.exec(ctx.path);
    const inv = m ? byNumber.get(m[1]!) : undefined;
    if (!m || !inv || inv.status !== '00') return { status: 404, body: { error: 'not_found' } };
    if (m[2] === 'pdf') return { status: 200, raw: pdfs.get(inv.invoiceNo)!, headers: { 'content-type': 'application/pdf' } };
    if (m[2] === 'ofd') return { status: 200, raw: makeOfd(inv), headers: { 'content-type': 'application/ofd' } };
    return { status: 200, raw: makeXml(inv), headers: { 'content-type': 'application/xml' } };
  }

  function control(ctx: RouteContext): RouteResult {
    if (ctx.method === 'GET' && ctx.path.endsWith('/invoices')) return { status: 200, body: { invoices: [...bySerial.values()], tokenCalls, refreshCalls } };
    if (ctx.method === 'GET') return { status: 200, body: { settings } };
    const parsed = settingsPatch.safeParse(ctx.body ?? {});
    if (!parsed.success) {
      const issues = parsed.error.issues.map((i) => ({ field: i.code === 'unrecognized_keys' ? i.keys.join(', ') : i.path.join('.') || '(body)', message: i.message }));
      return { status: 400, body: { error: 'invalid_settings', issues } };
    }
    Object.assign(settings, parsed.data);
    return { status: 200, body: { ok: true, settings } };
  }

  const sim = await startSim({
    port: o.port,
    host: o.host,
    name: 'baiwang',
    routes: [
      // Baiwang's idempotency key is the serialNo (70016), not a header: the framework's ledger stays out of it
      { method: 'POST', path: '/router/rest', handler: gateway, idempotent: false },
      { method: 'GET', path: /^\/files\//, handler: file, idempotent: false },
      { method: 'POST', path: '/__baiwang/settings', handler: control, idempotent: false },
      { method: 'GET', path: '/__baiwang/settings', handler: control, idempotent: false },
      { method: 'GET', path: '/__baiwang/invoices', handler: control, idempotent: false },
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
      bySerial.clear();
      byNumber.clear();
      pdfs.clear();
      forms.clear();
      tokens.clear();
      refreshTokens.clear();
      tokenCalls = 0;
      refreshCalls = 0;
    },
    invoices: () => [...bySerial.values()].map((i) => ({ ...i })),
    tokenCalls: () => tokenCalls,
    refreshCalls: () => refreshCalls,
    expireTokens: () => {
      for (const t of tokens.keys()) tokens.set(t, 0);
    },
    configure: (s) => Object.assign(settings, s),
    pdfOf: (n) => pdfs.get(n),
    operate: (billId, confirmType) => {
      const f = forms.get(billId);
      return f ? operateForm(f, confirmType) : 'no such form';
    },
  };
}
