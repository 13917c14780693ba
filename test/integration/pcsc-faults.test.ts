/**
 * pcscd restarted under the card backends. A restart takes every reader and card away from every
 * PC/SC client, so this file starts a simulator set of its own (`scripts/sim start` with its own
 * SEAL_SIM_DIR: its own namespace, pcscd, vpcd ports and card host) and points this process at it
 * before the first PC/SC call (libpcsclite reads PCSCLITE_CSOCK_NAME once); the shared simulators
 * other files use are never touched. `scripts/sim restart-pcscd` stops that pcscd by its recorded
 * pid and starts it again on the same socket with the same readers; it returns once PC/SC sees the
 * cards again (the card host reconnects to vpcd by itself).
 *
 * - Between operations: the next PIV signature after the restart succeeds without the caller
 *   seeing anything (a new PC/SC context, a new card connection), with exactly one PIN VERIFY for
 *   the new card session and none for the signature after it; the IoT SAFE applet on the same
 *   daemon signs again too. Signatures verify with node:crypto.
 * - Under load: a PIV and an IoT SAFE caller sign in a loop while pcscd restarts. Every call
 *   either succeeds with a signature that verifies or fails with a SealError of a stable code
 *   (never a PIN error); every call that started after the restart completed succeeds; the PIN
 *   was verified at most once per new card session (never in a loop).
 *
 * Figures are printed as `faults:` lines.
 */
import { execFile, execFileSync } from 'node:child_process';
import { createPublicKey, randomBytes, verify as nodeVerify, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ERROR_CODES, openEnvironment, SealError } from '../../src/index.js';
import type { KeyHandle, SecureEnvironment } from '../../src/index.js';
import type { IotSafeEnvironment, PivEnvironment } from '../../src/backends/pcsc/index.js';
import type { PcscTransport } from '../../src/backends/pcsc/pcsc-transport.js';

const sim = resolve(import.meta.dirname, '..', '..', 'scripts', 'sim');
const run = promisify(execFile);
/** Checked signatures wanted from each caller before and after the restart under load. */
const RESULTS_PER_PHASE = 5;
/** Bound on every wait for the load to get somewhere (never a timing assertion). */
const WAIT_MS = 60_000;

let simDir: string | undefined;
let piv: PivEnvironment;
let iotsafe: IotSafeEnvironment;
let pivKey: KeyHandle;
let iotKey: KeyHandle;
let pivPub: KeyObject;
let iotPub: KeyObject;

const simEnv = (): NodeJS.ProcessEnv => ({ ...process.env, SEAL_SIM_DIR: simDir });

/** `scripts/sim restart-pcscd` on this file's simulators; returns its one line. */
async function restartPcscd(): Promise<string> {
  const { stdout } = await run(sim, ['restart-pcscd'], { env: simEnv(), timeout: 60_000 });
  return stdout.trim();
}

const transportOf = (env: SecureEnvironment): PcscTransport => (env as PivEnvironment | IotSafeEnvironment).applet.transport as unknown as PcscTransport;

async function signVerified(key: KeyHandle, pub: KeyObject): Promise<void> {
  const data = randomBytes(40);
  const sig = await key.sign(data);
  expect(nodeVerify('sha256', data, pub, sig), `a ${key.label} signature verifies with node:crypto`).toBe(true);
}

beforeAll(async () => {
  simDir = mkdtempSync(join(tmpdir(), 'seal-pcsc-faults-'));
  rmdirSync(simDir); // scripts/sim makes it, 0700
  const exports = execFileSync(sim, ['start'], { env: simEnv(), encoding: 'utf8', timeout: 120_000 });
  // this process uses these simulators only: set before anything opens a PC/SC context
  for (const line of exports.split('\n')) {
    const m = /^export ([A-Z0-9_]+)='(.*)'$/.exec(line);
    if (m) process.env[m[1]!] = m[2]!;
  }
  piv = (await openEnvironment(process.env.SEAL_PIV_URI!)) as PivEnvironment;
  iotsafe = (await openEnvironment(process.env.SEAL_IOTSAFE_URI!)) as IotSafeEnvironment;
  pivKey = await piv.generateKey({ label: '9a', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'], replace: true });
  iotKey = await iotsafe.generateKey({ label: 'client-key', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
  pivPub = createPublicKey({ key: pivKey.publicKey!, format: 'der', type: 'spki' });
  iotPub = createPublicKey({ key: iotKey.publicKey!, format: 'der', type: 'spki' });
}, 180_000);

afterAll(async () => {
  await piv?.close().catch(() => undefined);
  await iotsafe?.close().catch(() => undefined);
  // stops exactly what `start` started (by the pids it recorded, the restarted pcscd's included)
  if (simDir) execFileSync(sim, ['stop'], { env: simEnv(), timeout: 60_000 });
});

describe('pcscd restarted', () => {
  it('between operations: the next PIV signature reconnects by itself with exactly one PIN VERIFY; the IoT SAFE applet signs again', async () => {
    await signVerified(pivKey, pivPub);
    await signVerified(iotKey, iotPub);
    const t = transportOf(piv);
    const before = { verifies: piv.applet.stats.pinVerifies, generation: t.generation, contexts: t.contextRestarts };
    const said = await restartPcscd();
    expect(said).toMatch(/^sim: pcscd restarted \(pid \d+\); cards in: .*Virtual PCD 00 00/);

    // the first call after the restart: no error for the caller
    await signVerified(pivKey, pivPub);
    expect(t.contextRestarts).toBe(before.contexts + 1);
    expect(t.generation).toBe(before.generation + 1);
    expect(piv.applet.stats.pinVerifies).toBe(before.verifies + 1); // the new card session, once
    await signVerified(pivKey, pivPub);
    expect(piv.applet.stats.pinVerifies).toBe(before.verifies + 1); // and not again
    expect(t.generation).toBe(before.generation + 1);

    const iot = transportOf(iotsafe);
    const iotContexts = iot.contextRestarts;
    await signVerified(iotKey, iotPub);
    expect(iot.contextRestarts).toBe(iotContexts + 1);
    console.log(`faults: pcscd restarted between operations: the next PIV and IoT SAFE signatures succeeded on a new PC/SC context (PIV: 1 reconnection, 1 PIN VERIFY, none for the signature after it)`);
  });

  it('under load: every signature verifies or fails typed; after the restart every call succeeds; one PIN VERIFY per new card session at most', async () => {
    const t = transportOf(piv);
    const before = { verifies: piv.applet.stats.pinVerifies, generation: t.generation };
    const figures = { calls: 0, succeeded: 0, failed: 0, byCode: new Map<string, number>(), ok: { piv: 0, iot: 0 } };
    const problems: string[] = [];
    let phase: 'before' | 'restarting' | 'after' = 'before';
    let stopping = false;

    const caller = async (which: 'piv' | 'iot'): Promise<void> => {
      const [key, pub] = which === 'piv' ? [pivKey, pivPub] : [iotKey, iotPub];
      while (!stopping) {
        const startedAfter = phase === 'after';
        figures.calls++;
        const data = randomBytes(40);
        try {
          const sig = await key.sign(data);
          if (!nodeVerify('sha256', data, pub, sig)) problems.push(`a ${which} signature does not verify`);
          figures.succeeded++;
          figures.ok[which]++;
        } catch (e) {
          figures.failed++;
          if (!(e instanceof SealError) || !(ERROR_CODES as readonly string[]).includes(e.code)) {
            problems.push(`untyped failure: ${e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e)}`.slice(0, 300));
            continue;
          }
          figures.byCode.set(e.code, (figures.byCode.get(e.code) ?? 0) + 1);
          if (e.code.startsWith('PIN_')) problems.push(`a PIN error while pcscd restarted: ${e.code}`);
          if (startedAfter) problems.push(`a ${which} call after the restart failed: ${e.code} ${e.message}`.slice(0, 300));
          // a caller that sees the reader gone tries again a little later
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    };
    const until = async (what: string, cond: () => boolean): Promise<void> => {
      const deadline = Date.now() + WAIT_MS;
      while (!cond() && problems.length === 0) {
        if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} after ${WAIT_MS} ms`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };

    const callers = [caller('piv'), caller('iot')];
    try {
      await until('signatures before the restart', () => figures.ok.piv >= RESULTS_PER_PHASE && figures.ok.iot >= RESULTS_PER_PHASE);
      phase = 'restarting';
      await restartPcscd();
      phase = 'after';
      const at = { ...figures.ok };
      await until('signatures after the restart', () => figures.ok.piv >= at.piv + RESULTS_PER_PHASE && figures.ok.iot >= at.iot + RESULTS_PER_PHASE);
    } finally {
      stopping = true;
      await Promise.all(callers);
    }
    expect(problems.slice(0, 5)).toEqual([]);
    await signVerified(pivKey, pivPub);
    await signVerified(iotKey, iotPub);

    const sessions = t.generation - before.generation;
    const verifies = piv.applet.stats.pinVerifies - before.verifies;
    expect(sessions).toBeGreaterThanOrEqual(1);
    expect(verifies).toBeGreaterThanOrEqual(1);
    expect(verifies).toBeLessThanOrEqual(sessions);
    const codes = [...figures.byCode].map(([c, n]) => `${c} ×${n}`).join(', ');
    console.log(`faults: pcscd restarted under load: ${figures.calls} calls, ${figures.failed} failed typed${codes ? ` (${codes})` : ''}, ${figures.succeeded} succeeded and verified; PIV: ${sessions} new card session${sessions === 1 ? '' : 's'}, ${verifies} PIN VERIFY${verifies === 1 ? '' : 's'}`);
  });
});
