/**
 * A tiny harness for the AddressSanitizer drivers (scripts/asan-check.sh). Each driver loads the
 * ASan build of one native shim by path and drives its raw surface with valid and malformed
 * input. A call either must succeed (`ok`), must fail (`fails`: a synchronous throw or a
 * rejection, optionally of a given kind), or may do either (`any`: fuzzed input, where only
 * "no crash, no sanitizer report" matters). A broken expectation is reported and makes the
 * process exit non-zero; a sanitizer report aborts the process by itself.
 */
import { createRequire } from 'node:module';
import path from 'node:path';

export type Check = RegExp | ((e: unknown) => boolean);

export class Driver {
  #calls = 0;
  #valid = 0;
  #malformed = 0;
  #fuzzed = 0;
  readonly #failures: string[] = [];

  constructor(readonly name: string) {}

  /** Loads a `.node` file by path (the ASan build, never the product's loader). */
  load<T>(file: string): T {
    return createRequire(import.meta.url)(path.resolve(file)) as T;
  }

  /** A valid call: it must succeed; returns its result (undefined when it failed). */
  async ok<T>(what: string, fn: () => T | Promise<T>): Promise<T | undefined> {
    this.#calls++;
    trace(what);
    this.#valid++;
    try {
      return await fn();
    } catch (e) {
      this.#fail(`${what}: expected success, got ${describe(e)}`);
      return undefined;
    }
  }

  /** A malformed call: it must throw or reject (matching `check` when given). */
  async fails(what: string, fn: () => unknown, check?: Check): Promise<void> {
    this.#calls++;
    trace(what);
    this.#malformed++;
    let error: unknown;
    let threw = false;
    try {
      await fn();
    } catch (e) {
      threw = true;
      error = e;
    }
    if (!threw) return this.#fail(`${what}: expected a failure, it succeeded`);
    if (check instanceof RegExp && !check.test(describe(error))) return this.#fail(`${what}: expected ${String(check)}, got ${describe(error)}`);
    if (typeof check === 'function' && !check(error)) return this.#fail(`${what}: unexpected failure ${describe(error)}`);
  }

  /** Fuzzed input: success and failure are both fine, the process must simply survive. */
  async any(fn: () => unknown): Promise<boolean> {
    this.#calls++;
    trace(`fuzzed call ${this.#fuzzed + 1}`);
    this.#fuzzed++;
    try {
      await fn();
      return true;
    } catch {
      return false;
    }
  }

  /** A plain assertion about a result. */
  check(what: string, condition: boolean): void {
    if (!condition) this.#fail(what);
  }

  #fail(message: string): void {
    this.#failures.push(message);
    process.stdout.write(`asan: ${this.name} expectation failed: ${message}\n`);
  }

  /** Prints the summary line and sets the exit code. */
  finish(): void {
    const counts = `${this.#calls} calls (${this.#valid} valid, ${this.#malformed} malformed, ${this.#fuzzed} fuzzed)`;
    if (this.#failures.length > 0) {
      process.stdout.write(`asan: ${this.name} ${counts}: ${this.#failures.length} expectation(s) failed\n`);
      process.exitCode = 1;
    } else {
      process.stdout.write(`asan: ${this.name} ${counts}, no sanitizer report\n`);
    }
  }
}

/** Names the case about to run on stderr: the check script shows the last one when a run crashes. */
function trace(what: string): void {
  process.stderr.write(`asan-case: ${what}\n`);
}

export function describe(e: unknown): string {
  if (e instanceof Error) {
    const code = (e as Error & { code?: unknown; rc?: unknown }).code ?? (e as Error & { rc?: unknown }).rc;
    return `${e.name}: ${e.message}${code === undefined ? '' : ` (code ${String(code)})`}`;
  }
  return String(e);
}

export const isTypeError: Check = (e) => e instanceof TypeError;
export const isRangeError: Check = (e) => e instanceof RangeError;
/** A JavaScript-level refusal raised by the binding itself (TypeError, RangeError or napi's Error). */
export const isBindingError: Check = (e) => e instanceof Error;

/** Deterministic pseudo-random bytes (mulberry32), so a run can be repeated exactly. */
export class Prng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  next(): number {
    this.#s = (this.#s + 0x6d2b79f5) >>> 0;
    let t = this.#s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(max: number): number {
    return Math.floor(this.next() * max);
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  /** `base` with a few bytes flipped, cut, or extended. */
  mutate(base: Buffer): Buffer {
    const b = Buffer.from(base);
    switch (this.int(4)) {
      case 0:
        for (let k = 0; k < 1 + this.int(4); k++) if (b.length) b[this.int(b.length)] = this.int(256);
        return b;
      case 1:
        return b.subarray(0, this.int(b.length + 1));
      case 2:
        return Buffer.concat([b, this.bytes(1 + this.int(16))]);
      default:
        if (b.length >= 2) b.writeUInt16BE(this.int(0x10000), this.int(b.length - 1));
        return b;
    }
  }
}

export function requireEnv(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run under scripts/sim: eval "$(scripts/sim start)")`);
  return v;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Runs the garbage collector when node was started with --expose-gc (destructor paths). */
export async function collectGarbage(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) return;
  for (let i = 0; i < 3; i++) {
    gc();
    await sleep(20);
  }
}
