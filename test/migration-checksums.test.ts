/**
 * Landed migration files are protected by this test, not by memory: sql/migrations/CHECKSUMS
 * pins the sha256 of every landed file, and a landed file that changes fails here. A change to
 * the database is a new migration file with the next number.
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { loadMigrationFiles } from '../listener/kernel/migrations.js';

const DIR = 'sql/migrations';

function pinned(): Map<string, string> {
  const out = new Map<string, string>();
  for (const raw of readFileSync(path.join(DIR, 'CHECKSUMS'), 'utf8').split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([0-9a-f]{64}) [ *](\S+)$/.exec(line);
    expect(m, `sql/migrations/CHECKSUMS: "${line}" is not "<sha256>  <file>" (sha256sum's format)`).toBeTruthy();
    expect(out.has(m![2]!), `sql/migrations/CHECKSUMS pins ${m![2]} twice`).toBe(false);
    out.set(m![2]!, m![1]!);
  }
  return out;
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(path.join(DIR, file))).digest('hex');

describe('landed migrations', () => {
  it('every landed migration file still has the sha256 it landed with (a change is a new migration, never an edit)', () => {
    const pins = pinned();
    expect(pins.size).toBeGreaterThanOrEqual(17);
    for (const [file, sum] of pins) {
      expect(existsSync(path.join(DIR, file)), `${DIR}/${file} landed and is gone: a landed migration is never removed or renamed`).toBe(true);
      expect(sha256(file), `${DIR}/${file} changed after it landed. A landed migration is never edited: restore it `
        + `(git checkout -- ${DIR}/${file}) and put the change in a new migration file with the next number.`).toBe(sum);
    }
  });

  it('0001 to 0017 are pinned, and every migration file is pinned once it lands', () => {
    const pins = pinned();
    const files = readdirSync(DIR).filter((f) => f.endsWith('.sql')).sort();
    expect(files.filter((f) => Number(f.slice(0, 4)) <= 17 && !pins.has(f))).toEqual([]);
    const unpinned = files.filter((f) => !pins.has(f));
    expect(unpinned, `not pinned in ${DIR}/CHECKSUMS: ${unpinned.join(', ')}. When a migration lands, pin it: `
      + `(cd ${DIR} && sha256sum ${unpinned.join(' ')} >> CHECKSUMS)`).toEqual([]);
  });

  it('the runner hashes a file exactly as the pin does, so the pin is what erp_cloud.migration records', () => {
    const pins = pinned();
    const files = loadMigrationFiles(migrationsDir);
    expect(files.map((f) => f.name)).toEqual(readdirSync(DIR).filter((f) => f.endsWith('.sql')).sort());
    for (const f of files) if (pins.has(f.name)) expect(f.sha256).toBe(pins.get(f.name));
  });
});
