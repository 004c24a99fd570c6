/**
 * Baiwang open platform (百望云) adapter, behind the same e-invoicing contract as
 * Nuonuo: the SQL chain (migrations 0007, 0019, 0024) builds the same payloads for
 * every platform and reads the same answer shape (the "write-back shape": code
 * E0000 / E9500, result[].status 2 / 20 / 22, red forms by billStatus). This
 * adapter translates both ways, so nothing Baiwang-specific reaches SQL or the ERP
 * but a readable reason and, for audit, the platform's own answer under
 * `platform_answer`.
 *
 * One router gateway (cloud-protocols §2.1): POST <base_url>?method=…&version=…&appKey=…
 * &format=json&timestamp=<ms>&token=…&type=sync&requestId=…&sign=…; the sign is
 * upper(MD5(appSecret + sorted key+value + compact JSON body + appSecret)) over the
 * exact body string sent (baiwang-crypto.ts).
 *
 * Operations:
 *   tax.issue        → baiwang.output.invoice.issue (6.0)  serialNo = the payload's orderNo (the
 *                      request_id without dashes, the same on every retry): a duplicate-serial answer
 *                      means "already submitted", booked like Nuonuo's E9106 and looked up by that serial
 *   tax.query        → baiwang.output.invoice.query (6.0)  by serialNo (orderNo and serial no. are one here)
 *   tax.red_confirm  → baiwang.output.redinvoice.add (7.0)  the 数电 红字确认单, autoIssueSwitch Y
 *   tax.red_query    → baiwang.output.redinvoice.redforminfo (7.0)  confirmState 01–10 as billStatus
 *   tax.red_operate  → baiwang.output.redinvoice.operate (7.0)  confirmType 01 agree / 02 deny / 03 revoke
 *   tax.red_list     → baiwang.output.redinvoice.formlist (7.0)
 *   tax.download_pdf → GET the file URL under the egress guard (file-download.ts; payload.format pdf | ofd | xml)
 *   tax.reinvoice    → refused: Baiwang has no signing retry (tax._reinvoice_supported is false for it)
 *
 * Token: password grant (baiwang.oauth.token, 7.0; password = SHA-256(plain + salt)), cached in
 * cloud.provider_token like Nuonuo's (single-flight across listeners), renewed 15 minutes early
 * with the refresh token (cached under "<key>#refresh", 30 days) and by password when that fails.
 *
 * Endpoint config (names of secrets, never values):
 *   app_key             the appKey (travels in the query string)
 *   username            the Baiwang user the token is for
 *   tax_no              the seller's tax number on Baiwang (every call names it)
 *   app_secret_name     secret holding the appSecret (default 'baiwang.app_secret')
 *   password_name       secret holding the user's plain password (default 'baiwang.password')
 *   salt_name           secret holding the user's salt (default 'baiwang.salt')
 *   token_url           default: the base URL (the same router)
 */
import { randomUUID } from 'node:crypto';
import { AdapterError, type ClaimedMessage, type HttpAnswer, type OutgoingRequest, type ProviderAdapter, type ProviderContext, type Verdict } from './types.js';
import { classifyHttpFailure, parseJsonOrText } from './http-semantics.js';
import { baiwangPasswordHash, baiwangSign, compactJson } from './baiwang-crypto.js';
import { classifyDownload, downloadRequest } from './file-download.js';

/** Baiwang's gateway codes (cloud-protocols §2.1): the token is not valid (100001) or has expired (100002); the sign is wrong (100007). */
export const BAIWANG_TOKEN_INVALID = '100001';
export const BAIWANG_TOKEN_EXPIRED = '100002';
export const BAIWANG_SIGN_WRONG = '100007';
/**
 * Business codes this adapter and the simulator agree on (not in the protocol notes, which give only the
 * gateway's): a serialNo the platform has already taken, a red form id already used, no invoice under a serial.
 */
export const BAIWANG_DUPLICATE_SERIAL = '70016';
export const BAIWANG_DUPLICATE_FORM = '70017';
export const BAIWANG_NOT_FOUND = '70018';

export const METHODS: Record<string, { method: string; version: string }> = {
  'tax.issue': { method: 'baiwang.output.invoice.issue', version: '6.0' },
  'tax.query': { method: 'baiwang.output.invoice.query', version: '6.0' },
  'tax.red_confirm': { method: 'baiwang.output.redinvoice.add', version: '7.0' },
  'tax.red_query': { method: 'baiwang.output.redinvoice.redforminfo', version: '7.0' },
  'tax.red_operate': { method: 'baiwang.output.redinvoice.operate', version: '7.0' },
  'tax.red_list': { method: 'baiwang.output.redinvoice.formlist', version: '7.0' },
};

/** The write-back shape's codes (migration 0007's answer shape, which Nuonuo's answers have natively). */
const WB_OK = 'E0000';
const WB_NOT_FOUND = 'E9500';

/** Nuonuo's red reason digits (tax._reason_code) → the bureau's redInvoiceLabel (01 开票有误, 02 销货退回, 03 服务中止, 04 销售折让). */
const RED_LABEL: Record<string, string> = { '1': '02', '2': '01', '3': '03', '4': '04' };

/** Baiwang's invoice states in a query answer → the write-back's status (2 issued, 20 issuing, 22 failed). */
const STATUS: Record<string, string> = { '00': '2', '01': '20', '02': '22' };

type Obj = Record<string, unknown>;

interface Cfg {
  appKey: string;
  username: string;
  taxNo: string;
  appSecretName: string;
  passwordName: string;
  saltName: string;
  tokenUrl: string;
}

function configOf(msg: ClaimedMessage): Cfg {
  const c = msg.endpoint_config;
  const str = (k: string): string | null => (typeof c[k] === 'string' && c[k] !== '' ? (c[k] as string) : null);
  const need = (k: string, example: string): string => {
    const v = str(k);
    if (!v) throw new AdapterError('permanent', 'config', `endpoint ${msg.endpoint}: config.${k} is missing (cloud.put_endpoint … p_config => '{"${k}": "${example}", …}')`);
    return v;
  };
  return {
    appKey: need('app_key', '…'),
    username: need('username', '…'),
    taxNo: need('tax_no', '339902999999789113'),
    appSecretName: str('app_secret_name') ?? 'baiwang.app_secret',
    passwordName: str('password_name') ?? 'baiwang.password',
    saltName: str('salt_name') ?? 'baiwang.salt',
    tokenUrl: str('token_url') ?? msg.base_url,
  };
}

// ---------------------------------------------------------------------------
// Token: password grant, refresh token, cached in the database
// ---------------------------------------------------------------------------

interface Grant { token: string; expiresAt: Date; refresh: string | null; refreshExpiresAt: Date }

/** Refresh a token this long before it expires (it lasts about 8 h). */
export const TOKEN_MARGIN_MS = 15 * 60_000;

async function tokenCall(ctx: ProviderContext, cfg: Cfg, appSecret: string, grant: Record<string, string>, body: Obj): Promise<Grant> {
  const url = new URL(cfg.tokenUrl);
  url.search = new URLSearchParams({ method: 'baiwang.oauth.token', ...grant, client_id: cfg.appKey, version: '7.0', timestamp: String(Date.now()) }).toString();
  const answer = await ctx.fetch({ method: 'POST', url: url.toString(), headers: { 'content-type': 'application/json; charset=utf-8' }, body: compactJson({ ...body, client_secret: appSecret }) });
  if (answer.status >= 500 || answer.status === 429) throw new AdapterError('retryable', 'token_unavailable', `Baiwang's token call answered HTTP ${answer.status}`);
  const parsed = parseJsonOrText(answer.text());
  const env = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as Obj;
  const r = (env.response ?? {}) as Obj;
  if (env.success === true && typeof r.access_token === 'string' && r.access_token !== '') {
    const life = Number(r.expires_in ?? 28_800);
    const rlife = Number(r.refresh_expires_in ?? 30 * 86_400);
    return {
      token: r.access_token,
      expiresAt: new Date(Date.now() + (Number.isFinite(life) && life > 0 ? life : 28_800) * 1000),
      refresh: typeof r.refresh_token === 'string' && r.refresh_token !== '' ? r.refresh_token : null,
      refreshExpiresAt: new Date(Date.now() + (Number.isFinite(rlife) && rlife > 0 ? rlife : 30 * 86_400) * 1000),
    };
  }
  const e = (env.errorResponse ?? {}) as Obj;
  const why = [e.message, e.subMessage].filter((x) => typeof x === 'string' && x !== '').join(': ');
  throw new AdapterError('permanent', 'token_refused', `Baiwang refused the token call (${String(e.code ?? `HTTP ${answer.status}`)}${why ? ` ${why}` : ''}): check config.username, the password and salt secrets and the app secret`);
}

/** Thrown inside a cache probe: there is no refresh token cached (never stored, never leaves this module). */
const NO_REFRESH = 'no_refresh_token';

async function obtainToken(ctx: ProviderContext, cfg: Cfg, appSecret: string, key: string): Promise<{ token: string; expiresAt: Date }> {
  const refreshKey = `${key}#refresh`;
  // runs under the access token's lock: one listener at a time renews
  const cached = await ctx.token(refreshKey, () => Promise.reject(new AdapterError('retryable', NO_REFRESH, 'no refresh token')), { marginMs: 60_000 })
    .catch((err: unknown) => {
      if (err instanceof AdapterError && err.errorClass === NO_REFRESH) return null;
      throw err;
    });
  let grant: Grant | null = null;
  if (cached) {
    grant = await tokenCall(ctx, cfg, appSecret, { grant_type: 'refresh_token', refresh_token: cached }, {}).catch(async (err: unknown) => {
      // a refused refresh token is dropped and the password used; the platform being down is worth a retry as is
      if (err instanceof AdapterError && err.outcome === 'permanent') {
        await ctx.forgetToken(refreshKey, cached);
        return null;
      }
      throw err;
    });
  }
  if (!grant) {
    const [password, salt] = await Promise.all([ctx.secret(cfg.passwordName), ctx.secret(cfg.saltName)]);
    grant = await tokenCall(ctx, cfg, appSecret, { grant_type: 'password' }, { username: cfg.username, password: baiwangPasswordHash(password, salt) });
  }
  if (grant.refresh && grant.refresh !== cached) {
    if (cached) await ctx.forgetToken(refreshKey, cached);
    const g = grant;
    await ctx.token(refreshKey, () => Promise.resolve({ token: g.refresh!, expiresAt: g.refreshExpiresAt }), { marginMs: 60_000 });
  }
  return { token: grant.token, expiresAt: grant.expiresAt };
}

/** Tokens the gateway refused, by endpoint: classify() has no context, so the next buildRequest forgets them. */
const refusedTokens = new Map<string, { key: string; token: string }>();
/** The token each in-flight request carries (request_id → key and token), bounded like Nuonuo's. */
const tokenOf = new Map<string, { key: string; token: string }>();
const TOKEN_OF_MAX = 1024;

function rememberToken(requestId: string, key: string, token: string): void {
  tokenOf.delete(requestId);
  tokenOf.set(requestId, { key, token });
  while (tokenOf.size > TOKEN_OF_MAX) {
    const oldest = tokenOf.keys().next().value;
    if (oldest === undefined) break;
    tokenOf.delete(oldest);
  }
}

// ---------------------------------------------------------------------------
// Requests: the write-back's payloads → Baiwang's bodies
// ---------------------------------------------------------------------------

const cents = (v: unknown): number => Math.round(Number(v) * 100);
const money = (c: number): string => (c / 100).toFixed(2);
const text = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);

/** requestBillingNew's {"order": …} → baiwang.output.invoice.issue's {taxNo, data}. */
export function issueBody(order: Obj, taxNo: string | null): Obj {
  const details = Array.isArray(order.invoiceDetail) ? (order.invoiceDetail as Obj[]) : [];
  const sum = (k: string) => money(details.reduce((s, d) => s + cents(d[k]), 0));
  const joined = (...parts: unknown[]) => text(parts.filter((p) => typeof p === 'string' && p !== '').join(' '));
  return {
    taxNo: taxNo ?? order.salerTaxNum,
    data: {
      serialNo: order.orderNo,
      invoiceType: '0',
      invoiceTypeCode: order.invoiceLine === 'bs' ? '01' : '02',
      // the write-back's lines carry tax-inclusive prices (withTaxFlag 1)
      priceTaxMark: '1',
      buyerName: order.buyerName,
      buyerTaxNo: text(order.buyerTaxNum),
      buyerAddressPhone: joined(order.buyerAddress, order.buyerTel),
      buyerBankAccount: text(order.buyerAccount),
      buyerEmail: text(order.email),
      sellerAddressPhone: joined(order.salerAddress, order.salerTel),
      sellerBankAccount: text(order.salerAccount),
      drawer: order.clerk,
      remarks: text(order.remark),
      invoiceTotalPrice: sum('taxExcludedAmount'),
      invoiceTotalTax: sum('tax'),
      invoiceTotalPriceTax: sum('taxIncludedAmount'),
      invoiceDetailsList: details.map((d, i) => ({
        goodsLineNo: i + 1,
        invoiceLineNature: d.invoiceLineProperty ?? '0',
        goodsCode: d.goodsCode,
        goodsName: d.goodsName,
        goodsSpecification: text(d.specType),
        goodsUnit: text(d.unit),
        goodsQuantity: text(d.num),
        goodsPrice: text(d.price),
        goodsTaxRate: d.taxRate,
        goodsTotalPrice: d.taxExcludedAmount,
        goodsTotalTax: d.tax,
        goodsTotalPriceTax: d.taxIncludedAmount,
        preferentialMarkFlag: '0',
      })),
    },
  };
}

/** saveInvoiceRedConfirm's payload → baiwang.output.redinvoice.add's flat body (7.0). */
export function redAddBody(p: Obj, taxNo: string | null): Obj {
  const detail = Array.isArray(p.detail) ? (p.detail as Obj[]) : null;
  return {
    taxNo: taxNo ?? p.sellerTaxNo,
    redConfirmSerialNo: p.billId,
    entryIdentity: p.applySource === '1' ? '02' : '01',
    originalInvoiceNo: p.blueElecInvoiceNumber,
    invoiceTypeCode: p.blueInvoiceLine === 'bs' ? '01' : '02',
    redInvoiceLabel: RED_LABEL[String(p.redReason)] ?? String(p.redReason),
    sellerTaxNo: p.sellerTaxNo,
    sellerName: p.sellerName,
    buyerTaxNo: p.buyerTaxNo,
    buyerName: p.buyerName,
    autoIssueSwitch: 'Y',
    ...(detail ? {
      redInvoiceDetails: detail.map((d) => ({
        originalInvoiceDetailNo: d.blueDetailIndex, goodsCode: d.goodsCode, goodsName: d.goodsName, goodsTaxRate: d.taxRate,
        goodsQuantity: d.num, goodsPrice: d.taxExcludedPrice, goodsTotalPrice: d.taxExcludedAmount, goodsTotalTax: d.taxAmount,
      })),
    } : {}),
  };
}

/** The serial a query asks about: the write-back asks by serialNos or orderNos, which are one value on Baiwang. */
function serialOf(p: Obj): unknown {
  const list = (Array.isArray(p.serialNos) ? p.serialNos : Array.isArray(p.orderNos) ? p.orderNos : []) as unknown[];
  return list[0];
}

export function bodyFor(msg: ClaimedMessage, taxNo: string | null): Obj {
  const p = (msg.payload ?? {}) as Obj;
  switch (msg.operation) {
    case 'tax.issue': {
      const order = (p.order ?? {}) as Obj;
      // the orderNo is the one SQL stored on the invoice: never recomputed here
      if (typeof order.orderNo !== 'string' || order.orderNo === '') throw new AdapterError('permanent', 'no_order_no', 'the tax.issue payload has no order.orderNo (the serialNo)');
      return issueBody(order, taxNo);
    }
    case 'tax.query': {
      const serialNo = serialOf(p);
      if (typeof serialNo !== 'string' || serialNo === '') throw new AdapterError('permanent', 'no_serial_no', 'the tax.query payload names no serial no.');
      return { taxNo, data: { serialNo } };
    }
    case 'tax.red_confirm':
      return redAddBody(p, taxNo);
    case 'tax.red_query':
      return { taxNo, redConfirmSerialNo: p.billId, redConfirmUuid: p.billUuid, redConfirmNo: p.billNo };
    case 'tax.red_operate':
      return { taxNo, redConfirmUuid: p.billUuid, redConfirmSerialNo: p.billId, confirmType: p.confirmType };
    case 'tax.red_list':
      return { taxNo, ...p };
    case 'tax.reinvoice':
      throw new AdapterError('permanent', 'unsupported', 'Baiwang has no signing retry (reInvoice is Nuonuo\'s)');
    default:
      throw new AdapterError('permanent', 'unknown_operation', `the baiwang adapter has no method for operation ${msg.operation}`);
  }
}

async function gatewayRequest(msg: ClaimedMessage, ctx: ProviderContext, cfg: Cfg): Promise<OutgoingRequest> {
  const m = METHODS[msg.operation];
  // refused before any token is used: a configuration mistake never spends a token call
  const body = compactJson(bodyFor(msg, cfg.taxNo));
  if (!m) throw new AdapterError('permanent', 'unknown_operation', `the baiwang adapter has no method for operation ${msg.operation}`);
  const appSecret = await ctx.secret(cfg.appSecretName);
  const key = `${cfg.appKey}:${cfg.username}`;
  const refused = refusedTokens.get(msg.endpoint);
  if (refused) {
    refusedTokens.delete(msg.endpoint);
    await ctx.forgetToken(refused.key, refused.token);
  }
  const token = await ctx.token(key, () => obtainToken(ctx, cfg, appSecret, key), { marginMs: TOKEN_MARGIN_MS });
  rememberToken(msg.request_id, key, token);
  const params: Record<string, string> = {
    method: m.method, version: m.version, appKey: cfg.appKey, format: 'json', timestamp: String(Date.now()),
    token, type: 'sync', requestId: randomUUID(),
    ...(m.version === '7.0' ? { signType: 'MD5', encryptType: 'NONE', encryptScope: '00' } : {}),
  };
  const url = new URL(msg.base_url);
  url.search = new URLSearchParams({ ...params, sign: baiwangSign(appSecret, params, body) }).toString();
  // the exact string signed is the exact string sent
  return { method: 'POST', url: url.toString(), headers: { 'content-type': 'application/json; charset=utf-8' }, body, secrets: [appSecret, token] };
}

// ---------------------------------------------------------------------------
// Answers: Baiwang's envelopes → the write-back shape
// ---------------------------------------------------------------------------

/** YYYYMMDDHHmmss in China time (UTC+8, no DST) → epoch ms. */
export function chinaTimeMs(s: unknown): number | null {
  const m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})$/.exec(String(s ?? ''));
  if (!m) return null;
  const [, y, mo, d, h, mi, se] = m.map(Number) as [number, number, number, number, number, number, number];
  return Date.UTC(y, mo - 1, d, h - 8, mi, se);
}

function queryResult(e: Obj): Obj {
  const status = STATUS[String(e.invoiceStatus ?? '')] ?? '20';
  const no = String(e.invoiceNo ?? '');
  return {
    serialNo: e.serialNo, orderNo: e.serialNo, status,
    statusMsg: String(e.statusMessage ?? ''),
    failCause: status === '22' ? String(e.errorMessage ?? 'Baiwang failed the invoice (no reason given)') : '',
    // the code the ERP sees for a refusal: the platform's, prefixed with its name
    errorCode: status === '22' ? `baiwang_${String(e.errorCode ?? 'issue_failed')}` : undefined,
    invoiceNo: no, allElectronicInvoiceNumber: no, invoiceCode: '',
    invoiceTime: chinaTimeMs(e.invoiceDate),
    pdfUrl: String(e.pdfUrl ?? ''), ofdUrl: String(e.ofdUrl ?? ''), xmlUrl: String(e.xmlUrl ?? ''),
    exTaxAmount: e.invoiceTotalPrice, taxAmount: e.invoiceTotalTax, orderAmount: e.invoiceTotalPriceTax,
    payerTaxNo: e.buyerTaxNo, oldEleInvoiceNumber: e.originalInvoiceNo ?? '',
  };
}

function formResult(f: Obj): Obj {
  return {
    billId: f.redConfirmSerialNo, billNo: f.redConfirmNo, billUuid: f.redConfirmUuid, billStatus: f.confirmState,
    openStatus: f.redInvoiceNo ? '1' : '0', redInvoiceNumber: f.redInvoiceNo ?? '', invoiceSerialNum: f.redInvoiceSerialNo ?? '',
    blueElecInvoiceNumber: f.originalInvoiceNo,
  };
}

/** A refusal in the contract's terms: the code the ERP sees, a sentence a clerk can read, the platform's answer kept. */
function refusal(code: string, message: string, parsed: unknown, errorClass = `baiwang_${code}`): Verdict {
  return { outcome: 'permanent', errorClass, message: `${message} (Baiwang ${code})`, response: { code: `baiwang_${code}`, describe: message, platform_answer: parsed } };
}

function classifySuccess(msg: ClaimedMessage, r: unknown, parsed: Obj): Verdict {
  const p = (msg.payload ?? {}) as Obj;
  switch (msg.operation) {
    case 'tax.issue': {
      const serial = String(((p.order ?? {}) as Obj).orderNo ?? '');
      const res = (r ?? {}) as Obj;
      const failed = (Array.isArray(res.fail) ? (res.fail as Obj[]) : []).find((f) => f.serialNo === undefined || f.serialNo === serial);
      if (failed && String(failed.errorCode) === BAIWANG_DUPLICATE_SERIAL) return duplicateIssue(serial, parsed);
      if (failed) return refusal(String(failed.errorCode ?? 'issue_failed'), String(failed.errorMessage ?? 'Baiwang refused the invoice'), parsed);
      const ok = (Array.isArray(res.success) ? (res.success as Obj[]) : []).find((s) => s.serialNo === serial);
      if (!ok) return { outcome: 'retryable', errorClass: 'baiwang_garbled', message: `the issue answer names neither success nor failure for serialNo ${serial}`, response: parsed };
      return { outcome: 'ok', response: { code: WB_OK, describe: '开票成功', result: { invoiceSerialNum: serial, invoiceNo: ok.invoiceNo ?? '' }, platform_answer: parsed } };
    }
    case 'tax.query': {
      const list = (Array.isArray(r) ? r : r ? [r] : []) as Obj[];
      if (list.length === 0) return { outcome: 'ok', response: { code: WB_NOT_FOUND, describe: 'no invoice under this serial no. yet', result: null, platform_answer: parsed } };
      return { outcome: 'ok', response: { code: WB_OK, describe: '查询成功', result: list.map(queryResult), platform_answer: parsed } };
    }
    case 'tax.red_confirm':
      return { outcome: 'ok', response: { code: WB_OK, describe: '红字确认单提交成功', result: p.billId, form: formResult((r ?? {}) as Obj), platform_answer: parsed } };
    case 'tax.red_query': {
      const list = (Array.isArray(r) ? r : r ? [r] : []) as Obj[];
      return { outcome: 'ok', response: { code: WB_OK, describe: '查询成功', result: { total: list.length, list: list.map(formResult) }, platform_answer: parsed } };
    }
    default:
      return { outcome: 'ok', response: { code: WB_OK, result: r, platform_answer: parsed } };
  }
}

function duplicateIssue(serial: string, parsed: unknown): Verdict {
  // already submitted (a retry after a timeout): not an error; the write-back looks it up by this serial
  return { outcome: 'ok', response: { code: WB_OK, duplicate: true, describe: 'already submitted: looked up by its serial no.', result: { invoiceSerialNum: serial }, platform_answer: parsed } };
}

function classifyGateway(answer: HttpAnswer, msg: ClaimedMessage): Verdict {
  const carried = tokenOf.get(msg.request_id);
  tokenOf.delete(msg.request_id);
  if (answer.status < 200 || answer.status >= 300) return classifyHttpFailure(answer);
  const parsed = parseJsonOrText(answer.body);
  if (typeof parsed !== 'object' || parsed === null) {
    return { outcome: 'retryable', errorClass: 'baiwang_garbled', message: `the gateway answered something that is not JSON: ${answer.body.slice(0, 200)}`, response: parsed };
  }
  const env = parsed as Obj;
  if (env.success === true) return classifySuccess(msg, env.response, env);
  const e = (env.errorResponse ?? {}) as Obj;
  const code = String(e.code ?? '');
  const why = [e.message, e.subMessage].filter((x) => typeof x === 'string' && x !== '').join(': ') || 'no message';
  if (code === BAIWANG_TOKEN_INVALID || code === BAIWANG_TOKEN_EXPIRED) {
    if (carried) refusedTokens.set(msg.endpoint, carried);
    return { outcome: 'retryable', errorClass: 'token_refused', message: `Baiwang refused the token (${code} ${why}); a new one is obtained on the next attempt`, response: parsed };
  }
  if (code === BAIWANG_SIGN_WRONG) return refusal(code, `Baiwang refused the request's signature (${why}): check the endpoint's app key and app secret`, parsed, 'sign_mismatch');
  if (code === BAIWANG_DUPLICATE_SERIAL && msg.operation === 'tax.issue') return duplicateIssue(String((((msg.payload ?? {}) as Obj).order as Obj | undefined)?.orderNo ?? ''), parsed);
  if (code === BAIWANG_DUPLICATE_FORM && msg.operation === 'tax.red_confirm') {
    // the form exists (an earlier attempt got through): read it back
    return { outcome: 'ok', response: { code: WB_OK, duplicate: true, describe: 'red-confirmation form already submitted', result: ((msg.payload ?? {}) as Obj).billId, platform_answer: parsed } };
  }
  if (code === BAIWANG_NOT_FOUND && msg.operation === 'tax.query') {
    return { outcome: 'ok', response: { code: WB_NOT_FOUND, describe: 'no invoice under this serial no. yet', result: null, platform_answer: parsed } };
  }
  return refusal(code || 'unknown', why, parsed);
}

export const baiwangAdapter: ProviderAdapter = {
  name: 'baiwang',
  async buildRequest(msg, ctx) {
    if (msg.operation === 'tax.download_pdf' || msg.operation === 'tax.download_file') return downloadRequest(msg);
    return gatewayRequest(msg, ctx, configOf(msg));
  },
  classify(answer, msg) {
    return msg.operation === 'tax.download_pdf' || msg.operation === 'tax.download_file' ? classifyDownload(answer, msg) : classifyGateway(answer, msg);
  },
};
