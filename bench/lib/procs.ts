/**
 * Child processes of the benchmark (sink, listeners, graphile-worker): every
 * one is registered here so that a failure or a signal anywhere still ends
 * them all, each by its own pid. stopChild asks politely (SIGTERM / an IPC
 * message) and escalates to SIGKILL after a deadline.
 */
import { fork, spawn, type ChildProcess, type ForkOptions, type SpawnOptions } from 'node:child_process';
import { sleep } from './util.js';

const live = new Set<ChildProcess>();
const MAX_OUTPUT = 64 * 1024;

export interface Child {
  proc: ChildProcess;
  name: string;
  /** The last 64 KiB of stdout + stderr, for error messages. */
  output(): string;
  exited: Promise<number | null>;
}

function wrap(proc: ChildProcess, name: string): Child {
  live.add(proc);
  let out = '';
  const keep = (d: Buffer | string) => {
    out += d.toString();
    if (out.length > MAX_OUTPUT) out = out.slice(-MAX_OUTPUT);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  const exited = new Promise<number | null>((resolve) => {
    proc.once('exit', (code, signal) => {
      live.delete(proc);
      resolve(code ?? (signal ? -1 : null));
    });
    proc.once('error', (err) => {
      keep(`spawn error: ${err.message}\n`);
      live.delete(proc);
      resolve(-1);
    });
  });
  return { proc, name, output: () => out, exited };
}

/** Registers a child started elsewhere (e.g. by execFile) so that cleanup ends it too. */
export function adopt(name: string, proc: ChildProcess): Child {
  return wrap(proc, name);
}

export function spawnChild(name: string, command: string, args: string[], opts: SpawnOptions): Child {
  return wrap(spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts }), name);
}

/** A Node child with an IPC channel (the sink, the graphile-worker runner). */
export function forkChild(name: string, modulePath: string, opts: ForkOptions): Child {
  return wrap(fork(modulePath, [], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'], ...opts }), name);
}

/** Ends one child: `politely` (default SIGTERM) first, SIGKILL after `graceMs`. Returns its exit code. */
export async function stopChild(child: Child, graceMs = 8000, politely?: () => void): Promise<number | null> {
  if (child.proc.exitCode !== null || child.proc.signalCode !== null) return child.exited;
  try {
    if (politely) politely();
    else child.proc.kill('SIGTERM');
  } catch {
    child.proc.kill('SIGTERM');
  }
  const done = await Promise.race([child.exited.then(() => true), sleep(graceMs).then(() => false)]);
  if (!done) {
    child.proc.kill('SIGKILL');
    await Promise.race([child.exited, sleep(2000)]);
  }
  return child.exited;
}

/** Ends every child still running (each by its own pid), in parallel. */
export async function stopAllChildren(): Promise<void> {
  await Promise.all(
    [...live].map(async (proc) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const exited = new Promise<void>((r) => proc.once('exit', () => r()));
      const done = await Promise.race([exited.then(() => true), sleep(5000).then(() => false)]);
      if (!done) proc.kill('SIGKILL');
    }),
  );
}

/** Last resort on process exit: synchronous SIGKILL of anything left. */
export function killAllChildrenSync(): void {
  for (const proc of live) {
    try {
      proc.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
}
