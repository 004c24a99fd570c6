/**
 * No credential is written into the source: secrets belong in the vault or
 * the environment (README "System_Vault"). Scans every file git tracks (plus
 * new, not-ignored ones, so a secret is caught before its first commit),
 * except test fixtures (test/, listener/sim/), for secret-looking literals.
 * A line that must keep such a literal says so with `secret-scan: allow`.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

export interface Finding {
  file: string;
  line: number;
  rule: string;
  text: string;
}

/** Names that announce a credential: api_key, appSecret, client-secret, password, token, accessKey, … */
const SECRET_NAME = String.raw`[A-Za-z0-9_]*(?:api[_-]?key|app[_-]?secret|client[_-]?secret|secret|passw(?:or)?d|pwd|token|access[_-]?key|private[_-]?key|(?:master|vault)[_-]?key)[A-Za-z0-9_]*`;

/** An obvious stand-in, not a credential: xxxx…, changeme, <your-key>, example. */
const PLACEHOLDER = /(.)\1{5,}|x{4,}|changeme|example|placeholder|dummy|your[_-]/i;

/** An identifier written as a string: 'nuonuo_app_secret', 'ERP_CLOUD_VAULT_KEY' (a name, not a value). */
const NAME_LIKE = /^(?:[a-z]+(?:[_-][a-z]+)+|[A-Z]+(?:_[A-Z]+)+)$/;

/** Rules whose first capture group is the literal (a placeholder or a name is not a finding). */
const RULES: Array<{ rule: string; re: RegExp }> = [
  // appSecret = "…", "app_secret": "…", password: '…' (not ==, ===, =>)
  {
    rule: 'secret assigned a literal',
    re: new RegExp(String.raw`(?<![A-Za-z0-9])${SECRET_NAME}['"]?\s*(?::|=(?![=>]))\s*['"\x60]([A-Za-z0-9+/=_\-]{12,})['"\x60]`, 'i'),
  },
  // APP_SECRET=abc… in .env / shell / YAML, unquoted (a path such as /run/secrets/x is not a value)
  {
    rule: 'secret assigned in an env or YAML line',
    re: new RegExp(String.raw`^\s*(?:export\s+)?${SECRET_NAME}\s*[=:]\s*([A-Za-z0-9+=_\-][A-Za-z0-9+/=_\-]{15,})\s*$`, 'i'),
  },
  // well-known credential formats, wherever they stand
  { rule: 'private key block', re: /-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----/ },
  { rule: 'AWS access key id', re: /\b(?:AKIA|ASIA)[0-9A-Z]{16}\b/ },
  { rule: 'GitHub token', re: /\bgh[pousr]_[A-Za-z0-9]{36,}\b/ },
  { rule: 'Slack token', re: /\bxox[abprs]-[A-Za-z0-9-]{10,}/ },
];

const NAME_ON_LINE = new RegExp(SECRET_NAME, 'i');
const QUOTED = /['"`]([A-Za-z0-9+/=_\-.]{20,})['"`]/g;

/** Shannon entropy in bits per character. */
function entropy(s: string): number {
  const counts = new Map<string, number>();
  for (const ch of s) counts.set(ch, (counts.get(ch) ?? 0) + 1);
  let h = 0;
  for (const n of counts.values()) h -= (n / s.length) * Math.log2(n / s.length);
  return h;
}

/** A random-looking literal: long, mixed letters and digits, high entropy; not a dotted name or a placeholder. */
function looksRandom(s: string): boolean {
  if (/^[a-z0-9_.-]+$/.test(s) && s.includes('.')) return false; // nuonuo.app_secret, a.b.c
  if (PLACEHOLDER.test(s)) return false;
  return /[A-Za-z]/.test(s) && /[0-9]/.test(s) && entropy(s) >= 3.5;
}

/** The findings in one file's text. */
export function scanText(file: string, text: string): Finding[] {
  const out: Finding[] = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (/secret-scan:\s*allow/.test(line)) return;
    const hit = (rule: string) => out.push({ file, line: i + 1, rule, text: line.trim().slice(0, 160) });
    for (const { rule, re } of RULES) {
      const m = re.exec(line);
      if (m && !(m[1] && (PLACEHOLDER.test(m[1]) || NAME_LIKE.test(m[1])))) return hit(rule);
    }
    // a random-looking literal on the same line as a credential's name (headers: { 'X-Api-Key': '…' })
    if (NAME_ON_LINE.test(line.replace(QUOTED, '""'))) { // the name outside the literal (base64 can spell 'pwd')
      for (const m of line.matchAll(QUOTED)) if (looksRandom(m[1]!)) return hit('high-entropy literal next to a secret name');
    }
  });
  return out;
}

const EXCLUDED = [/^test\//, /^listener\/sim\//, /^node_modules\//, /^dist\//, /^\.pg\//, /(^|\/)package-lock\.json$/];

/** The repository's source files: git's tracked and new not-ignored files, or a walk of the tree without git. */
export function sourceFiles(root: string): string[] {
  let files: string[];
  try {
    files = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: root, maxBuffer: 64 << 20 })
      .toString()
      .split('\0')
      .filter(Boolean);
  } catch {
    files = [];
    const walk = (dir: string) => {
      for (const e of readdirSync(path.join(root, dir), { withFileTypes: true })) {
        const rel = dir ? `${dir}/${e.name}` : e.name;
        if (e.name === '.git' || EXCLUDED.some((x) => x.test(`${rel}/`))) continue;
        if (e.isDirectory()) walk(rel);
        else if (e.isFile()) files.push(rel);
      }
    };
    walk('');
  }
  return [...new Set(files)].filter((f) => !EXCLUDED.some((x) => x.test(f))).sort();
}

export function scanRepository(root: string): Finding[] {
  const out: Finding[] = [];
  for (const file of sourceFiles(root)) {
    const full = path.join(root, file);
    let buf: Buffer;
    try {
      if (!statSync(full).isFile() || statSync(full).size > 2 << 20) continue;
      buf = readFileSync(full);
    } catch {
      continue; // listed by git but deleted in the working tree
    }
    if (buf.includes(0)) continue; // binary
    out.push(...scanText(file, buf.toString('utf8')));
  }
  return out;
}

describe('secrets in source', () => {
  it('no tracked source file assigns a secret-looking literal', () => {
    const files = sourceFiles(process.cwd());
    expect(files).toContain('listener/kernel/vault.ts'); // the scan really sees the tree
    expect(files.some((f) => f.startsWith('test/'))).toBe(false);
    const findings = scanRepository(process.cwd());
    expect(findings.map((f) => `${f.file}:${f.line}: ${f.rule}: ${f.text}`)).toEqual([]);
  });

  it('the scanner catches a hard-coded app secret (so the check above can fail)', () => {
    const sample = [
      'import x from "y";',
      'const appSecret = "SDDED2523BED4643abcd"',
      'const config = { "app_secret": "SDDED2523BED4643abcd" };',
      'headers: { "X-Api-Key": "q8Zt3LwP0vR7nX2kM5yB1cD9" }',
      'NUONUO_APP_SECRET=SDDED2523BED4643abcd',
      'password: "hunter2hunter2"',
      '-----BEGIN RSA PRIVATE KEY-----',
      'const awsKey = AKIAIOSFODNN7EXAMPLF;',
    ].join('\n');
    const found = scanText('sample.ts', sample);
    expect(found.map((f) => f.line)).toEqual([2, 3, 4, 5, 6, 7, 8]);
    expect(found[0]).toMatchObject({ file: 'sample.ts', line: 2, rule: 'secret assigned a literal' });
  });

  it('names, lookups, comparisons and placeholders are not findings', () => {
    const sample = [
      "const secretName = 'nuonuo.app_secret';",
      "const token = await resolver.resolve('nuonuo.access_token');",
      "if (token === 'abcdefghijklmnop') return;",
      "const password = process.env.ERP_CLOUD_DB_PASSWORD;",
      "const apiKey = 'xxxxxxxxxxxxxxxxxxxx';",
      "vault_key: your-vault-key-goes-here",
      "const variable = env.ERP_CLOUD_VAULT_KEY_FILE ? 'ERP_CLOUD_VAULT_KEY_FILE' : 'ERP_CLOUD_VAULT_KEY';",
      "const secret = { name: 'nuonuo_app_secret' };",
      "ERP_CLOUD_VAULT_KEY_FILE=/run/secrets/vault_key",
      "const fixture = { appSecret: 'SDDED2523BED4643abcd' }; // secret-scan: allow",
    ].join('\n');
    expect(scanText('sample.ts', sample)).toEqual([]);
  });
});
