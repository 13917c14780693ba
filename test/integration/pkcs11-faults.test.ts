/**
 * Faults between seal-bridge and a PKCS#11 module, injected by the fault proxy
 * (test/fault-pkcs11) in front of SoftHSM2's simulator token: lost sessions, device errors, a
 * lost login, a module that forgot its initialization, a removed device, rejected PINs, hung and
 * slow calls, and a device that fails everything. Each case states what the session pool
 * promises (README of session-pool.ts): which faults the caller never sees, which reach it as
 * exactly one typed error, and how many calls recovery costs, counted by the proxy per function.
 * Signatures are checked with node:crypto against the key's public half.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createPublicKey, randomBytes, verify as nodeVerify, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import pkcs11 from 'pkcs11js';
import type { Handle, PKCS11 } from 'pkcs11js';
import { openEnvironment, SealError, SealUri } from '../../src/index.js';
import type { KeyHandle, SecureEnvironment } from '../../src/index.js';
import { requireEnv, softhsmUri } from '../helpers/env.js';
import { expectSealError } from '../helpers/errors.js';
import { FaultProxy, type CountTable } from '../helpers/fault-proxy.js';

/** The call bound used here (URI call-timeout-ms) and what a timer may overshoot on a busy host. */
const TIMEOUT_MS = 400;
const SLACK_MS = 1000;
const run = `p11f-${randomBytes(4).toString('hex')}`;
let seq = 0;
const label = (what: string): string => `${run}-${what}-${++seq}`;

interface Pool {
  lib: PKCS11;
  slot: Handle;
  stats: { logins: number; retries: number; timeouts: number; sessionsSetAside: number; reinitializations: number };
  workerStats: { threadsAbandoned: number; batches: number; items: number } | undefined;
}
const poolOf = (env: SecureEnvironment): Pool => (env as unknown as { pool: Pool }).pool;

let proxy: FaultProxy;
let env: SecureEnvironment;
let key: KeyHandle;
let publicKey: KeyObject;
const figures = { cases: 0, absorbed: 0, surfaced: 0, timeouts: 0, refusedFast: 0 };



/** Signs fresh data with `k` and checks the signature with node:crypto. */
async function signVerified(k: KeyHandle = key, pub: KeyObject = publicKey): Promise<void> {
  const data = randomBytes(48);
  const sig = await k.sign(data);
  expect(nodeVerify('sha256', data, pub, sig), 'the signature verifies with node:crypto').toBe(true);
}

const calls = (before: CountTable, fn: string): number => proxy.callsSince(before, fn);

beforeAll(async () => {
  proxy = FaultProxy.start(requireEnv('SEAL_SOFTHSM_MODULE'));
  env = await openEnvironment(proxy.uri(softhsmUri(), { 'call-timeout-ms': String(TIMEOUT_MS) }));
  key = await env.generateKey({ label: label('sign'), algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
  publicKey = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
});

afterEach(async () => {
  proxy.rules(); // releases anything still held
  await proxy.settled();
  // the pool closes a set-aside session when its late answer arrives: let it get there first
  await new Promise((r) => setTimeout(r, 20));
});

afterAll(async () => {
  if (!proxy) return;
  proxy.rules();
  const totals = [...proxy.counts().values()].reduce((a, c) => ({ failed: a.failed + c.failed, hung: a.hung + c.hung, delayed: a.delayed + c.delayed }), { failed: 0, hung: 0, delayed: 0 });
  await key?.destroy().catch(() => undefined);
  const stats = env ? poolOf(env).stats : undefined;
  const threads = env ? poolOf(env).workerStats : undefined;
  await env?.close();
  console.log(`faults: ${figures.cases} cases, ${totals.failed + totals.hung} faults injected by the proxy (${totals.failed} CKR_* failures, ${totals.hung} held calls) and ${totals.delayed} delayed calls`);
  console.log(`faults: ${figures.absorbed} absorbed without the caller noticing, ${figures.surfaced} surfaced as exactly one typed error, ${figures.timeouts} TIMEOUTs (hung calls within 2×${TIMEOUT_MS}+${SLACK_MS} ms, calls queued behind them within 4×${TIMEOUT_MS}+${SLACK_MS} ms), ${figures.refusedFast} refused fast while calls were stuck`);
  if (stats) console.log(`faults: main pool: ${stats.retries} transparent retries, ${stats.logins} logins, ${stats.reinitializations} re-initializations, ${stats.timeouts} timeouts, ${stats.sessionsSetAside} sessions set aside${threads ? `; worker threads: ${threads.items} operations in ${threads.batches} batches, ${threads.threadsAbandoned} abandoned on a hung call` : ''}`);
  proxy.dispose();
});

describe('the proxy itself', () => {
  it('forwards everything when told nothing, and counts a rule with count=1 exactly once', async () => {
    figures.cases++;
    const before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_Sign')).toBe(1);
    proxy.rules('C_GenerateRandom fail CKR_DEVICE_ERROR count=1');
    const pool = poolOf(env);
    const s = pool.lib.C_OpenSession(pool.slot, pkcs11.CKF_SERIAL_SESSION);
    try {
      expect(() => pool.lib.C_GenerateRandom(s, Buffer.alloc(8))).toThrow(/CKR_DEVICE_ERROR/);
      expect(pool.lib.C_GenerateRandom(s, Buffer.alloc(8))).toHaveLength(8);
    } finally {
      pool.lib.C_CloseSession(s);
    }
    expect(proxy.count('C_GenerateRandom').failed - proxy.count('C_GenerateRandom', before).failed).toBe(1);
    expect(calls(before, 'C_GenerateRandom')).toBe(2);
  });

  it('counts exactly under concurrency: count=3 over 20 parallel signs fails exactly 3 C_Sign calls', async () => {
    figures.cases++;
    proxy.rules('C_Sign fail CKR_SESSION_HANDLE_INVALID count=3');
    const before = proxy.counts();
    const results = await Promise.allSettled(Array.from({ length: 20 }, () => signVerified()));
    expect(proxy.count('C_Sign').failed - proxy.count('C_Sign', before).failed).toBe(3);
    expect(calls(before, 'C_Sign')).toBe(23);
    // three faults, each retried once: at most one call can have met two of them
    const failed = results.filter((r) => r.status === 'rejected');
    expect(failed.length).toBeLessThanOrEqual(1);
    for (const r of failed) expect(((r as PromiseRejectedResult).reason as SealError).code).toBe('SESSION_LOST');
    figures.absorbed += 3 - 2 * failed.length;
    figures.surfaced += failed.length;
  });
});

describe('a lost session on C_Sign', () => {
  it('once: the call itself succeeds through one transparent retry, without a new login', async () => {
    figures.cases++;
    proxy.rules('C_Sign fail CKR_SESSION_HANDLE_INVALID count=1');
    const before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_Sign')).toBe(2);
    expect(calls(before, 'C_Login')).toBe(0);
    await signVerified();
    expect(calls(before, 'C_Sign')).toBe(3);
    figures.absorbed++;
  });

  it('twice in a row: the caller sees exactly one SESSION_LOST, and the next sign works without any action', async () => {
    figures.cases++;
    proxy.rules('C_Sign fail CKR_SESSION_HANDLE_INVALID count=2');
    const before = proxy.counts();
    await expectSealError(key.sign(randomBytes(16)), 'SESSION_LOST', 'CKR_SESSION_HANDLE_INVALID');
    expect(calls(before, 'C_Sign'), 'one retry, not more').toBe(2);
    await signVerified();
    expect(calls(before, 'C_Sign')).toBe(3);
    expect(calls(before, 'C_Login')).toBe(0);
    figures.surfaced++;
  });
});

// what recovery from each status costs, by the pool's design: a lost session is replaced; a
// device error or removal reopens everything and logs in again (and looks the key up again); a
// module that forgot its initialization is re-initialized first; CKR_USER_NOT_LOGGED_IN asks the
// token (C_GetSessionInfo on the anchor) and logs in only if the token agrees the login is gone
const CODES = [
  { ckr: 'CKR_SESSION_HANDLE_INVALID', code: 'SESSION_LOST', logins: 0, inits: 0, lookups: 0, cost: 'no new login' },
  { ckr: 'CKR_DEVICE_ERROR', code: 'DEVICE_ERROR', logins: 1, inits: 0, lookups: 1, cost: 'one new login, one key lookup' },
  { ckr: 'CKR_USER_NOT_LOGGED_IN', code: 'NOT_LOGGED_IN', logins: 0, inits: 0, lookups: 0, cost: 'no new login (the token still reports it)' },
  { ckr: 'CKR_CRYPTOKI_NOT_INITIALIZED', code: 'DEVICE_UNAVAILABLE', logins: 1, inits: 1, lookups: 1, cost: 'one C_Initialize, one new login, one key lookup' },
  { ckr: 'CKR_DEVICE_REMOVED', code: 'DEVICE_UNAVAILABLE', logins: 1, inits: 0, lookups: 1, cost: 'one new login, one key lookup' },
] as const;

describe('each status once, in the sign path: absorbed, at the promised cost', () => {
  it.each(CODES)('$ckr on C_Sign: sign succeeds at the cost of $cost', async (c) => {
    figures.cases++;
    proxy.rules(`C_Sign fail ${c.ckr} count=1`);
    const before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_Sign')).toBe(2);
    expect(calls(before, 'C_Login')).toBe(c.logins);
    expect(calls(before, 'C_Initialize')).toBe(c.inits);
    expect(calls(before, 'C_FindObjectsInit')).toBe(c.lookups);
    await signVerified();
    expect(calls(before, 'C_Login'), 'the next sign logs in no more').toBe(c.logins);
    figures.absorbed++;
  });

  it('concurrently: CKR_DEVICE_ERROR under 16 parallel signs, all verify, exactly one new C_Login', async () => {
    figures.cases++;
    await Promise.all(Array.from({ length: 4 }, () => signVerified())); // several pooled sessions
    proxy.rules('C_Sign fail CKR_DEVICE_ERROR count=1');
    const before = proxy.counts();
    await Promise.all(Array.from({ length: 16 }, () => signVerified()));
    expect(calls(before, 'C_Sign')).toBe(17);
    expect(calls(before, 'C_Login')).toBe(1);
    figures.absorbed++;
  });

  it('CKR_USER_NOT_LOGGED_IN with the anchor session lost too: exactly one C_Login', async () => {
    figures.cases++;
    proxy.rules('C_Sign fail CKR_USER_NOT_LOGGED_IN count=1', 'C_GetSessionInfo fail CKR_SESSION_HANDLE_INVALID count=1');
    const before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_GetSessionInfo')).toBe(1);
    expect(calls(before, 'C_Login')).toBe(1);
    figures.absorbed += 2;
  });

  it('a real logout (the token hides the key: CKR_OBJECT_HANDLE_INVALID): sign succeeds with exactly one C_Login', async () => {
    figures.cases++;
    const pool = poolOf(env);
    const s = pool.lib.C_OpenSession(pool.slot, pkcs11.CKF_SERIAL_SESSION);
    pool.lib.C_Logout(s);
    pool.lib.C_CloseSession(s);
    const before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_Login')).toBe(1);
    expect(calls(before, 'C_SignInit')).toBe(2);
    figures.absorbed++;
  });

  it('a key deleted behind the handle: KEY_NOT_FOUND after one lookup, no login', async () => {
    figures.cases++;
    const name = label('gone');
    const k = await env.generateKey({ label: name, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
    await k.sign(randomBytes(8)); // caches its handle
    const other = await env.getKey(k.uri);
    await other.destroy();
    const before = proxy.counts();
    await expectSealError(k.sign(randomBytes(8)), 'KEY_NOT_FOUND');
    expect(calls(before, 'C_SignInit')).toBe(1);
    expect(calls(before, 'C_FindObjectsInit')).toBe(1);
    expect(calls(before, 'C_Login')).toBe(0);
  });
});

describe('each status once, in the find path (getKey): absorbed, at the promised cost', () => {
  it.each(CODES)('$ckr on C_FindObjectsInit: getKey succeeds with one lookup more than a clean one, and $cost', async (c) => {
    figures.cases++;
    let before = proxy.counts();
    const clean = await env.getKey(key.label);
    const lookups = calls(before, 'C_FindObjectsInit');
    expect(clean.id).toBe(key.id);
    proxy.rules(`C_FindObjectsInit fail ${c.ckr} count=1`);
    before = proxy.counts();
    const found = await env.getKey(key.label);
    expect(found.id).toBe(key.id);
    expect(calls(before, 'C_FindObjectsInit')).toBe(lookups + 1);
    expect(calls(before, 'C_Login')).toBe(c.logins);
    expect(calls(before, 'C_Initialize')).toBe(c.inits);
    await signVerified(found);
    figures.absorbed++;
  });

  it('CKR_SESSION_HANDLE_INVALID on C_FindObjects (mid-search): listKeys succeeds', async () => {
    figures.cases++;
    proxy.rules('C_FindObjects fail CKR_SESSION_HANDLE_INVALID count=1');
    const keys = await env.listKeys({ label: key.label });
    expect(keys.map((k) => k.id)).toEqual([key.id]);
    figures.absorbed++;
  });
});

describe('each status once, in the login path: one failed call, never a repeated C_Login', () => {
  it.each(CODES)('$ckr on the C_Login of a recovery: that sign fails with $code, the next one logs in and works', async (c) => {
    figures.cases++;
    // a device error forces the recovery login; the login itself then fails
    proxy.rules('C_Sign fail CKR_DEVICE_ERROR count=1', `C_Login fail ${c.ckr} count=1`);
    const before = proxy.counts();
    await expectSealError(key.sign(randomBytes(16)), c.code, c.ckr);
    expect(calls(before, 'C_Login'), 'a failed C_Login is not repeated within the call').toBe(1);
    expect(calls(before, 'C_Sign')).toBe(1);
    await signVerified();
    expect(calls(before, 'C_Login')).toBe(2);
    figures.surfaced++;
  });
});

describe('a rejected PIN', () => {
  it('at opening: PIN_INCORRECT after exactly one C_Login, with no PIN in the error', async () => {
    figures.cases++;
    proxy.rules('C_Login fail CKR_PIN_INCORRECT count=1');
    const before = proxy.counts();
    const e = await expectSealError(openEnvironment(proxy.uri(softhsmUri())), 'PIN_INCORRECT', 'CKR_PIN_INCORRECT');
    expect(calls(before, 'C_Login')).toBe(1);
    const pinFile = SealUri.parse(softhsmUri()).query('pin-source')!.slice('file:'.length);
    const pin = readFileSync(pinFile, 'utf8').trim();
    for (const shown of [e.message, String(e), JSON.stringify(e)]) expect(shown.includes(pin)).toBe(false);
    figures.surfaced++;
  });

  it('after a lost login: tried once, remembered, never tried again (no further C_Login or C_Sign)', async () => {
    figures.cases++;
    const env2 = await openEnvironment(proxy.uri(softhsmUri(), { 'call-timeout-ms': String(TIMEOUT_MS) }));
    try {
      const k = await env2.getKey(key.uri);
      await signVerified(k);
      proxy.rules('C_Sign fail CKR_DEVICE_ERROR count=1', 'C_Login fail CKR_PIN_INCORRECT count=1');
      const before = proxy.counts();
      await expectSealError(k.sign(randomBytes(16)), 'PIN_INCORRECT');
      proxy.rules(); // the module would now accept the PIN: the pool must not ask it
      await expectSealError(k.sign(randomBytes(16)), 'PIN_INCORRECT');
      await expectSealError(env2.random(16), 'PIN_INCORRECT');
      expect(calls(before, 'C_Login')).toBe(1);
      expect(calls(before, 'C_Sign')).toBe(1);
      expect(calls(before, 'C_GenerateRandom')).toBe(0);
      figures.surfaced++;
    } finally {
      await env2.close();
    }
    await signVerified(); // the other environment was never affected
  });
});

describe('hung and slow calls', () => {
  it('C_Sign hung: TIMEOUT within twice the bound, the next sign works on another thread and session, the hung one is closed when it returns', async () => {
    figures.cases++;
    const pool = poolOf(env);
    const abandoned = pool.workerStats!.threadsAbandoned;
    proxy.rules('C_Sign hang count=1');
    const before = proxy.counts();
    const t0 = performance.now();
    const e = await expectSealError(key.sign(randomBytes(16)), 'TIMEOUT');
    const elapsed = performance.now() - t0;
    // the worker pool checks a batch's progress every call-timeout-ms: noticed within twice that
    expect(elapsed).toBeGreaterThanOrEqual(TIMEOUT_MS - 5);
    expect(elapsed).toBeLessThan(2 * TIMEOUT_MS + SLACK_MS);
    expect(e.message).toContain(`did not answer within ${TIMEOUT_MS} ms`);
    // still held inside the proxy while the next sign runs
    await signVerified();
    expect(proxy.count('C_Sign').active).toBe(1);
    expect(calls(before, 'C_Sign')).toBe(2);
    expect(pool.workerStats!.threadsAbandoned).toBe(abandoned + 1);
    const closes = proxy.count('C_CloseSession').calls;
    proxy.rules(); // release: the late answer arrives and its session is closed, not reused
    await proxy.settled();
    await expect.poll(() => proxy.count('C_CloseSession').calls - closes, { timeout: 2000 }).toBe(1);
    await signVerified();
    figures.timeouts++;
  });

  it('every C_Sign hung: TIMEOUTs until half the libuv pool is held, then refused at once without calling the module; works again once released', async () => {
    figures.cases++;
    const limit = Math.max(1, Math.floor((Number(process.env.UV_THREADPOOL_SIZE) || 4) / 2));
    proxy.rules('C_Sign hang');
    const before = proxy.counts();
    for (let i = 0; i < limit; i++) await expectSealError(key.sign(randomBytes(16)), 'TIMEOUT');
    expect(proxy.count('C_Sign').active).toBe(limit);
    const mid = proxy.counts();
    const t0 = performance.now();
    const e = await expectSealError(key.sign(randomBytes(16)), 'DEVICE_UNAVAILABLE');
    expect(performance.now() - t0).toBeLessThan(TIMEOUT_MS / 2);
    expect(e.message).toMatch(/have not returned/);
    expect(proxy.deltaSince(mid), 'nothing was sent to the module').toEqual({});
    proxy.rules();
    await proxy.settled();
    await expect.poll(async () => (await Promise.allSettled([signVerified()]))[0]!.status, { timeout: 2000 }).toBe('fulfilled');
    expect(calls(before, 'C_Sign')).toBe(limit + 1);
    figures.timeouts += limit;
    figures.refusedFast++;
  });

  it('every C_Sign hung with 20 calls in flight: every call settles with TIMEOUT or DEVICE_UNAVAILABLE, no more threads are fed than the stuck-call limit; works again once released', async () => {
    figures.cases++;
    const limit = Math.max(1, Math.floor((Number(process.env.UV_THREADPOOL_SIZE) || 4) / 2));
    const pool = poolOf(env);
    const abandoned = pool.workerStats!.threadsAbandoned;
    proxy.rules('C_Sign hang');
    const t0 = performance.now();
    const results = await Promise.allSettled(Array.from({ length: 20 }, () => key.sign(randomBytes(16))));
    const elapsed = performance.now() - t0;
    const codes = results.map((r) => (r.status === 'rejected' && r.reason instanceof SealError ? r.reason.code : r.status));
    expect(codes.every((c) => c === 'TIMEOUT' || c === 'DEVICE_UNAVAILABLE'), codes.join(',')).toBe(true);
    expect(codes).toContain('TIMEOUT');
    // queued calls do not wait out one bound per hung thread: a few bounds at most, not twenty
    expect(elapsed).toBeLessThan(4 * TIMEOUT_MS + SLACK_MS);
    expect(proxy.count('C_Sign').active).toBeLessThanOrEqual(limit);
    expect(pool.workerStats!.threadsAbandoned - abandoned).toBeLessThanOrEqual(limit);
    proxy.rules();
    await proxy.settled();
    await expect.poll(async () => (await Promise.allSettled([signVerified()]))[0]!.status, { timeout: 2000 }).toBe('fulfilled');
    figures.timeouts += codes.filter((c) => c === 'TIMEOUT').length;
  });

  it('delays: 16 parallel signs with C_Sign 50 ms and C_SignInit 5 ms slower all verify; a call just inside the bound succeeds', async () => {
    figures.cases++;
    proxy.rules('C_Sign delay 50', 'C_SignInit delay 5');
    const before = proxy.counts();
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 16 }, () => signVerified()));
    expect(performance.now() - t0).toBeGreaterThanOrEqual(50);
    expect(proxy.count('C_Sign').delayed - proxy.count('C_Sign', before).delayed).toBe(16);
    proxy.rules(`C_Sign delay ${TIMEOUT_MS - 150} count=1`);
    await signVerified();
  });
});

describe('a device that fails everything', () => {
  it.each(['CKR_DEVICE_ERROR', 'CKR_CRYPTOKI_NOT_INITIALIZED'] as const)('%s on every call: typed errors at a bounded cost per call, then recovery with one C_Login', async (ckr) => {
    figures.cases++;
    await signVerified();
    proxy.rules(`* fail ${ckr}`);
    const expected = ckr === 'CKR_DEVICE_ERROR' ? 'DEVICE_ERROR' : 'DEVICE_UNAVAILABLE';
    let before = proxy.counts();
    await expectSealError(key.sign(randomBytes(16)), expected, ckr);
    const first = proxy.deltaSince(before);
    const total = (d: Record<string, number>): number => Object.values(d).reduce((a, b) => a + b, 0);
    // the operation is tried once (a worker thread without a session fails at opening one); the
    // rebuild (closing what was open, reopening) once
    expect(first.C_SignInit ?? 0).toBeLessThanOrEqual(1);
    expect((first.C_SignInit ?? 0) + (first.C_OpenSession ?? 0)).toBeGreaterThanOrEqual(1);
    expect(first.C_Sign ?? 0).toBe(0);
    expect(first.C_Login ?? 0).toBe(0);
    expect(first.C_Initialize ?? 0).toBeLessThanOrEqual(2);
    expect(total(first)).toBeLessThanOrEqual(20);
    let worst = 0;
    for (let i = 0; i < 3; i++) {
      before = proxy.counts();
      await expectSealError(key.sign(randomBytes(16)), expected, ckr);
      await expectSealError(env.random(8), expected, ckr);
      const later = proxy.deltaSince(before);
      expect(total(later), `calls for two more refused operations: ${JSON.stringify(later)}`).toBeLessThanOrEqual(8);
      expect(later.C_Login ?? 0).toBe(0);
      worst = Math.max(worst, total(later));
    }
    console.log(`faults: every call ${ckr}: the first refused sign cost ${total(first)} module calls, each later sign + random pair at most ${worst}`);
    proxy.rules();
    before = proxy.counts();
    await signVerified();
    expect(calls(before, 'C_Login')).toBe(1);
    figures.surfaced += 7;
  });
});

describe('work that is not repeated', () => {
  it('CKR_DEVICE_ERROR on C_GenerateKeyPair: one DEVICE_ERROR, no second generation, the next one works', async () => {
    figures.cases++;
    const name = label('gen');
    proxy.rules('C_GenerateKeyPair fail CKR_DEVICE_ERROR count=1');
    const before = proxy.counts();
    await expectSealError(env.generateKey({ label: name, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'DEVICE_ERROR', 'CKR_DEVICE_ERROR');
    expect(calls(before, 'C_GenerateKeyPair')).toBe(1);
    const k = await env.generateKey({ label: name, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
    await signVerified(k, createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' }));
    await k.destroy();
    figures.surfaced++;
  });

  it('random is idempotent: CKR_SESSION_HANDLE_INVALID on C_GenerateRandom is absorbed', async () => {
    figures.cases++;
    proxy.rules('C_GenerateRandom fail CKR_SESSION_HANDLE_INVALID count=1');
    const before = proxy.counts();
    expect(await env.random(32)).toHaveLength(32);
    expect(calls(before, 'C_GenerateRandom')).toBe(2);
    figures.absorbed++;
  });
});

describe('call-timeout-ms in the URI', () => {
  it.each(['0', '-5', 'abc', '1.5', '99999999999'])('call-timeout-ms=%s is INVALID_URI', async (v) => {
    await expectSealError(openEnvironment(proxy.uri(softhsmUri(), { 'call-timeout-ms': v })), 'INVALID_URI');
  });
});
