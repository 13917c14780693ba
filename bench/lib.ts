/**
 * Benchmark plumbing: timed loops with latency percentiles, event-loop delay, processes the
 * benchmark starts itself (stopped by pid), and the results table. Benchmarks report; nothing
 * here asserts a timing.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { createServer } from 'node:net';

export interface Measurement {
  ops: number;
  seconds: number;
  opsPerSecond: number;
  p50Ms?: number;
  p99Ms?: number;
  eventLoopP99Ms?: number;
  failures?: number;
}

export interface Row {
  case: string;
  seal: Measurement;
  anchor?: string;
  anchorResult?: Measurement;
  /** seal ops/s ÷ anchor ops/s */
  ratio?: number;
  target?: number;
  note?: string;
  /** Memory cases: resident-set growth. */
  growthMiB?: number;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Runs `op` one call at a time for `seconds`, recording each call's latency and the event-loop delay. */
export async function sequential(seconds: number, op: () => Promise<unknown>): Promise<Measurement> {
  const lat: number[] = [];
  const loop = monitorEventLoopDelay({ resolution: 1 });
  loop.enable();
  const start = performance.now();
  let now = start;
  while (now - start < seconds * 1000) {
    const t = performance.now();
    await op();
    now = performance.now();
    lat.push(now - t);
  }
  loop.disable();
  lat.sort((a, b) => a - b);
  const secs = (now - start) / 1000;
  return { ops: lat.length, seconds: secs, opsPerSecond: lat.length / secs, p50Ms: percentile(lat, 50), p99Ms: percentile(lat, 99), eventLoopP99Ms: loop.percentile(99) / 1e6 };
}

/** Keeps `inFlight` calls of `op` running for `seconds`. */
export async function concurrent(seconds: number, inFlight: number, op: () => Promise<unknown>): Promise<Measurement> {
  const lat: number[] = [];
  let failures = 0;
  const loop = monitorEventLoopDelay({ resolution: 1 });
  loop.enable();
  const start = performance.now();
  const deadline = start + seconds * 1000;
  const worker = async (): Promise<void> => {
    while (performance.now() < deadline) {
      const t = performance.now();
      try {
        await op();
      } catch {
        failures++;
      }
      lat.push(performance.now() - t);
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  loop.disable();
  const secs = (performance.now() - start) / 1000;
  lat.sort((a, b) => a - b);
  return { ops: lat.length - failures, seconds: secs, opsPerSecond: (lat.length - failures) / secs, p50Ms: percentile(lat, 50), p99Ms: percentile(lat, 99), eventLoopP99Ms: loop.percentile(99) / 1e6, failures };
}

/** Several rounds of one measurement as one: ops and seconds summed; latencies and loop delay: the worst round. */
export function merge(parts: readonly Measurement[]): Measurement {
  const ops = parts.reduce((a, p) => a + p.ops, 0);
  const seconds = parts.reduce((a, p) => a + p.seconds, 0);
  const worst = (k: 'p50Ms' | 'p99Ms' | 'eventLoopP99Ms'): number | undefined => {
    const v = parts.map((p) => p[k]).filter((x): x is number => x !== undefined);
    return v.length ? Math.max(...v) : undefined;
  };
  const failures = parts.reduce((a, p) => a + (p.failures ?? 0), 0);
  const out: Measurement = { ops, seconds, opsPerSecond: ops / seconds };
  for (const k of ['p50Ms', 'p99Ms', 'eventLoopP99Ms'] as const) {
    const w = worst(k);
    if (w !== undefined) out[k] = w;
  }
  if (parts.some((p) => p.failures !== undefined)) out.failures = failures;
  return out;
}

/** Rounds in which anchor and library take turns. */
export const ROUNDS = 3;

/**
 * Each side runs `seconds / ROUNDS` per round, the sides taking turns in every round (in the
 * order given), so a load change on the machine touches all alike. Returns each side's rounds merged.
 */
export async function takeTurns<K extends string>(seconds: number, sides: Record<K, (s: number) => Measurement | Promise<Measurement>>): Promise<Record<K, Measurement>> {
  const parts = new Map<K, Measurement[]>();
  for (let r = 0; r < ROUNDS; r++) {
    for (const [name, run] of Object.entries(sides) as [K, (s: number) => Measurement | Promise<Measurement>][]) {
      parts.set(name, [...(parts.get(name) ?? []), await run(seconds / ROUNDS)]);
    }
  }
  return Object.fromEntries([...parts].map(([k, v]) => [k, merge(v)])) as Record<K, Measurement>;
}

export function fromCount(ops: number, seconds: number): Measurement {
  return { ops, seconds, opsPerSecond: ops / seconds };
}

function canBind(port: number): Promise<boolean> {
  return new Promise((res) => {
    const s = createServer();
    s.once('error', () => res(false));
    s.listen(port, '127.0.0.1', () => s.close(() => res(true)));
  });
}

/** A free port P with P+1 free too (the swtpm TCTI finds its control port at P+1). */
export async function freePortPair(): Promise<number> {
  for (;;) {
    const p = 20000 + Math.floor(Math.random() * 40000);
    if ((await canBind(p)) && (await canBind(p + 1))) return p;
  }
}

/** A process the benchmark started; `stop()` ends it by its pid. */
export class Owned {
  constructor(readonly proc: ChildProcess) {}
  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill('SIGTERM');
    await exited;
  }
}

export function startProcess(cmd: string, args: string[]): Owned {
  return new Owned(spawn(cmd, args, { stdio: 'ignore' }));
}

export function runSync(cmd: string, args: string[], input?: Buffer): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, timeout: 600_000 });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

const fmt = (n: number | undefined, digits = 0): string => (n === undefined ? '' : n.toFixed(digits));

export function table(rows: readonly Row[]): string {
  const head = ['case', 'ops/s', 'p50 ms', 'p99 ms', 'loop p99 ms', 'anchor', 'anchor ops/s', 'ratio', 'target'];
  const lines = rows.map((r) => [
    r.case,
    fmt(r.seal.opsPerSecond),
    fmt(r.seal.p50Ms, 3),
    fmt(r.seal.p99Ms, 3),
    fmt(r.seal.eventLoopP99Ms, 2),
    r.anchor ?? '',
    fmt(r.anchorResult?.opsPerSecond),
    r.ratio === undefined ? '' : r.ratio.toFixed(2),
    r.target === undefined ? '' : `≥ ${r.target}`,
  ]);
  const all = [head, ...lines];
  const md = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [md(head), md(head.map(() => '---')), ...all.slice(1).map(md)].join('\n');
}
