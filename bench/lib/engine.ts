/**
 * Which engine a run measured: the migrations applied to every bench database
 * (read from sql/migrations at run time) and the built listener that ran
 * (dist/listener), each as a short sha256, plus any listener source file newer
 * than its build (the run then measured stale code: rebuild first).
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { migrationsDir } from '../../listener/kernel/db.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The checkout, found from dist/bench/lib/. */
const root = path.resolve(here, '..', '..', '..');

function filesUnder(dir: string, ext: string): string[] {
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...filesUnder(p, ext));
    else if (e.name.endsWith(ext)) out.push(p);
  }
  return out.sort();
}

function digest(files: string[], base: string): string {
  const h = createHash('sha256');
  for (const f of files) h.update(path.relative(base, f)).update('\0').update(readFileSync(f)).update('\0');
  return h.digest('hex').slice(0, 12);
}

export interface EngineFingerprint {
  migrations: string[];
  migrations_sha256: string;
  listener_dist_sha256: string;
  /** listener/*.ts files newer than their dist/listener/*.js. */
  stale_build: string[];
}

export function engineFingerprint(): EngineFingerprint {
  const migrations = filesUnder(migrationsDir, '.sql');
  const distDir = path.join(root, 'dist', 'listener');
  const srcDir = path.join(root, 'listener');
  const stale = filesUnder(srcDir, '.ts').filter((src) => {
    const js = path.join(distDir, path.relative(srcDir, src)).replace(/\.ts$/, '.js');
    return !existsSync(js) || statSync(src).mtimeMs > statSync(js).mtimeMs;
  });
  return {
    migrations: migrations.map((f) => path.basename(f)),
    migrations_sha256: digest(migrations, migrationsDir),
    listener_dist_sha256: digest(filesUnder(distDir, '.js'), distDir),
    stale_build: stale.map((f) => path.relative(root, f)),
  };
}
