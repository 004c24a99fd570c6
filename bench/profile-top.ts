/**
 * A profiling aid: the top self-time functions of a V8 .cpuprofile (from
 * BENCH_CPU_PROFILE=dir, i.e. `node --cpu-prof`), and the same grouped by
 * package / source file, as text.
 *
 * usage: node dist/bench/profile-top.js file.cpuprofile [rows=30]
 */
import { readFileSync } from 'node:fs';

interface Node { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; hitCount?: number; children?: number[] }
interface Profile { nodes: Node[]; startTime: number; endTime: number; samples: number[]; timeDeltas: number[] }

const [file, rowsArg] = process.argv.slice(2);
if (!file) {
  console.error('usage: profile-top.js file.cpuprofile [rows]');
  process.exit(2);
}
const rows = Number(rowsArg ?? 30);
const p = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const byId = new Map(p.nodes.map((n) => [n.id, n]));
// self time per node from the sample deltas (hitCount alone ignores the sampling interval's jitter)
const self = new Map<number, number>();
for (let i = 0; i < p.samples.length; i++) self.set(p.samples[i]!, (self.get(p.samples[i]!) ?? 0) + (p.timeDeltas[i] ?? 0));
const total = [...self.values()].reduce((a, b) => a + b, 0);
const idle = [...self].filter(([id]) => byId.get(id)?.callFrame.functionName === '(idle)').reduce((a, [, t]) => a + t, 0);
const busy = total - idle;

function place(n: Node): string {
  const u = n.callFrame.url;
  if (!u) return n.callFrame.functionName.startsWith('(') ? n.callFrame.functionName : '(native)';
  const m = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(u);
  if (m) return m[1]!;
  if (u.startsWith('node:')) return u;
  return u.replace(/^.*\/dist\//, '');
}
const fn = new Map<string, number>();
const file_ = new Map<string, number>();
for (const [id, t] of self) {
  const n = byId.get(id)!;
  if (n.callFrame.functionName === '(idle)') continue;
  const k = `${n.callFrame.functionName || '(anonymous)'}  ${place(n)}:${n.callFrame.lineNumber + 1}`;
  fn.set(k, (fn.get(k) ?? 0) + t);
  file_.set(place(n), (file_.get(place(n)) ?? 0) + t);
}
const pct = (t: number) => `${((100 * t) / busy).toFixed(1).padStart(5)} %`;
console.log(`${file}: ${(total / 1e6).toFixed(2)} s sampled, busy ${(busy / 1e6).toFixed(2)} s`);
console.log('\nby package / file (self time):');
for (const [k, t] of [...file_].sort((a, b) => b[1] - a[1]).slice(0, rows)) console.log(`${pct(t)}  ${k}`);
console.log('\nby function (self time):');
for (const [k, t] of [...fn].sort((a, b) => b[1] - a[1]).slice(0, rows)) console.log(`${pct(t)}  ${k}`);

// inclusive time per function (a function's own samples and everything it called; recursion counted once)
const parent = new Map<number, number>();
for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const incl = new Map<string, number>();
for (const [id, t] of self) {
  const seen = new Set<string>();
  for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
    const n = byId.get(cur)!;
    if (n.callFrame.functionName === '(idle)' || n.callFrame.functionName === '(root)') continue;
    const k = `${n.callFrame.functionName || '(anonymous)'}  ${place(n)}:${n.callFrame.lineNumber + 1}`;
    if (seen.has(k)) continue;
    seen.add(k);
    incl.set(k, (incl.get(k) ?? 0) + t);
  }
}
console.log('\nby function (inclusive time):');
for (const [k, t] of [...incl].sort((a, b) => b[1] - a[1]).slice(0, rows)) console.log(`${pct(t)}  ${k}`);
