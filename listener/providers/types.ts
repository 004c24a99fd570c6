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
}

export interface OutgoingRequest {
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  url: string;
  headers: Record<string, string>;
  body?: string;
  /** Literal values (tokens, keys) to blank out of anything that is logged. */
  secrets?: string[];
}

export interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** Errors are values at the edge: the adapter's verdict, never an exception. */
export type Verdict =
  | { outcome: 'ok'; response: unknown }
  | { outcome: 'retryable'; errorClass: string; message: string; retryAfterMs?: number; response?: unknown }
  | { outcome: 'permanent'; errorClass: string; message: string; response?: unknown };

/** What an adapter may ask of the listener while it builds a request. */
export interface ProviderContext {
  /** A secret's value by name (endpoint config names them): the environment, else System_Vault. */
  secret(name: string): Promise<string>;
}

export interface ProviderAdapter {
  readonly name: string;
  /** Put every secret value the request carries in `secrets`, so nothing logged can show it. */
  buildRequest(msg: ClaimedMessage, ctx: ProviderContext): OutgoingRequest | Promise<OutgoingRequest>;
  classify(answer: HttpAnswer, msg: ClaimedMessage): Verdict;
}
