/**
 * The console as a relying party of erp-cloud's own OpenID Provider: the
 * authorization code flow with PKCE (S256), state and nonce, the code
 * exchanged over the back channel with client_secret_basic, and the ID token
 * checked (RS256 signature against the provider's JWKS, iss, aud, exp, nonce)
 * with node:crypto alone — the console needs no OpenID client package.
 */
import { createHash, createPublicKey, randomBytes, verify, type JsonWebKey } from 'node:crypto';

export interface ProviderMetadata {
  issuer: string;
  authorization_endpoint: string;
  token_endpoint: string;
  jwks_uri: string;
  end_session_endpoint?: string;
}

export interface Client {
  issuer: string;
  clientId: string;
  clientSecret: string;
  redirectUri: string;
}

/** What the browser carries between the redirect to the provider and the callback (kept server-side, keyed by state). */
export interface PendingLogin {
  state: string;
  nonce: string;
  verifier: string;
  createdAt: number;
}

export interface SignedInUser {
  sub: string;
  login: string;
  name: string;
}

export class SignInError extends Error {}

const b64url = (b: Buffer) => b.toString('base64url');

/** The provider's metadata (discovery), fetched once and kept. */
export async function discover(issuer: string, signal?: AbortSignal): Promise<ProviderMetadata> {
  const res = await fetch(`${issuer}/.well-known/openid-configuration`, { signal: signal ?? AbortSignal.timeout(10_000) });
  if (!res.ok) throw new SignInError(`the OpenID Provider at ${issuer} answered discovery with HTTP ${res.status}`);
  const meta = (await res.json()) as ProviderMetadata;
  if (meta.issuer !== issuer) throw new SignInError(`the OpenID Provider calls itself ${meta.issuer}, not ${issuer}`);
  return meta;
}

/** A new login attempt and the provider URL to send the browser to. */
export function startLogin(meta: ProviderMetadata, client: Client): { pending: PendingLogin; url: string } {
  const pending: PendingLogin = {
    state: b64url(randomBytes(24)), nonce: b64url(randomBytes(24)), verifier: b64url(randomBytes(48)), createdAt: Date.now(),
  };
  const url = new URL(meta.authorization_endpoint);
  url.searchParams.set('client_id', client.clientId);
  url.searchParams.set('response_type', 'code');
  url.searchParams.set('scope', 'openid profile');
  url.searchParams.set('redirect_uri', client.redirectUri);
  url.searchParams.set('state', pending.state);
  url.searchParams.set('nonce', pending.nonce);
  url.searchParams.set('code_challenge', b64url(createHash('sha256').update(pending.verifier).digest()));
  url.searchParams.set('code_challenge_method', 'S256');
  return { pending, url: url.toString() };
}

interface JwtHeader { alg: string; kid?: string }
interface Claims { iss: string; aud: string | string[]; exp: number; nonce?: string; sub: string; preferred_username?: string; name?: string }

/** Exchanges the code and returns the user the checked ID token names. */
export async function finishLogin(meta: ProviderMetadata, client: Client, pending: PendingLogin, code: string, now = Date.now()): Promise<SignedInUser> {
  const basic = Buffer.from(`${encodeURIComponent(client.clientId)}:${encodeURIComponent(client.clientSecret)}`).toString('base64');
  const res = await fetch(meta.token_endpoint, {
    method: 'POST',
    headers: { authorization: `Basic ${basic}`, 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
    body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: client.redirectUri, code_verifier: pending.verifier }),
    signal: AbortSignal.timeout(10_000),
  });
  const body = (await res.json().catch(() => ({}))) as { id_token?: string; error?: string; error_description?: string };
  if (!res.ok || !body.id_token) throw new SignInError(`the OpenID Provider refused the code: ${body.error ?? res.status} ${body.error_description ?? ''}`.trim());
  const [h, p, s] = body.id_token.split('.');
  if (!h || !p || !s) throw new SignInError('the ID token is not a JWT');
  const header = JSON.parse(Buffer.from(h, 'base64url').toString('utf8')) as JwtHeader;
  if (header.alg !== 'RS256') throw new SignInError(`the ID token is signed with ${header.alg}, not RS256`);
  const jwksRes = await fetch(meta.jwks_uri, { signal: AbortSignal.timeout(10_000) });
  const jwks = (await jwksRes.json()) as { keys: Array<JsonWebKey & { kid?: string }> };
  const jwk = jwks.keys.find((k) => k.kid === header.kid);
  if (!jwk) throw new SignInError(`the ID token's key ${header.kid} is not in the provider's JWKS`);
  const ok = verify('sha256', Buffer.from(`${h}.${p}`), createPublicKey({ key: jwk, format: 'jwk' }), Buffer.from(s, 'base64url'));
  if (!ok) throw new SignInError('the ID token\'s signature does not verify');
  const claims = JSON.parse(Buffer.from(p, 'base64url').toString('utf8')) as Claims;
  const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (claims.iss !== meta.issuer) throw new SignInError(`the ID token comes from ${claims.iss}, not ${meta.issuer}`);
  if (!aud.includes(client.clientId)) throw new SignInError('the ID token is for another client');
  if (!(claims.exp * 1000 > now)) throw new SignInError('the ID token has expired');
  if (claims.nonce !== pending.nonce) throw new SignInError('the ID token\'s nonce is not this sign-in\'s');
  if (!claims.preferred_username) throw new SignInError('the ID token names no login (preferred_username): ask for scope profile');
  return { sub: claims.sub, login: claims.preferred_username, name: claims.name ?? claims.preferred_username };
}
