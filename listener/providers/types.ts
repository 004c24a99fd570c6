/**
 * The provider adapter contract. An adapter maps an outbox row to one HTTP
 * request, and the HTTP answer to a verdict. It holds no retry policy (the
 * outbox owns retries) and no business rule (SQL handlers own write-back).
 */

/** A leased message as cloud.claim_messages returns it. */
export interface ClaimedMessage {
  request_id: string;
  endpoint: string;
  operation: string;
  payload: unknown;
  attempt: number;
  aggregate_type: string | null;
  aggregate_id: string | null;
  ordering_key: string | null;
  provider: string;
  base_url: string;
  timeout_ms: number;
  endpoint_config: Record<string, unknown>;
  locked_until: Date;
  /** Not before this time: a rate-limited message's slot (claims may run slightly ahead of the bucket). */
  send_at: Date;
  /** The endpoint's egress allowlist at the claim (cloud.endpoint.allow_hosts, allow_cidrs, allow_private). */
  allow_hosts: string[];
  allow_cidrs: string[];
  allow_private: boolean;
  /** Where URLs from the cloud's answers may go besides the base URL's origin (cloud.endpoint.download_hosts). */
  download_hosts?: string[];
}

export interface OutgoingRequest {
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  url: string;
  headers: Record<string, string>;
  body?: string;
  /** Literal values (tokens, keys) to blank out of anything that is logged. */
  secrets?: string[];
  /** The answer is binary (a PDF): cloud.log records its size and type, not its bytes. */
  binaryResponse?: boolean;
  /**
   * Refuse an answer longer than this while it downloads (permanent, error class
   * `response_too_large`), so one huge answer cannot exhaust the listener's memory.
   */
  maxResponseBytes?: number;
  /**
   * The URL came from a cloud's answer (a PDF to download): it may go only to the base
   * URL's origin and the endpoint's download hosts (cloud.endpoint.download_hosts).
   */
  download?: boolean;
}

export interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  /** The body as UTF-8 text. */
  body: string;
  /** The body's bytes, for binary answers. */
  raw: Buffer;
}

/**
 * What an adapter throws from buildRequest when it cannot build the request now
 * (its token call failed, the gateway lookup answered nonsense): the attempt is
 * recorded with this verdict and nothing is sent.
 */
export class AdapterError extends Error {
  constructor(
    readonly outcome: 'retryable' | 'permanent',
    readonly errorClass: string,
    message: string,
    readonly retryAfterMs?: number,
  ) {
    super(message);
  }
}

/** Errors are values at the edge: the adapter's verdict, never an exception. */
export type Verdict =
  | { outcome: 'ok'; response: unknown }
  | { outcome: 'retryable'; errorClass: string; message: string; retryAfterMs?: number; response?: unknown }
  | { outcome: 'permanent'; errorClass: string; message: string; response?: unknown };

/** An auxiliary call an adapter makes besides the attempt itself: a token, a gateway lookup, a file download. */
export interface AuxRequest {
  method: 'GET' | 'POST';
  url: string;
  headers?: Record<string, string>;
  body?: string;
  /** Default: the endpoint's timeout_ms. */
  timeoutMs?: number;
  /** The answer's body is refused (error code ETOOLARGE) beyond this many bytes. Default 1 MiB. */
  maxBytes?: number;
  /** The URL came from a cloud's answer: judged against the endpoint's download hosts (see OutgoingRequest). */
  download?: boolean;
}

export interface AuxAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
  text(): string;
}

/** What an adapter may ask of the listener while it builds a request. */
export interface ProviderContext {
  /** A secret's value by name (endpoint config names them): the environment, else System_Vault. */
  secret(name: string): Promise<string>;
  /**
   * One auxiliary HTTP call under the same endpoint's egress guard (host allowlist, address
   * ranges, checked inside the socket's DNS lookup) with no redirects followed. Network errors
   * and refusals throw (an EgressRefused has code 'EEGRESS'); HTTP statuses are returned.
   */
  fetch(req: AuxRequest): Promise<AuxAnswer>;
  /**
   * A token cached in cloud.provider_token for (this endpoint, key), shared by every listener.
   * `obtain` runs only when no token stays valid for `marginMs` (default 5 min), and at most
   * once at a time across all listeners (an advisory lock); its result is stored for the others.
   */
  token(key: string, obtain: () => Promise<{ token: string; expiresAt: Date }>, opts?: { marginMs?: number }): Promise<string>;
  /** Forgets a cached token the cloud refused (only if it is still the cached value). */
  forgetToken(key: string, token: string): Promise<void>;
}

export interface ProviderAdapter {
  readonly name: string;
  /** Put every secret value the request carries in `secrets`, so nothing logged can show it. */
  buildRequest(msg: ClaimedMessage, ctx: ProviderContext): OutgoingRequest | Promise<OutgoingRequest>;
  classify(answer: HttpAnswer, msg: ClaimedMessage): Verdict;
}
