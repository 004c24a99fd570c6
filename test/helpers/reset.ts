/**
 * Test state reset from the catalog (STYLE.md 22a): no hand-kept table lists.
 *
 * The product schemas are the schemas a freshly migrated database has, apart
 * from `public`, extension schemas and `erp_cloud` (the migration runner's own
 * history, which a reset never rewrites). global-setup reads the migrated
 * template once (`readTemplateState`) and hands the result to every test file.
 *
 * The rule for a table of a product schema:
 * - it has rows in the freshly migrated template: it is seeded configuration
 *   (operation handlers, settings, text limits …) and a reset restores exactly
 *   those rows;
 * - otherwise it holds run-time data and a reset empties it (a partitioned
 *   table with all its partitions, also the ones made at run time).
 * Every sequence of the product schemas goes back to the template's value too,
 * so ids start where a fresh database starts them. Tables added by a later
 * migration are covered without a change here.
 *
 * After the reset the state is CHECKED: a data table that is not empty, a
 * seeded table that differs from the template, or a sequence elsewhere than in
 * the template throws an error that names it.
 */
import type pg from 'pg';
import { inject } from 'vitest';

export interface SeededTable {
  table: string;
  /** the insertable columns (generated ones excluded), in order */
  columns: string[];
  /** the rows as JSON (json_agg), as the template has them */
  rows: string;
  /** md5 of the rows' text, sorted: what a reset compares */
  digest: string;
}

export interface SequenceState {
  sequence: string;
  value: string;
  isCalled: boolean;
}

export interface TemplateState {
  schemas: string[];
  seeded: SeededTable[];
  sequences: SequenceState[];
}

/** The product schemas of a database (see the file header). */
const SCHEMAS_SQL = `
  select n.nspname from pg_namespace n
   where n.nspname !~ '^pg_' and n.nspname not in ('information_schema', 'public', 'erp_cloud')
     and not exists (select from pg_depend d where d.classid = 'pg_namespace'::regclass and d.objid = n.oid and d.deptype = 'e')
   order by 1`;

/** Tables to reset: ordinary and partitioned tables, not partitions (truncating the parent empties them). */
const TABLES_SQL = `
  select c.oid::regclass::text as t from pg_class c
   where c.relnamespace::regnamespace::text = any($1) and c.relkind in ('r', 'p') and not c.relispartition
   order by 1`;

const SEQUENCES_SQL = `
  select format('%I.%I', schemaname, sequencename) as sequence, coalesce(last_value, start_value)::text as value,
         last_value is not null as "isCalled"
    from pg_sequences where schemaname = any($1) order by 1`;

const digestSql = (table: string) => `select md5(coalesce(string_agg(t::text, E'\\n' order by t::text), '')) as d from ${table} t`;

/** Reads what a freshly migrated database holds: run once by global-setup on the template. */
export async function readTemplateState(c: pg.ClientBase): Promise<TemplateState> {
  const schemas = (await c.query<{ nspname: string }>(SCHEMAS_SQL)).rows.map((r) => r.nspname);
  const tables = (await c.query<{ t: string }>(TABLES_SQL, [schemas])).rows.map((r) => r.t);
  const seeded: SeededTable[] = [];
  for (const table of tables) {
    if (!(await c.query(`select 1 from ${table} limit 1`)).rowCount) continue;
    const columns = (await c.query<{ a: string }>(
      `select quote_ident(attname) a from pg_attribute where attrelid = $1::regclass and attnum > 0 and not attisdropped and attgenerated = '' order by attnum`,
      [table])).rows.map((r) => r.a);
    const rows = (await c.query<{ j: string }>(`select json_agg(t)::text j from ${table} t`)).rows[0]!.j;
    const digest = (await c.query<{ d: string }>(digestSql(table))).rows[0]!.d;
    seeded.push({ table, columns, rows, digest });
  }
  const sequences = (await c.query<SequenceState>(SEQUENCES_SQL, [schemas])).rows;
  return { schemas, seeded, sequences };
}

export interface ResetOptions {
  /**
   * Tables a test file set up once and keeps across its tests (for example its
   * endpoints), as `schema.table`. A kept table keeps the tables it references
   * and the sequences that number it; none of them is reset or checked.
   */
  keep?: string[];
}

/** Empties the run-time data of the product schemas and restores seeded configuration; then checks both. */
export async function resetProductState(pool: pg.Pool, opts: ResetOptions = {}): Promise<void> {
  const template = inject('templateState');
  const c = await pool.connect();
  try {
    await c.query('begin');
    // triggers stay quiet: a reset writes the template's rows, it is no business event
    await c.query('set local session_replication_role = replica');
    const tables = (await c.query<{ t: string }>(TABLES_SQL, [template.schemas])).rows.map((r) => r.t);
    const kept = await keptClosure(c, opts.keep ?? []);
    const seeded = new Map(template.seeded.map((s) => [s.table, s]));
    const reset = tables.filter((t) => !kept.has(t));

    const data = reset.filter((t) => !seeded.has(t));
    const full = await nonEmpty(c, data);
    if (full.length) await c.query(`truncate ${full.join(', ')} cascade`);
    const seededHere = template.seeded.filter((s) => !kept.has(s.table) && tables.includes(s.table));
    const before = await digests(c, seededHere.map((s) => s.table));
    for (const s of seededHere) {
      if (before.get(s.table) === s.digest) continue;
      await c.query(`delete from ${s.table}`);
      const cols = s.columns.join(', ');
      await c.query(`insert into ${s.table} (${cols}) overriding system value
                       select ${cols} from json_populate_recordset(null::${s.table}, $1::json)`, [s.rows]);
    }
    const sequences = await sequencesToReset(c, template, kept);
    const current = await sequenceStates(c, template.schemas);
    for (const s of sequences) {
      const n = current.get(s.sequence);
      if (n && n.value === s.value && n.isCalled === s.isCalled) continue;
      await c.query(`select setval($1::regclass, $2::bigint, $3)`, [s.sequence, s.value, s.isCalled]);
    }

    // the check: every data table empty (cascade may have reached some), every seeded table and sequence as in the template
    const wrong: string[] = [];
    for (const t of await nonEmpty(c, reset.filter((t) => !seeded.has(t)))) wrong.push(`${t} is not empty`);
    const after = await digests(c, seededHere.map((s) => s.table));
    for (const s of template.seeded) {
      if (kept.has(s.table)) continue;
      if (!tables.includes(s.table)) wrong.push(`${s.table} (seeded by the migrations) is missing`);
      else if (after.get(s.table) !== s.digest) wrong.push(`${s.table} differs from the migrated template`);
    }
    const now = await sequenceStates(c, template.schemas);
    for (const s of sequences) {
      const n = now.get(s.sequence);
      if (!n || n.value !== s.value || n.isCalled !== s.isCalled) wrong.push(`sequence ${s.sequence} is at ${n?.value} (called: ${n?.isCalled}), not ${s.value}`);
    }
    if (wrong.length) throw new Error(`resetProductState left the database unlike a freshly migrated one: ${wrong.join('; ')}`);
    await c.query('commit');
  } catch (err) {
    await c.query('rollback').catch(() => undefined);
    throw err;
  } finally {
    c.release();
  }
}

/** md5 of each table's rows, in one round trip. */
async function digests(c: pg.PoolClient, tables: string[]): Promise<Map<string, string>> {
  if (!tables.length) return new Map();
  const { rows } = await c.query<{ t: string; d: string }>(
    tables.map((t, i) => `select $${i + 1}::text as t, (${digestSql(t)}) as d`).join(' union all '), tables);
  return new Map(rows.map((r) => [r.t, r.d]));
}

async function sequenceStates(c: pg.PoolClient, schemas: string[]): Promise<Map<string, SequenceState>> {
  return new Map((await c.query<SequenceState>(SEQUENCES_SQL, [schemas])).rows.map((s) => [s.sequence, s]));
}

async function nonEmpty(c: pg.PoolClient, tables: string[]): Promise<string[]> {
  if (!tables.length) return [];
  const { rows } = await c.query<{ t: string }>(
    tables.map((t, i) => `select $${i + 1}::text as t where exists (select from ${t})`).join(' union all '), tables);
  return rows.map((r) => r.t);
}

/** The kept tables with every table they reference (a truncate must not cascade into them), as regclass text. */
async function keptClosure(c: pg.PoolClient, keep: string[]): Promise<Set<string>> {
  const out = new Set<string>();
  if (!keep.length) return out;
  const { rows } = await c.query<{ name: string; t: string | null }>(
    `select name, to_regclass(name)::text as t from unnest($1::text[]) name`, [keep]);
  const unknown = rows.filter((r) => !r.t).map((r) => r.name);
  if (unknown.length) throw new Error(`resetProductState: no table ${unknown.join(', ')} to keep`);
  const { rows: closure } = await c.query<{ t: string }>(`
    with recursive k(oid) as (
      select unnest($1::regclass[])::oid
      union
      select f.confrelid from pg_constraint f join k on f.conrelid = k.oid where f.contype = 'f')
    select oid::regclass::text as t from k`, [rows.map((r) => r.t)]);
  for (const r of closure) out.add(r.t);
  return out;
}

/**
 * The product sequences with the value to restore: the template's (or, for a
 * sequence made later, its start). A sequence that numbers a kept table (owned
 * by one of its columns, or named in one of its defaults) is left alone.
 */
async function sequencesToReset(c: pg.PoolClient, template: TemplateState, kept: Set<string>): Promise<SequenceState[]> {
  const { rows } = await c.query<SequenceState & { tables: string[] }>(`
    select format('%I.%I', s.schemaname, s.sequencename) as sequence, s.start_value::text as value, false as "isCalled",
           array(select d.refobjid::regclass::text from pg_depend d
                  where d.classid = 'pg_class'::regclass and d.objid = q.oid and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')
                 union
                 select a.adrelid::regclass::text from pg_depend d join pg_attrdef a on a.oid = d.objid
                  where d.classid = 'pg_attrdef'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = q.oid) as tables
      from pg_sequences s join pg_class q on q.oid = format('%I.%I', s.schemaname, s.sequencename)::regclass
     where s.schemaname = any($1) order by 1`, [template.schemas]);
  const fresh = new Map(template.sequences.map((s) => [s.sequence, s]));
  return rows.filter((r) => !r.tables.some((t) => kept.has(t)))
    .map((r) => fresh.get(r.sequence) ?? { sequence: r.sequence, value: r.value, isCalled: false });
}

declare module 'vitest' {
  export interface ProvidedContext {
    templateState: TemplateState;
  }
}
