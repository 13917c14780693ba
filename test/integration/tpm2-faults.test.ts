/**
 * Process and data faults of the TPM backend, on a swtpm of this file's own (no resource manager,
 * loopback, its own state directory): killing it is only safe where this file is its only user.
 *
 * - swtpm killed mid-load: six concurrent callers sign (ECDSA P-256 and P-384) and HMAC on one
 *   environment while swtpm is SIGKILLed (by the pid this file started it with) and started again
 *   on the same ports and state, three times. Every call either succeeds with a result that checks
 *   (signatures verify with node:crypto against the key's public key, MACs equal the MAC of the
 *   same message taken before the faults) or fails with a SealError of a stable code; every call
 *   that started while swtpm was up and saw no kill succeeds; after the last restart a burst of
 *   calls all succeed; when the environment is closed, tpm2_getcap lists no transient object and
 *   no session.
 * - damaged key-store records: a public area that does not parse, names nothing ESYS knows or
 *   disagrees with its metadata, a key file that is not one, a derived object's template that is
 *   not its own (the input that used to wedge tpm2-tss's ESYS context: every later call on any key
 *   answered TSS2_ESYS_RC_BAD_SEQUENCE). Each fails with DEVICE_ERROR naming the record, before
 *   anything reaches the TPM (the connection is never rebuilt); listKeys leaves it out, check()
 *   (seal doctor) names it; the next operation on another key succeeds.
 * - an ESYS context wedged on purpose (a malformed template sent past the record checks): the
 *   connection replaces the context, the next operation on another key succeeds, and what the
 *   wedged context had loaded is flushed (no transient object or session left).
 *
 * Figures are printed as `faults:` lines.
 */
import { createPublicKey, randomBytes, randomInt, verify as nodeVerify, type KeyObject } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ERROR_CODES, openEnvironment, SealError } from '../../src/index.js';
import type { KeyHandle, Tpm2Environment } from '../../src/index.js';
import { decodeKeyFile, encodeKeyFile } from '../../src/backends/tpm2/keyfile.js';
import { encodeSensitiveCreate } from '../../src/backends/tpm2/marshal.js';
import { OwnSwtpm } from '../helpers/swtpm.js';

const CALLERS = 6;
const KILLS = 3;
/** Checked results wanted before each kill and after each restart. */
const RESULTS_PER_PHASE = 40;
/** Bound on every wait for the load to get somewhere (never a timing assertion). */
const WAIT_MS = 60_000;

let work: string;
let tpm: OwnSwtpm;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'seal-tpm2-faults-'));
  tpm = await OwnSwtpm.start(work);
});

afterAll(async () => {
  await tpm?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} after ${WAIT_MS} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection, the call succeeded');
}

describe('swtpm killed and restarted mid-load', () => {
  it(`${CALLERS} callers sign and HMAC through ${KILLS} SIGKILLs of swtpm: every result checks or the call fails typed; after each restart every call succeeds; nothing stays loaded`, async () => {
    const env = (await openEnvironment(tpm.uri(join(work, 'keys-load')))) as Tpm2Environment;
    // three keys, two loaded at once: the load mixes fast-path calls, loads and evictions
    const p256 = await env.generateKey({ label: 'p256', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
    const p384 = await env.generateKey({ label: 'p384', algorithm: { name: 'ECDSA', namedCurve: 'P-384' }, usages: ['sign', 'verify'] });
    const hmac = await env.generateKey({ label: 'hmac', algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign'] });
    const spki = (k: KeyHandle): KeyObject => createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' });
    const pub = { p256: spki(p256), p384: spki(p384) };
    // the MACs the TPM gives before any fault: a MAC during the faults must equal one of these
    const messages = Array.from({ length: 8 }, () => randomBytes(40));
    const macs = await Promise.all(messages.map((m) => hmac.mac(m)));

    const figures = { calls: 0, succeeded: 0, failed: 0, byCode: new Map<string, number>() };
    const problems: string[] = [];
    let up = true;
    let kills = 0;
    let stopping = false;

    /** One call of a random kind; returns once its outcome is classified. */
    const call = async (): Promise<void> => {
      const cleanStart = up;
      const killsAtStart = kills;
      const kind = randomInt(3);
      figures.calls++;
      try {
        if (kind === 2) {
          const i = randomInt(messages.length);
          const mac = await hmac.mac(messages[i]!);
          if (!mac.equals(macs[i]!)) problems.push('an HMAC differs from the one the TPM gave before the faults');
        } else {
          const key = kind === 0 ? p256 : p384;
          const data = randomBytes(48);
          const sig = await key.sign(data);
          if (!nodeVerify(kind === 0 ? 'sha256' : 'sha384', data, kind === 0 ? pub.p256 : pub.p384, sig)) problems.push(`a ${key.label} signature does not verify`);
        }
        figures.succeeded++;
      } catch (e) {
        figures.failed++;
        if (!(e instanceof SealError) || !(ERROR_CODES as readonly string[]).includes(e.code)) {
          problems.push(`untyped failure: ${e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e)}`.slice(0, 300));
          return;
        }
        figures.byCode.set(e.code, (figures.byCode.get(e.code) ?? 0) + 1);
        // started while swtpm answered and no kill since: nothing excuses a failure
        if (cleanStart && killsAtStart === kills) problems.push(`a call with swtpm up all along failed: ${e.code} ${e.message}`.slice(0, 300));
        // a caller that sees the TPM gone retries a little later
        await new Promise((r) => setTimeout(r, 5));
      }
    };
    const callers = Array.from({ length: CALLERS }, async () => {
      while (!stopping) await call();
    });

    try {
      for (let round = 0; round < KILLS; round++) {
        // a different moment in the load each round
        const target = figures.succeeded + RESULTS_PER_PHASE + randomInt(RESULTS_PER_PHASE);
        await until(`results before kill ${round + 1}`, () => figures.succeeded >= target || problems.length > 0);
        up = false;
        kills++;
        await tpm.kill('SIGKILL');
        // calls keep coming while swtpm is gone: each fails (typed)
        const failedBefore = figures.failed;
        await until(`failures while swtpm is down (round ${round + 1})`, () => figures.failed >= failedBefore + CALLERS);
        await tpm.restart();
        up = true;
        const after = figures.succeeded;
        await until(`${RESULTS_PER_PHASE} results after restart ${round + 1}`, () => figures.succeeded >= after + RESULTS_PER_PHASE || problems.length > 0);
      }
    } finally {
      stopping = true;
      await Promise.all(callers);
    }
    expect(problems.slice(0, 5)).toEqual([]);

    // after the last restart: a burst of every kind of call, all succeed and check
    const burst = await Promise.allSettled(Array.from({ length: 3 * CALLERS }, (_, i) => (i % 3 === 2 ? hmac.mac(messages[0]!) : (i % 3 === 0 ? p256 : p384).sign(messages[1]!))));
    expect(burst.filter((r) => r.status === 'rejected')).toEqual([]);
    burst.forEach((r, i) => {
      const v = (r as PromiseFulfilledResult<Buffer>).value;
      if (i % 3 === 2) expect(v.equals(macs[0]!)).toBe(true);
      else expect(nodeVerify(i % 3 === 0 ? 'sha256' : 'sha384', messages[1]!, i % 3 === 0 ? pub.p256 : pub.p384, v)).toBe(true);
    });
    const reconnects = env.conn.reconnects;
    expect(reconnects).toBeGreaterThanOrEqual(KILLS);
    await env.close();
    // swtpm serves one connection at a time: tpm2-tools look once the environment is closed
    expect(tpm.handles('handles-transient')).toEqual([]);
    expect(tpm.handles('handles-loaded-session')).toEqual([]);

    const codes = [...figures.byCode].map(([c, n]) => `${c} ×${n}`).join(', ');
    console.log(`faults: swtpm killed mid-load: ${figures.calls} calls, ${figures.failed} failed typed, ${figures.succeeded} succeeded and verified`);
    console.log(`faults: swtpm killed mid-load: ${KILLS} SIGKILLs under ${CALLERS} callers; failures: ${codes || 'none'}; ${reconnects} reconnections; after the restarts ${burst.length} of ${burst.length} burst calls succeeded; 0 transient objects and 0 sessions left`);
  });
});

describe('damaged key-store records', () => {
  /** Each damage: how it is done to the victim's record (its key file and metadata, in place). */
  interface Damage {
    name: string;
    victim: 'ecdsa' | 'derived' | 'sealed';
    pem?: (pub: Buffer) => Buffer;
    file?: (pem: string) => string;
    meta?: (meta: Record<string, unknown>) => void;
  }
  /** A TPM2B_PUBLIC whose size field says its new length. */
  const resized = (p: Buffer): Buffer => (p.writeUInt16BE(p.length - 2, 0), p);
  // TPM2B_PUBLIC offsets: size 0, type 2, nameAlg 4, objectAttributes 6, authPolicy 10 (empty: 2
  // bytes), ECC parameters 12: symmetric 12, scheme 14, curveID 16, kdf 18, unique x 20
  const damages: Damage[] = [
    { name: 'public area cut short', victim: 'ecdsa', pem: (p) => p.subarray(0, 20) },
    { name: 'object type unknown', victim: 'ecdsa', pem: (p) => (p.writeUInt16BE(0x0099, 2), p) },
    { name: 'name algorithm unknown', victim: 'ecdsa', pem: (p) => (p.writeUInt16BE(0x0099, 4), p) },
    { name: 'name algorithm SHA-1', victim: 'ecdsa', pem: (p) => (p.writeUInt16BE(0x0004, 4), p) },
    { name: 'sign attribute cleared', victim: 'ecdsa', pem: (p) => (p.writeUInt32BE((p.readUInt32BE(6) & ~(1 << 18)) | (1 << 17), 6), p) },
    { name: 'curve changed', victim: 'ecdsa', pem: (p) => (p.writeUInt16BE(0x0004, 16), p) },
    { name: 'public point off the curve', victim: 'ecdsa', pem: (p) => ((p[p.length - 40] = p[p.length - 40]! ^ 0x01), p) },
    { name: 'policy added', victim: 'ecdsa', pem: (p) => resized(Buffer.concat([p.subarray(0, 10), Buffer.from('0020', 'hex'), randomBytes(32), p.subarray(12)])) },
    { name: 'key file not a TSS2 key', victim: 'ecdsa', file: (pem) => pem.replace(/[A-Za-z]{8}/, 'AAAAAAAA').slice(0, 120) },
    { name: 'derivation template cut short', victim: 'derived', meta: (m) => ((m.derivation as { template: string }).template = (m.derivation as { template: string }).template.slice(0, 20)) },
    { name: 'derivation template of an unknown type', victim: 'derived', meta: (m) => ((m.derivation as { template: string }).template = `0099${(m.derivation as { template: string }).template.slice(4)}`) },
    { name: 'derivation template with trailing bytes', victim: 'derived', meta: (m) => ((m.derivation as { template: string }).template += 'ffff') },
    { name: 'derivation template of another object', victim: 'derived', meta: (m) => ((m.derivation as { template: string }).template = (m.derivation as { template: string }).template.replace(/^(.{8})(.{8})/, (_, a: string, b: string) => `${a}${(parseInt(b, 16) ^ 0x00040000).toString(16).padStart(8, '0')}`)) },
    { name: 'sealed data that is not a sealed data object', victim: 'sealed', pem: (p) => (p.writeUInt16BE(0x0023, 2), p) },
  ];

  it('each fails with DEVICE_ERROR naming the record before reaching the TPM; doctor names it; the next operation on another key succeeds', async () => {
    const keystore = join(work, 'keys-damaged');
    const env = (await openEnvironment(tpm.uri(keystore))) as Tpm2Environment;
    let refused = 0;
    try {
      const good = await env.generateKey({ label: 'good', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
      const goodPub = createPublicKey({ key: good.publicKey!, format: 'der', type: 'spki' });
      await env.generateKey({ label: 'ecdsa', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
      const parent = await env.generateKey({ label: 'root', algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['deriveKey'] });
      const derivation = { kdf: 'TPM-DERIVED-OBJECT' as const, label: Buffer.from('connection'), context: randomBytes(16) };
      const derived = await parent.deriveKey(derivation, { label: 'derived', algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign'] });
      const derivedMac = await derived.mac(Buffer.from('m'));
      const sealed = randomBytes(24);
      await env.writeData('sealed', sealed);
      expect(await env.check()).toEqual([]);

      const idOf = (label: string): string => {
        const m = readdirSync(keystore)
          .filter((f) => f.endsWith('.json') && f !== 'srk.json')
          .map((f) => JSON.parse(readFileSync(join(keystore, f), 'utf8')) as { id: string; label: string })
          .find((x) => x.label === label);
        return m!.id;
      };
      const ids = { ecdsa: idOf('ecdsa'), derived: idOf('derived'), sealed: idOf('sealed') };
      const reconnects = env.conn.reconnects;

      for (const d of damages) {
        const id = ids[d.victim];
        const pemFile = join(keystore, `${id}.pem`);
        const metaFile = join(keystore, `${id}.json`);
        const original = { pem: readFileSync(pemFile, 'utf8'), meta: readFileSync(metaFile, 'utf8') };
        try {
          if (d.pem) {
            const k = decodeKeyFile(original.pem);
            writeFileSync(pemFile, encodeKeyFile({ ...k, public: d.pem(Buffer.from(k.public)) }));
          }
          if (d.file) writeFileSync(pemFile, d.file(original.pem));
          if (d.meta) {
            const m = JSON.parse(original.meta) as Record<string, unknown>;
            d.meta(m);
            writeFileSync(metaFile, JSON.stringify(m));
          }
          const attempt = d.victim === 'sealed' ? env.readData('sealed') : d.victim === 'derived' ? env.getKey('derived').then((k) => k.mac(Buffer.from('m'))) : env.getKey('ecdsa').then((k) => k.sign(Buffer.from('m')));
          const e = await rejection(attempt);
          expect(e, d.name).toBeInstanceOf(SealError);
          expect((e as SealError).code, `${d.name}: ${(e as SealError).message}`).toBe('DEVICE_ERROR');
          expect((e as SealError).message, d.name).toMatch(new RegExp(`key-store record ${id} .* is damaged`));
          refused++;
          if (d.victim !== 'sealed') expect((await env.listKeys()).map((k) => k.label).sort(), d.name).toEqual(['good', 'root', ...(d.victim === 'derived' ? ['ecdsa'] : ['derived'])].sort());
          const problems = await env.check();
          expect(problems.filter((p) => p.startsWith(`${id}.json`) && /damaged record/.test(p)), d.name).toHaveLength(1);
          expect(problems, d.name).toHaveLength(1);
          // the same environment: another key signs at once
          const data = randomBytes(32);
          expect(nodeVerify('sha256', data, goodPub, await good.sign(data)), d.name).toBe(true);
        } finally {
          writeFileSync(pemFile, original.pem);
          writeFileSync(metaFile, original.meta);
        }
      }
      // nothing damaged ever reached the TPM: the connection was never rebuilt
      expect(env.conn.reconnects).toBe(reconnects);
      expect(env.conn.wedges).toBe(0);
      // repaired records work again
      expect((await (await env.getKey('derived')).mac(Buffer.from('m'))).equals(derivedMac)).toBe(true);
      expect((await env.readData('sealed')).equals(sealed)).toBe(true);
      expect(await env.check()).toEqual([]);
    } finally {
      await env.close();
    }
    expect(tpm.handles('handles-transient')).toEqual([]);
    console.log(`faults: damaged key-store records: ${refused} of ${damages.length} kinds refused as DEVICE_ERROR naming the record, none sent to the TPM (0 reconnections, 0 wedged contexts); another key signed after each; doctor named each`);
  });

  it('an ESYS context wedged on purpose is replaced: the next operation on another key succeeds, nothing stays loaded', async () => {
    const env = (await openEnvironment(tpm.uri(join(work, 'keys-wedge')))) as Tpm2Environment;
    try {
      const good = await env.generateKey({ label: 'good', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
      const hmac = await env.generateKey({ label: 'hmac', algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign'] });
      const mac = await hmac.mac(Buffer.from('m'));
      const goodPub = createPublicKey({ key: good.publicKey!, format: 'der', type: 'spki' });
      const data = randomBytes(32);
      expect(nodeVerify('sha256', data, goodPub, await good.sign(data))).toBe(true); // loaded, with the salted session
      const before = { reconnects: env.conn.reconnects, wedges: env.conn.wedges };
      // TPM2_CreateLoaded with a template tpm2-tss cannot unmarshal: past the record checks, as a
      // damage they do not know would be. ESYS fails it and keeps refusing every later call.
      const e = await rejection(env.conn.run('TPM2_CreateLoaded (malformed template)', async (ctx) =>
        ctx.createLoaded(await env.conn.srk(ctx), [await env.conn.authSession(ctx, true, false)], encodeSensitiveCreate(), Buffer.from('0023000b', 'hex')), false));
      expect(e).toBeInstanceOf(SealError);
      expect(env.conn.wedges).toBe(before.wedges + 1);
      expect(env.conn.reconnects).toBe(before.reconnects + 1);
      // the next operations, on other keys, succeed at once
      expect(nodeVerify('sha256', data, goodPub, await good.sign(data))).toBe(true);
      expect((await hmac.mac(Buffer.from('m'))).equals(mac)).toBe(true);
      expect(env.conn.reconnects).toBe(before.reconnects + 1);
      console.log(`faults: ESYS context wedged on purpose (${(e as SealError).backendCode ?? (e as SealError).code}): replaced once, the next sign and HMAC succeeded`);
    } finally {
      await env.close();
    }
    // what the wedged context had loaded (a key, the salted session) was flushed through the new one
    expect(tpm.handles('handles-transient')).toEqual([]);
    expect(tpm.handles('handles-loaded-session')).toEqual([]);
  });
});
