/**
 * Downloading an invoice's file (PDF, OFD or XML) from a URL the platform gave:
 * shared by the e-invoicing adapters. The URL is the cloud's, so the request is
 * marked `download` (the egress guard judges it against the base URL's origin and
 * the endpoint's download hosts, checks its addresses, follows no redirect) and
 * capped while it downloads (tax.config max_pdf_bytes, carried in the payload).
 */
import { AdapterError, type ClaimedMessage, type HttpAnswer, type OutgoingRequest, type Verdict } from './types.js';
import { classifyHttpFailure } from './http-semantics.js';

/** The formats of a 数电 invoice: the PDF, the OFD (the legal original, a zip container) and the XML data file. */
export type InvoiceFileFormat = 'pdf' | 'ofd' | 'xml';

const FORMATS: Record<InvoiceFileFormat, { accept: string; contentType: string; looksRight: (b: Buffer) => boolean; what: string }> = {
  pdf: { accept: 'application/pdf', contentType: 'application/pdf', looksRight: (b) => b.subarray(0, 5).toString('latin1') === '%PDF-', what: 'a PDF' },
  ofd: { accept: 'application/ofd, application/zip', contentType: 'application/ofd', looksRight: (b) => b.subarray(0, 4).toString('latin1') === 'PK\u0003\u0004', what: 'an OFD (zip) file' },
  xml: { accept: 'application/xml, text/xml', contentType: 'application/xml', looksRight: (b) => /^(\uFEFF)?\s*</.test(b.subarray(0, 64).toString('utf8')), what: 'XML' },
};

/** The payload's format (default pdf; tax.download_pdf payloads carry none). */
export function formatOf(msg: ClaimedMessage): InvoiceFileFormat {
  const f = (msg.payload as { format?: unknown }).format;
  if (f === undefined || f === null || f === '') return 'pdf';
  if (f === 'pdf' || f === 'ofd' || f === 'xml') return f;
  throw new AdapterError('permanent', 'unknown_format', `the download asks for format ${JSON.stringify(f)}; pdf, ofd or xml`);
}

/** tax.config max_pdf_bytes, carried in the download's payload. */
export function fileCap(msg: ClaimedMessage): number {
  return Number((msg.payload as { max_bytes?: unknown }).max_bytes ?? 5 * 1024 * 1024);
}

export function downloadRequest(msg: ClaimedMessage): OutgoingRequest {
  const url = (msg.payload as { url?: unknown }).url;
  const format = formatOf(msg);
  if (typeof url !== 'string' || url === '') throw new AdapterError('permanent', `no_${format}_url`, 'the download has no URL');
  // the cap is applied while the file downloads, so a huge answer never sits in memory whole
  return { method: 'GET', url, headers: { accept: FORMATS[format].accept }, binaryResponse: true, maxResponseBytes: fileCap(msg), download: true };
}

export function classifyDownload(answer: HttpAnswer, msg: ClaimedMessage): Verdict {
  const format = formatOf(msg);
  const f = FORMATS[format];
  if (answer.status >= 300 && answer.status < 400) {
    return { outcome: 'permanent', errorClass: 'redirect_refused', message: `HTTP ${answer.status}: the ${format.toUpperCase()} URL redirects to ${String(answer.headers.location ?? '?')}; redirects are never followed` };
  }
  if (answer.status < 200 || answer.status >= 300) return classifyHttpFailure({ ...answer, body: answer.body.slice(0, 300) });
  const max = fileCap(msg);
  if (answer.raw.length > max) return { outcome: 'permanent', errorClass: `${format}_too_large`, message: `the ${format.toUpperCase()} has ${answer.raw.length} bytes, over the ${max}-byte cap` };
  if (!f.looksRight(answer.raw)) {
    return { outcome: 'permanent', errorClass: `not_${format}`, message: `the answer is not ${f.what} (content-type ${String(answer.headers['content-type'] ?? '?')}, starts ${JSON.stringify(answer.raw.subarray(0, 8).toString('latin1'))})` };
  }
  return { outcome: 'ok', response: { content_base64: answer.raw.toString('base64'), byte_size: answer.raw.length, content_type: f.contentType } };
}
