/**
 * Shared pieces of the fuzz properties (test/fuzz/*.test.ts): the run count, a wrapper that counts
 * inputs, bounds the time any one input may take and prints `fuzz: <parser> <n> inputs`, the
 * "only a SealError" check, and structure-aware mutations of valid encodings (flipped bytes and bits,
 * inserted and deleted ranges, truncation, extension, length fields set to boundary values).
 *
 * SEAL_FUZZ_RUNS sets the number of inputs per property: small in the normal suite (300), large
 * in `npm run fuzz` (20000). The normal suite uses a fixed seed, so a run is repeatable and a
 * failure is the same on every machine; an explicit SEAL_FUZZ_RUNS draws a fresh seed each run
 * (printed with the counts and by fast-check on failure); SEAL_FUZZ_SEED replays one.
 */
import { expect } from 'vitest';
import fc from 'fast-check';
import { performance } from 'node:perf_hooks';
import { SealError, type ErrorCode } from '../../src/core/errors.js';

export const FUZZ_RUNS = (() => {
  const n = Number(process.env.SEAL_FUZZ_RUNS ?? 300);
  return Number.isInteger(n) && n > 0 ? n : 300;
})();

export const FUZZ_SEED = (() => {
  const fixed = Number(process.env.SEAL_FUZZ_SEED);
  if (process.env.SEAL_FUZZ_SEED !== undefined && Number.isInteger(fixed)) return fixed | 0;
  return process.env.SEAL_FUZZ_RUNS !== undefined ? (Date.now() ^ (process.pid << 16)) | 0 : 0x5ea1b41d | 0;
})();

/** Longest time one input may take before the property fails as a hang. */
export const PER_INPUT_MS = 2000;

/** A vitest timeout for a property of FUZZ_RUNS inputs costing about `msPerInput` each. */
export const timeoutFor = (msPerInput = 1): number => 60_000 + FUZZ_RUNS * msPerInput * 4;

/**
 * Runs `check` on FUZZ_RUNS inputs from `arb` (plus the given examples), fails when one input
 * takes longer than PER_INPUT_MS, and prints how many inputs the parser saw.
 */
export function fuzz<T>(parser: string, arb: fc.Arbitrary<T>, check: (input: T) => void, options: { examples?: T[]; runs?: number } = {}): void {
  let inputs = 0;
  let slowest = 0;
  fc.assert(
    fc.property(arb, (input) => {
      inputs++;
      const t0 = performance.now();
      check(input);
      const ms = performance.now() - t0;
      slowest = Math.max(slowest, ms);
      if (ms > PER_INPUT_MS) throw new Error(`${parser}: one input took ${ms.toFixed(0)} ms (bound ${PER_INPUT_MS} ms)`);
    }),
    { numRuns: options.runs ?? FUZZ_RUNS, seed: FUZZ_SEED, examples: (options.examples ?? []).map((e) => [e] as [T]) },
  );
  report(parser, inputs, slowest);
}

/** The async form of `fuzz`. */
export async function fuzzAsync<T>(parser: string, arb: fc.Arbitrary<T>, check: (input: T) => Promise<void>, options: { examples?: T[]; runs?: number } = {}): Promise<void> {
  let inputs = 0;
  let slowest = 0;
  await fc.assert(
    fc.asyncProperty(arb, async (input) => {
      inputs++;
      const t0 = performance.now();
      await check(input);
      const ms = performance.now() - t0;
      slowest = Math.max(slowest, ms);
      if (ms > PER_INPUT_MS) throw new Error(`${parser}: one input took ${ms.toFixed(0)} ms (bound ${PER_INPUT_MS} ms)`);
    }),
    { numRuns: options.runs ?? FUZZ_RUNS, seed: FUZZ_SEED, examples: (options.examples ?? []).map((e) => [e] as [T]) },
  );
  report(parser, inputs, slowest);
}

function report(parser: string, inputs: number, slowest: number): void {
  // fast-check also counts the shrinking steps of a failure: only a passing run prints
  console.log(`fuzz: ${parser} ${inputs} inputs (seed ${FUZZ_SEED}, slowest ${slowest.toFixed(1)} ms)`);
}

/**
 * Runs `fn`; returns its result, or undefined when it threw a SealError (with one of `codes` when
 * given). Anything else thrown fails the property with the input's description.
 */
export function sealOnly<T>(fn: () => T, codes?: readonly ErrorCode[]): T | undefined {
  try {
    return fn();
  } catch (e) {
    expectSealError(e, codes);
    return undefined;
  }
}

export async function sealOnlyAsync<T>(fn: () => Promise<T>, codes?: readonly ErrorCode[]): Promise<T | undefined> {
  try {
    return await fn();
  } catch (e) {
    expectSealError(e, codes);
    return undefined;
  }
}

function expectSealError(e: unknown, codes?: readonly ErrorCode[]): void {
  if (!(e instanceof SealError)) {
    const what = e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e);
    expect.fail(`threw something other than a SealError: ${what}`);
  }
  if (codes) expect(codes, `SealError ${e.code}: ${e.message}`).toContain(e.code);
}

// ---- inputs ------------------------------------------------------------------------------------

/** Bytes of every size: mostly short, some around the 64 KiB boundaries, a few oversized. */
export function bytes(max = 600): fc.Arbitrary<Buffer> {
  return fc
    .oneof(
      { weight: 12, arbitrary: fc.uint8Array({ maxLength: max }) },
      { weight: 1, arbitrary: fc.integer({ min: 65_000, max: 70_000 }).map((n) => new Uint8Array(n).map((_, i) => (i * 131 + n) & 0xff)) },
    )
    .map((a) => Buffer.from(a));
}

type Mutation =
  | { op: 'flip'; at: number; value: number }
  | { op: 'bit'; at: number; bit: number }
  | { op: 'insert'; at: number; data: Uint8Array }
  | { op: 'delete'; at: number; length: number }
  | { op: 'truncate'; at: number }
  | { op: 'extend'; data: Uint8Array }
  | { op: 'length'; at: number; value: number; width: 1 | 2 | 4 }
  | { op: 'duplicate'; at: number; length: number };

const BOUNDARY = [0, 1, 2, 0x7f, 0x80, 0x81, 0xff, 0x100, 0x7fff, 0x8000, 0xfffe, 0xffff, 0x10000, 0x7fffffff, 0xffffffff];

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ op: fc.constant('bit' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ op: fc.constant('insert' as const), at: fc.nat(), data: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
  fc.record({ op: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 16 }) }),
  fc.record({ op: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ op: fc.constant('extend' as const), data: fc.uint8Array({ minLength: 1, maxLength: 64 }) }),
  fc.record({ op: fc.constant('length' as const), at: fc.nat(), value: fc.constantFrom(...BOUNDARY), width: fc.constantFrom(1 as const, 2 as const, 4 as const) }),
  fc.record({ op: fc.constant('duplicate' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 64 }) }),
);

function applyMutation(input: Buffer, m: Mutation): Buffer {
  const n = input.length;
  const at = n === 0 ? 0 : m.op === 'extend' ? n : (m as { at: number }).at % (n + 1);
  switch (m.op) {
    case 'flip': {
      if (n === 0) return input;
      const b = Buffer.from(input);
      b[at % n] = m.value;
      return b;
    }
    case 'bit': {
      if (n === 0) return input;
      const b = Buffer.from(input);
      b[at % n] = b[at % n]! ^ (1 << m.bit);
      return b;
    }
    case 'insert':
      return Buffer.concat([input.subarray(0, at), Buffer.from(m.data), input.subarray(at)]);
    case 'delete':
      return Buffer.concat([input.subarray(0, at), input.subarray(at + m.length)]);
    case 'truncate':
      return input.subarray(0, at);
    case 'extend':
      return Buffer.concat([input, Buffer.from(m.data)]);
    case 'duplicate':
      return Buffer.concat([input.subarray(0, at + m.length), input.subarray(at)]);
    case 'length': {
      if (n < m.width) return input;
      const b = Buffer.from(input);
      const pos = at % (n - m.width + 1);
      b.writeUIntBE(m.value % 2 ** (8 * m.width), pos, m.width);
      return b;
    }
  }
}

/** One to `max` mutations, to apply with applyMutations to input made inside a property. */
export const mutationList = (max = 3): fc.Arbitrary<Mutation[]> => fc.array(mutationArb, { minLength: 1, maxLength: max });

export function applyMutations(input: Buffer, ms: readonly Mutation[]): Buffer {
  return ms.reduce<Buffer>((b, m) => applyMutation(b, m), Buffer.from(input));
}

/** Valid encodings changed by one to four mutations (and, sometimes, left as they are). */
export function mutated(seeds: readonly Buffer[], maxMutations = 4): fc.Arbitrary<Buffer> {
  return fc
    .tuple(fc.constantFrom(...seeds), fc.array(mutationArb, { minLength: 0, maxLength: maxMutations }))
    .map(([seed, ms]) => applyMutations(seed, ms));
}

/** Valid encodings mutated, and random bytes, in one arbitrary. */
export function mutatedOrRandom(seeds: readonly Buffer[], max = 600): fc.Arbitrary<Buffer> {
  return fc.oneof({ weight: 4, arbitrary: mutated(seeds) }, { weight: 1, arbitrary: bytes(max) });
}
