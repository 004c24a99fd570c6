/**
 * A built-in relying party, for `erp-cloud sso demo-rp`, make demo and the
 * tests: a stand-in for the procurement platform written with openid-client,
 * and a browser stand-in (an HTTP client that follows redirects and keeps
 * cookies in a tough-cookie jar).
 *
 * The RP serves GET /login (its login-initiation URL: a jump lands here with
 * ?iss=…), which starts an authorization request with PKCE (S256), state and
 * nonce, and GET /callback, which exchanges the code, validates the ID token
 * (signature against the JWKS, issuer, audience, nonce) and calls userinfo.
 * The callback answers JSON: { ok, claims, userinfo, id_token } or
 * { error, error_description }. GET /logout starts RP-initiated logout.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as oidc from 'openid-client';
import { CookieJar } from 'tough-cookie';

export interface BrowserResponse {
  url: string;
  status: number;
  body: string;
  location: string | null;
}

function hiddenInputs(html: string): Record<string, string> {
  const form: Record<string, string> = {};
  for (const m of html.matchAll(/<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"/g)) form[m[1]!] = m[2]!;
  return form;
}

/** A browser stand-in: follows redirects (at most 20) and keeps cookies. */
export class Browser {
  readonly jar = new CookieJar();

  /** One request, no redirect following. */
  async request(url: string, init: { method?: string; form?: Record<string, string> } = {}): Promise<BrowserResponse> {
    const headers: Record<string, string> = { cookie: await this.jar.getCookieString(url) };
    let body: string | undefined;
    if (init.form) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      body = new URLSearchParams(init.form).toString();
    }
    const res = await fetch(url, { method: init.method ?? 'GET', headers, body, redirect: 'manual' });
    for (const c of res.headers.getSetCookie()) await this.jar.setCookie(c, url);
    const location = res.headers.get('location');
    return { url, status: res.status, body: await res.text(), location: location ? new URL(location, url).toString() : null };
  }

  /**
   * GET url and follow redirects; stops before requesting a URL that starts
   * with `stopAt` (e.g. a redirect URI no server listens on) and returns it as
   * `location`.
   */
  async get(url: string, opts: { stopAt?: string } = {}): Promise<BrowserResponse> {
    let next = url;
    let form: Record<string, string> | undefined;
    for (let hop = 0; hop < 20; hop++) {
      if (opts.stopAt && next.startsWith(opts.stopAt)) return { url: next, status: 0, body: '', location: next };
      const res = await this.request(next, form ? { method: 'POST', form } : {});
      form = undefined;
      if (res.status >= 300 && res.status < 400 && res.location) {
        next = res.location;
        continue;
      }
      // a page that submits itself on load (oidc-provider ends the previous
      // user's session this way when another user signs in): do what a browser's script would
      const auto = res.status === 200 && res.body.includes('document.forms[0].submit()') ? /<form method="post" action="([^"]+)"/.exec(res.body) : null;
      if (!auto) return res;
      form = hiddenInputs(res.body);
      next = new URL(auto[1]!.replace(/&amp;/g, '&'), res.url).toString();
    }
    throw new Error(`more than 20 redirects from ${url}`);
  }

  /** Submits the provider's logout confirmation form (as a person clicking "Yes, sign me out"). */
  async confirmLogout(page: BrowserResponse): Promise<BrowserResponse> {
    const action = /<form[^>]*id="op.logoutForm"[^>]*action="([^"]+)"/.exec(page.body)?.[1] ?? /<form[^>]*action="([^"]+)"[^>]*id="op.logoutForm"/.exec(page.body)?.[1];
    if (!action) throw new Error('no logout form on the page');
    const form: Record<string, string> = { ...hiddenInputs(page.body), logout: 'yes' };
    let res = await this.request(new URL(action, page.url).toString(), { method: 'POST', form });
    for (let hop = 0; hop < 10 && res.status >= 300 && res.status < 400 && res.location; hop++) res = await this.request(res.location);
    return res;
  }
}

export interface RpOptions {
  issuer: string;
  clientId: string;
  clientSecret: string;
  scope?: string;
  host?: string;
  port?: number;
}

export interface RpResult {
  ok?: true;
  claims?: Record<string, unknown>;
  userinfo?: Record<string, unknown>;
  id_token?: string;
  error?: string;
  error_description?: string;
}

export interface DemoRp {
  url: string;
  loginUrl: string;
  callbackUrl: string;
  logoutUrl: string;
  config: oidc.Configuration;
  close(): Promise<void>;
}

/** Discovery with the RP's settings: ID-token signatures checked against the JWKS; http allowed only for loopback issuers. */
export async function discoverProvider(issuer: string, clientId: string, clientSecret: string): Promise<oidc.Configuration> {
  const loopback = /^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(issuer);
  const config = await oidc.discovery(new URL(issuer), clientId, clientSecret, oidc.ClientSecretBasic(clientSecret),
    loopback ? { execute: [oidc.allowInsecureRequests] } : undefined);
  oidc.enableNonRepudiationChecks(config);
  return config;
}

export async function startDemoRp(opts: RpOptions): Promise<DemoRp> {
  const config = await discoverProvider(opts.issuer, opts.clientId, opts.clientSecret);
  const scope = opts.scope ?? 'openid profile email erp';
  const pending = new Map<string, { verifier: string; nonce: string }>();
  let base = '';
  let lastIdToken: string | undefined;

  const json = (res: http.ServerResponse, status: number, body: unknown) => {
    res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  };

  const server = http.createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', base);
      if (url.pathname === '/login') {
        // third-party-initiated login: only from our issuer
        const iss = url.searchParams.get('iss');
        if (iss !== null && iss !== opts.issuer) return json(res, 400, { error: 'unknown issuer' });
        const verifier = oidc.randomPKCECodeVerifier();
        const state = oidc.randomState();
        const nonce = oidc.randomNonce();
        pending.set(state, { verifier, nonce });
        const authUrl = oidc.buildAuthorizationUrl(config, {
          redirect_uri: `${base}/callback`, scope, state, nonce,
          code_challenge: await oidc.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256',
        });
        res.writeHead(302, { location: authUrl.toString() }).end();
        return;
      }
      if (url.pathname === '/callback') {
        const state = url.searchParams.get('state') ?? '';
        const p = pending.get(state);
        pending.delete(state);
        if (!p) return json(res, 400, { error: 'unknown state' });
        try {
          const tokens = await oidc.authorizationCodeGrant(config, url, { pkceCodeVerifier: p.verifier, expectedState: state, expectedNonce: p.nonce });
          const claims = tokens.claims()!;
          const userinfo = await oidc.fetchUserInfo(config, tokens.access_token, claims.sub);
          lastIdToken = tokens.id_token;
          return json(res, 200, { ok: true, claims, userinfo, id_token: tokens.id_token } satisfies RpResult);
        } catch (err) {
          const e = err as { error?: string; error_description?: string; message?: string };
          return json(res, 400, { error: e.error ?? 'rp_error', error_description: e.error_description ?? e.message } satisfies RpResult);
        }
      }
      if (url.pathname === '/logout') {
        const end = oidc.buildEndSessionUrl(config, {
          post_logout_redirect_uri: `${base}/logged-out`, ...(lastIdToken ? { id_token_hint: lastIdToken } : {}),
        });
        res.writeHead(302, { location: end.toString() }).end();
        return;
      }
      if (url.pathname === '/logged-out') return json(res, 200, { ok: true, logged_out: true });
      json(res, 404, { error: 'not found' });
    })().catch((err) => json(res, 500, { error: 'rp_error', error_description: String(err) }));
  });
  await new Promise<void>((resolve) => server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => resolve()));
  const { port } = server.address() as AddressInfo;
  base = `http://${opts.host ?? '127.0.0.1'}:${port}`;
  return {
    url: base,
    loginUrl: `${base}/login`,
    callbackUrl: `${base}/callback`,
    logoutUrl: `${base}/logout`,
    config,
    async close() {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

/** Follows a jump URL through the RP with a fresh browser; returns the RP's callback answer. */
export async function completeJump(jumpUrl: string, browser = new Browser()): Promise<RpResult & { status: number }> {
  const res = await browser.get(jumpUrl);
  try {
    return { status: res.status, ...(JSON.parse(res.body) as RpResult) };
  } catch {
    return { status: res.status, error: 'not_json', error_description: res.body.slice(0, 500) };
  }
}
