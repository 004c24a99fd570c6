/**
 * The listener's rooms keep to their import rules (listener/README.md, and
 * the README.md of each room). Read from the source files: every import and
 * export specifier of every listener/**\/*.ts, static or dynamic (import()),
 * type-only included, parsed with the TypeScript compiler, so a new import
 * that breaks a rule fails here whatever else the suite does.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

interface Edge {
  /** The importing file, relative to the repository (listener/delivery/worker.ts). */
  from: string;
  /** What it names: a package ('pg', 'node:fs') or a file relative to the repository (listener/kernel/db.ts). */
  to: string;
  /** A file of this repository (a relative specifier), not a package. */
  file: boolean;
  dynamic: boolean;
}

/** Every import edge of one source file. */
function edgesOf(file: string, source: string): Edge[] {
  const sf = ts.createSourceFile(file, source, ts.ScriptTarget.ES2022, false, ts.ScriptKind.TS);
  const out: Edge[] = [];
  const add = (spec: string, dynamic: boolean) => {
    const to = spec.startsWith('.') ? path.posix.join(path.posix.dirname(file), spec).replace(/\.js$/, '.ts') : spec;
    out.push({ from: file, to, file: spec.startsWith('.'), dynamic });
  };
  const visit = (node: ts.Node): void => {
    if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
      add(node.moduleSpecifier.text, false);
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) {
      const [arg] = node.arguments;
      if (arg && ts.isStringLiteralLike(arg)) add(arg.text, true);
      else out.push({ from: file, to: '<computed>', file: false, dynamic: true });
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return out;
}

/** The room of a file: the first folder under listener/ ('kernel', 'delivery', …), or 'cli' for listener/cli.ts. */
function roomOf(file: string): string | null {
  const parts = file.split('/');
  if (parts[0] !== 'listener') return null;
  return parts.length === 2 ? path.posix.basename(file, '.ts') : parts[1]!;
}

const ROOMS = ['kernel', 'delivery', 'providers', 'inbound', 'sso', 'ops', 'console', 'sim'];

/** The rooms each room may import (listener/README.md); cli.ts and sim/ are judged by the rules below. */
const MAY_IMPORT: Record<string, string[]> = {
  kernel: ['kernel'],
  delivery: ['delivery', 'kernel', 'providers'],
  providers: ['providers', 'kernel'],
  inbound: ['inbound', 'kernel', 'providers'],
  sso: ['sso', 'kernel'],
  ops: ['ops', 'kernel', 'delivery'],
  console: ['console', 'kernel'],
};

/** The packages production code may import: package.json dependencies and Node's own modules. */
function productionPackages(): Set<string> {
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { dependencies: Record<string, string> };
  return new Set(Object.keys(pkg.dependencies));
}

const packageName = (spec: string) => (spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!);

/** Every broken rule, one line each; empty when the tree keeps them all. */
function violations(files: Map<string, string>, dependencies: Set<string>): string[] {
  const out: string[] = [];
  for (const [file, source] of files) {
    const room = roomOf(file);
    if (room === null) continue;
    if (room !== 'cli' && !ROOMS.includes(room)) out.push(`${file}: not in a room (listener/ holds cli.ts and the rooms ${ROOMS.join(', ')})`);
    for (const e of edgesOf(file, source)) {
      if (e.to === '<computed>') {
        out.push(`${file}: import() of a computed specifier (the rules cannot see where it goes)`);
        continue;
      }
      if (!e.file) {
        if (!e.to.startsWith('node:') && room !== 'sim' && !dependencies.has(packageName(e.to))) {
          out.push(`${file}: imports ${e.to}, which is not a production dependency (only listener/sim/ may use test and dev packages)`);
        }
        continue;
      }
      const target = roomOf(e.to);
      if (target === null) {
        out.push(`${file}: imports ${e.to}, outside listener/ (tests and benchmarks are not part of the product)`);
        continue;
      }
      const before = out.length;
      if (room === 'kernel' && target !== 'kernel') out.push(`${file}: the kernel imports ${e.to} (the kernel imports no other room)`);
      if (room === 'providers' && target !== 'providers' && target !== 'kernel') out.push(`${file}: a provider imports ${e.to} (providers import only the kernel and each other; never delivery)`);
      if (target === 'sim' && room !== 'sim' && !(room === 'cli' && e.dynamic)) {
        out.push(`${file}: imports ${e.to} (no product room imports the simulators; only a cli.ts dev verb loads them, with import())`);
      }
      if (room === 'cli' && target !== 'kernel' && target !== 'cli' && !e.dynamic) {
        out.push(`${file}: imports ${e.to} statically (cli.ts loads a room with import() when its verb runs; only the kernel is static)`);
      }
      const may = MAY_IMPORT[room];
      if (out.length === before && may && !may.includes(target)) out.push(`${file}: ${room}/ imports ${e.to} (${room}/ may import ${may.join(', ')})`);
    }
  }
  return out;
}

function listenerFiles(dir = 'listener'): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.posix.join(dir, e.name);
    if (e.isDirectory()) for (const [k, v] of listenerFiles(p)) out.set(k, v);
    else if (e.name.endsWith('.ts')) out.set(p, readFileSync(p, 'utf8'));
  }
  return out;
}

describe('the listener in rooms', () => {
  it('every file keeps its room\'s import rules: each room imports only the rooms its README names, the kernel imports no other room, providers never import delivery, nothing but a cli.ts dev verb loads the simulators, cli.ts loads rooms with import(), and only the simulators use test packages', () => {
    const files = listenerFiles();
    expect(files.size).toBeGreaterThan(50); // the scan really sees the tree
    expect([...files.keys()].filter((f) => f.split('/').length === 2)).toEqual(['listener/cli.ts']);
    expect(violations(files, productionPackages())).toEqual([]);
  });

  it('the rules catch a tree that breaks each of them', () => {
    const files = listenerFiles();
    const broken = new Map(files);
    const prepend = (file: string, line: string) => broken.set(file, `${line}\n${files.get(file)!}`);
    prepend('listener/kernel/config.ts', "import { Worker } from '../delivery/worker.js';");
    prepend('listener/providers/webhook.ts', "import type { EgressPolicy } from '../delivery/egress.js';");
    prepend('listener/delivery/worker.ts', "const sim = await import('../sim/index.js');");
    prepend('listener/cli.ts', "import { runDoctor } from './ops/doctor/index.js';");
    prepend('listener/inbound/inbound-server.ts', "import { PDFDocument } from 'pdf-lib';");
    prepend('listener/sso/keys.ts', "import { sql } from '../delivery/queries.js';");
    broken.set('listener/stray.ts', 'export {};');
    const found = violations(broken, productionPackages());
    expect(found).toEqual(expect.arrayContaining([
      expect.stringMatching(/^listener\/kernel\/config\.ts: the kernel imports listener\/delivery\/worker\.ts/),
      expect.stringMatching(/^listener\/providers\/webhook\.ts: a provider imports listener\/delivery\/egress\.ts/),
      expect.stringMatching(/^listener\/delivery\/worker\.ts: imports listener\/sim\/index\.ts/),
      expect.stringMatching(/^listener\/cli\.ts: imports listener\/ops\/doctor\/index\.ts statically/),
      expect.stringMatching(/^listener\/inbound\/inbound-server\.ts: imports pdf-lib, which is not a production dependency/),
      expect.stringMatching(/^listener\/sso\/keys\.ts: sso\/ imports listener\/delivery\/queries\.ts \(sso\/ may import sso, kernel\)/),
      expect.stringMatching(/^listener\/stray\.ts: not in a room/),
    ]));
    expect(found).toHaveLength(7);
  });
});
