/**
 * Wall time of each phase of the running figure, so that a slow run can be
 * read step by step (issue 15: the quick run's 90-s budget). A figure calls
 * phase('name') when a phase starts (the previous one ends there); the runner
 * opens and closes each figure. Phases of the same name add up (e.g. the
 * set-up of every run of a sweep), in the order they first appeared.
 */

let figure: { started: number; open: string | null; openedAt: number; ms: Map<string, number> } | null = null;

function close(now: number): void {
  if (!figure?.open) return;
  figure.ms.set(figure.open, (figure.ms.get(figure.open) ?? 0) + (now - figure.openedAt));
  figure.open = null;
}

/** The runner: a figure starts (every phase until the first phase() call is 'start'). */
export function beginFigure(): void {
  const now = performance.now();
  figure = { started: now, open: 'start', openedAt: now, ms: new Map() };
}

/**
 * A figure: the phase `name` starts now; the previous one ends. Outside a figure, a no-op. Only for
 * steps in sequence: work a figure runs side by side is timed as one phase around it.
 */
export function phase(name: string): void {
  if (!figure) return;
  const now = performance.now();
  close(now);
  figure.open = name;
  figure.openedAt = now;
}

/** The runner: the figure ended (its last phase with it); seconds per phase, 0.1-s resolution. */
export function endFigure(): Record<string, number> {
  if (!figure) return {};
  close(performance.now());
  const out = Object.fromEntries([...figure.ms].map(([k, v]) => [k, Math.round(v / 100) / 10]));
  figure = null;
  return out;
}
