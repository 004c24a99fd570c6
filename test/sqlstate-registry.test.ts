/**
 * One registry of our SQLSTATEs (STYLE.md 7), kept in four places that must agree:
 * what the functions of the migrated database raise, the registry comment blocks in
 * the migration headers ("--   EC010  invalid rate limit or circuit setting"), the
 * SqlState map in listener/kernel/errors.ts, and the error tables of README.md
 * ("| EC010 | … |"). A code is added in all four at once (sql/README.md).
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, type TestDb } from './helpers/db.js';

/** Our codes: E, a letter for the area (C cloud and vault, I invoicing, S supplier collaboration, O single sign-on), three digits. */
const OURS = /^E[A-Z]\d{3}$/;

/** Registered codes the database never raises, and where each lives instead. */
const NEVER_RAISED: Record<string, string> = {
  ...Object.fromEntries(['ES010', 'ES011', 'ES012', 'ES013', 'ES014', 'ES015', 'ES016'].map((c) => [c, 'an ASN rejection reason, stored in scm.asn.reject_code'])),
  ES018: 'written by the listener into scm.asn_quarantine for a YonBIP event of a type not configured as an ASN (listener/inbound/yonbip-events.ts)',
  ...Object.fromEntries(['EO020', 'EO021', 'EO022', 'EO023', 'EO024'].map((c) => [c, 'a jump-ticket failure: sso.consume_jump_ticket / sso.open_jump_ticket audit it and return it, so the audit row is not rolled back'])),
};

/** Codes raised through a variable (`errcode = v_struct.errcode`), not a literal: the function that hands each over. */
const RAISED_THROUGH_A_VARIABLE: Record<string, string> = {
  EI020: 'tax.uscc_structure_problem',
  EI021: 'tax.uscc_structure_problem',
  EI022: 'tax.uscc_structure_problem',
};

/** PostgreSQL's own SQLSTATEs the functions raise by code; they are not ours to register. */
const STANDARD_RAISED: Record<string, string> = {
  '42501': 'insufficient_privilege: a supplier-portal user acting for another supplier, as RLS would refuse it',
  '23514': 'check_violation: cloud.tg_outbox__100_validate, the outbox invariants its CHECK constraints held before 0026, checked on UPDATE',
};

let db: TestDb;
beforeAll(async () => {
  db = await createTestDb('sqlstates');
});
afterAll(() => db.drop());

const sorted = (s: Iterable<string>) => [...new Set(s)].sort();
const minus = (a: Iterable<string>, b: Iterable<string>) => {
  const drop = new Set(b);
  return sorted([...a].filter((x) => !drop.has(x)));
};

/** The registry entries of the migration headers: "--   EC010  what it means", code to the migrations that register it. */
function sqlRegistry(): Map<string, string[]> {
  const registry = new Map<string, string[]>();
  const dir = 'sql/migrations';
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.sql')).sort()) {
    for (const line of readFileSync(path.join(dir, file), 'utf8').split('\n')) {
      if (!/^(--.*)?\s*$/.test(line)) break; // the header is the comment block before the first statement
      const m = /^--\s+(E[A-Z]\d{3})\s{2,}\S/.exec(line);
      if (m) registry.set(m[1]!, [...(registry.get(m[1]!) ?? []), file]);
    }
  }
  return registry;
}

/** The codes of README.md's error tables: "| EC010 | … |", "| EO001 / EO002 | … |", "| EO020 – EO024 | … |". */
function readmeCodes(): string[] {
  const codes: string[] = [];
  for (const line of readFileSync('README.md', 'utf8').split('\n')) {
    const cell = /^\|\s*([^|]*?)\s*\|/.exec(line)?.[1];
    if (!cell || !/^E[A-Z]\d{3}\b/.test(cell)) continue;
    const range = /^(E[A-Z])(\d{3})\s*(?:–|-|\.\.)\s*(E[A-Z])(\d{3})$/.exec(cell);
    if (range) {
      expect(range[3], `README range ${cell} spans two areas`).toBe(range[1]);
      for (let n = Number(range[2]); n <= Number(range[4]); n++) codes.push(`${range[1]}${String(n).padStart(3, '0')}`);
    } else {
      for (const c of cell.split(/\s*[/,]\s*/)) {
        expect(c, `README error table row ${line.slice(0, 60)}`).toMatch(OURS);
        codes.push(c);
      }
    }
  }
  return codes;
}

/** Function bodies of the migrated database, extensions' functions left out. */
async function bodies(): Promise<Array<{ fn: string; src: string }>> {
  const { rows } = await db.pool.query<{ fn: string; src: string }>(`
    select p.oid::regprocedure::text as fn, p.prosrc as src
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
       and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')`);
  return rows;
}

/** The SQLSTATE literals the functions raise: errcode = 'XXnnn'. */
async function raisedLiterals(): Promise<string[]> {
  const raised: string[] = [];
  for (const { src } of await bodies()) for (const m of src.matchAll(/errcode\s*=\s*'([0-9A-Z]{5})'/gi)) raised.push(m[1]!.toUpperCase());
  return sorted(raised);
}

/** Every TypeScript file of the listener but the map itself. */
function listenerSources(dir = 'listener'): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return listenerSources(p);
    return e.name.endsWith('.ts') && p !== path.join('listener', 'kernel', 'errors.ts') ? [readFileSync(p, 'utf8')] : [];
  });
}

describe('the SQLSTATE registry', () => {
  it('every code a function raises is registered, and every registered code is raised (or listed here with where it lives instead)', async () => {
    const raised = await raisedLiterals();
    const ours = raised.filter((c) => OURS.test(c));
    expect(minus(raised, ours), 'PostgreSQL SQLSTATEs raised by code (add one to STANDARD_RAISED with why, or use one of ours)').toEqual(sorted(Object.keys(STANDARD_RAISED)));
    const registered = sorted(sqlRegistry().keys());
    expect(minus([...ours, ...Object.keys(RAISED_THROUGH_A_VARIABLE)], registered), 'raised but not in any migration header registry').toEqual([]);
    expect(minus(registered, [...ours, ...Object.keys(RAISED_THROUGH_A_VARIABLE), ...Object.keys(NEVER_RAISED)]), 'registered but never raised (dead, or add to NEVER_RAISED with where it lives)').toEqual([]);
    expect(ours.filter((c) => c in NEVER_RAISED), 'listed as never raised, yet raised').toEqual([]);
  });

  it('a code raised through a variable comes from the function named for it, and that value is raised', async () => {
    const all = await bodies();
    for (const [code, fn] of Object.entries(RAISED_THROUGH_A_VARIABLE)) {
      const src = all.filter((b) => b.fn.startsWith(`${fn}(`)).map((b) => b.src).join('\n');
      expect(src, `${fn} hands over ${code}`).toContain(`'${code}'`);
    }
    expect(all.some((b) => /errcode\s*=\s*v_\w+\.errcode/.test(b.src)), 'a function raises errcode = v_….errcode').toBe(true);
  });

  it('a code never raised still lives where the list says: in a function body, or in the listener through SqlState', async () => {
    const sql = (await bodies()).map((b) => b.src).join('\n');
    const ts = listenerSources().join('\n');
    const names = new Map(Object.entries(SqlState).map(([name, code]) => [code as string, name]));
    const nowhere = Object.keys(NEVER_RAISED).filter((c) => !sql.includes(`'${c}'`) && !ts.includes(`SqlState.${names.get(c)}`));
    expect(nowhere, 'listed as never raised but used nowhere: drop it from the registry or from NEVER_RAISED').toEqual([]);
  });

  it('each code is registered once, in the header of the migration that brought it', () => {
    const twice = [...sqlRegistry()].filter(([, files]) => files.length > 1).map(([c, files]) => `${c}: ${files.join(', ')}`);
    expect(twice).toEqual([]);
  });

  it('the migrations, listener/kernel/errors.ts and the README list the same codes', () => {
    const registered = sorted(sqlRegistry().keys());
    const mapped = Object.values(SqlState) as string[];
    const documented = readmeCodes();
    expect(mapped.filter((c, i) => mapped.indexOf(c) !== i), 'codes with two names in SqlState').toEqual([]);
    expect(documented.filter((c, i) => documented.indexOf(c) !== i), 'codes in two README rows').toEqual([]);
    expect.soft(minus(registered, mapped), 'registered in SQL, missing from SqlState (listener/kernel/errors.ts)').toEqual([]);
    expect.soft(minus(mapped, registered), 'in SqlState, registered in no migration header').toEqual([]);
    expect.soft(minus(registered, documented), 'registered in SQL, missing from the README error tables').toEqual([]);
    expect.soft(minus(documented, registered), 'in the README error tables, registered in no migration header').toEqual([]);
  });

  it('the listener names our codes through SqlState, never as literals', () => {
    const literals = sorted(listenerSources().flatMap((s) => [...s.matchAll(/['"`](E[A-Z]\d{3})['"`]/g)].map((m) => m[1]!)));
    expect(literals).toEqual([]);
  });
});
