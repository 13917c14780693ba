/**
 * Stress on every simulator the run has (SEAL_SOFTHSM_URI, SEAL_TPM_URI, SEAL_PIV_URI,
 * SEAL_IOTSAFE_URI, SEAL_MODEM_URI): N concurrent clients on one environment, each picking a
 * random operation among those the environment's capabilities offer — signatures (verified by
 * node:crypto against the key's SPKI, and by key.verify, which must refuse a changed message),
 * RSA-OAEP and AES-GCM round trips with one side on the host, HMAC against node:crypto (keys
 * brought in by RSA-OAEP unwrap, so their value is known), ECDH secrets against node:crypto, and
 * random bytes (never the same 32 bytes twice) — for a bounded time. Every result is checked;
 * there must be no error at all.
 *
 * Afterwards nothing is left behind: on PKCS#11 the sessions of the token are counted with
 * C_GetSessionInfo over every handle the module has handed out (another environment keeps the
 * module loaded) and must be back to what they were; on the TPM (the simulator's shared swtpm, no
 * resource manager) no transient object or session may be there that was not there before.
 * Resident memory before and after (after a GC) is printed, not asserted. Lines start with
 * `stress:`. Card keys go where `containerFor()` says, with `replace: true` (the simulator's cards).
 */
import {
  constants,
  createCipheriv,
  createDecipheriv,
  createHmac,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  publicEncrypt,
  randomBytes,
  randomInt,
  verify as nodeVerify,
  type KeyObject,
} from 'node:crypto';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Handle, PKCS11 } from 'pkcs11js';
import { describe, expect, it } from 'vitest';
import { openEnvironment, SealUri, type KeyAlgorithmInput, type KeyHandle, type KeyUsage, type SecureEnvironment } from '../../src/index.js';
import { tpmHandles } from '../helpers/swtpm.js';

interface Target {
  variable: string;
  name: string;
  clients: number;
  ms: number;
}

const TARGETS: Target[] = [
  { variable: 'SEAL_SOFTHSM_URI', name: 'SoftHSM2', clients: 12, ms: 8000 },
  { variable: 'SEAL_TPM_URI', name: 'TPM (swtpm)', clients: 6, ms: 8000 },
  { variable: 'SEAL_PIV_URI', name: 'PIV card', clients: 4, ms: 5000 },
  { variable: 'SEAL_IOTSAFE_URI', name: 'IoT SAFE (PC/SC)', clients: 4, ms: 5000 },
  { variable: 'SEAL_MODEM_URI', name: 'IoT SAFE (modem)', clients: 4, ms: 5000 },
];
const PRESENT = TARGETS.filter((t) => process.env[t.variable]);

/**
 * EMPTY_INPUT: messages here are 1 byte or more. On PKCS#11 (SoftHSM2 2.6) an empty message fails
 * single-part HMAC, Ed25519 and AES-GCM encryption with DEVICE_ERROR (CKR_ARGUMENTS_BAD): the
 * empty Buffer reaches the module as a NULL data pointer. That is a product bug of its own, not
 * load: it is left out of the mix so that the mix measures concurrency.
 */

/** A GC when the process allows one (vitest workers start without --expose-gc). */
const gc: (() => void) | undefined = (() => {
  try {
    setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return undefined;
  }
})();
const rssMb = (): number => {
  gc?.();
  return process.memoryUsage().rss / 1e6;
};

/** One operation of the mix: does it and checks the result, throwing on any mismatch. */
interface Op {
  name: string;
  run(): Promise<void>;
}

const spki = (k: KeyHandle): KeyObject => createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' });
const flip = (b: Buffer): Buffer => {
  const c = Buffer.from(b);
  c[randomInt(c.length)]! ^= 0x01;
  return c;
};
function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`checker: ${what}`);
}

/** The operations an environment offers, each with the keys it needs (made here, destroyed in `cleanup`). */
async function buildOps(env: SecureEnvironment, run: string): Promise<{ ops: Op[]; cleanup: () => Promise<void> }> {
  const scheme = SealUri.parse(env.uri).scheme;
  const can = (algorithm: string, operation: string, result?: string): boolean =>
    env.capabilities.some((c) => c.algorithm === algorithm && c.operation === operation && (result === undefined || c.result === result));
  const fixed = env.traits?.fixedContainers === true;
  const made: KeyHandle[] = [];
  let seq = 0;
  const generate = async (algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<KeyHandle> => {
    const label = fixed ? await env.containerFor!(algorithm, usages) : `${run}-${++seq}`;
    const key = await env.generateKey({ label, algorithm, usages, ...(fixed ? { replace: true } : {}) });
    if (!fixed) made.push(key);
    return key;
  };
  const ops: Op[] = [];

  const signOps = (key: KeyHandle, name: string, hash: string | null, variants: Array<Record<string, unknown>>): void => {
    const pub = spki(key);
    for (const v of variants) {
      ops.push({
        name: `${name}${v.format ? ` ${String(v.format)}` : v.scheme ? ` ${String(v.scheme)}` : ''}`,
        run: async () => {
          const msg = randomBytes(randomInt(1, 300));
          const sig = await key.sign(msg, v);
          const nodeKey = v.scheme === 'RSA-PSS' ? { key: pub, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_AUTO } : v.format === 'p1363' ? { key: pub, dsaEncoding: 'ieee-p1363' as const } : pub;
          check(nodeVerify(hash, msg, nodeKey, sig), `${name}: node:crypto does not verify the signature`);
          check(await key.verify(msg, sig, v), `${name}: key.verify refuses a good signature`);
          check(!(await key.verify(flip(msg), sig, v)), `${name}: key.verify accepts a changed message`);
        },
      });
    }
  };

  for (const curve of ['P-256', 'P-384'] as const) {
    if (!can(`ECDSA ${curve}`, 'generate') || !can(`ECDSA ${curve}`, 'sign')) continue;
    // IoT SAFE containers sign over SHA-256 only; P-384 would be a PIV or PKCS#11 key
    const key = await generate({ name: 'ECDSA', namedCurve: curve }, ['sign', 'verify']);
    signOps(key, `ECDSA ${curve}`, curve === 'P-256' ? 'sha256' : 'sha384', [{ format: 'der' }, { format: 'p1363' }]);
  }
  if (can('Ed25519', 'generate') && can('Ed25519', 'sign')) {
    signOps(await generate({ name: 'Ed25519' }, ['sign', 'verify']), 'Ed25519', null, [{}]);
  }
  let rsa: KeyHandle | undefined;
  if (can('RSA-2048', 'generate') && (can('RSA-2048', 'sign') || can('RSA-2048', 'decrypt'))) {
    const usages: KeyUsage[] = [];
    if (can('RSA-2048', 'sign')) usages.push('sign', 'verify');
    if (can('RSA-2048', 'decrypt')) usages.push('decrypt', 'encrypt');
    if (can('RSA-2048', 'unwrap', 'key-inside') && scheme === 'pkcs11') usages.push('unwrapKey');
    rsa = await generate({ name: 'RSA', modulusLength: 2048 }, usages);
    if (usages.includes('sign')) signOps(rsa, 'RSA-2048', 'sha256', [{ scheme: 'RSASSA-PKCS1-v1_5' }, { scheme: 'RSA-PSS' }]);
    if (usages.includes('decrypt')) {
      const key = rsa;
      const pub = spki(key);
      ops.push({
        name: 'RSA-OAEP decrypt',
        run: async () => {
          const secret = randomBytes(randomInt(1, 86));
          const ct = publicEncrypt({ key: pub, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' }, secret);
          check((await key.decrypt(ct)).equals(secret), 'RSA-OAEP: decrypted inside differs from what node:crypto encrypted');
        },
      });
    }
  }
  // secret keys with a known value: unwrapped (RSA-OAEP) into the module as session objects
  if (rsa && rsa.usages.includes('unwrapKey')) {
    const unwrap = async (value: Buffer, algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<KeyHandle> =>
      rsa!.unwrapKey(publicEncrypt({ key: spki(rsa!), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' }, value), { wrapAlgorithm: 'RSA-OAEP', algorithm, usages });
    if (can('AES-256', 'encrypt') && can('AES-256', 'decrypt')) {
      const raw = randomBytes(32);
      const aes = await unwrap(raw, { name: 'AES', length: 256 }, ['encrypt', 'decrypt']);
      ops.push({
        name: 'AES-GCM encrypt inside, decrypt on host',
        run: async () => {
          const msg = randomBytes(randomInt(1, 500)); // not empty: see EMPTY_INPUT
          const aad = randomBytes(16);
          const { ciphertext, iv } = await aes.encrypt(msg, { additionalData: aad });
          const d = createDecipheriv('aes-256-gcm', raw, iv!);
          d.setAAD(aad);
          d.setAuthTag(ciphertext.subarray(ciphertext.length - 16));
          check(Buffer.concat([d.update(ciphertext.subarray(0, ciphertext.length - 16)), d.final()]).equals(msg), 'AES-GCM: node:crypto decrypts something else');
        },
      });
      ops.push({
        name: 'AES-GCM encrypt on host, decrypt inside',
        run: async () => {
          const msg = randomBytes(randomInt(1, 500)); // not empty: see EMPTY_INPUT
          const iv = randomBytes(12);
          const c = createCipheriv('aes-256-gcm', raw, iv);
          const ct = Buffer.concat([c.update(msg), c.final(), c.getAuthTag()]);
          check((await aes.decrypt(ct, { iv })).equals(msg), 'AES-GCM: decrypted inside differs');
        },
      });
    }
    if (can('HMAC SHA-256', 'sign')) {
      const raw = randomBytes(32);
      const hmac = await unwrap(raw, { name: 'HMAC', hash: 'SHA-256' }, ['sign', 'verify']);
      ops.push({
        name: 'HMAC-SHA-256',
        run: async () => {
          const msg = randomBytes(randomInt(1, 500)); // not empty: see EMPTY_INPUT
          const mac = await hmac.mac(msg);
          check(mac.equals(createHmac('sha256', raw).update(msg).digest()), 'HMAC: differs from node:crypto');
          check(await hmac.verify(msg, mac), 'HMAC: key.verify refuses a good MAC');
        },
      });
    }
  } else if (can('HMAC SHA-256', 'generate') && can('HMAC SHA-256', 'sign')) {
    // a key made inside (TPM): the value is unknown, so the check is that the module is a function —
    // the same message always gives the same MAC, whatever runs beside it
    const hmac = await generate({ name: 'HMAC', hash: 'SHA-256' }, ['sign', 'verify']);
    const fixedMessages = Array.from({ length: 4 }, () => randomBytes(64));
    const first = await Promise.all(fixedMessages.map((m) => hmac.mac(m)));
    check(new Set(first.map((m) => m.toString('hex'))).size === first.length, 'HMAC: different messages gave the same MAC');
    ops.push({
      name: 'HMAC-SHA-256 (deterministic)',
      run: async () => {
        const i = randomInt(fixedMessages.length);
        const mac = await hmac.mac(fixedMessages[i]!);
        check(mac.equals(first[i]!), 'HMAC: the same message gave another MAC');
        check(await hmac.verify(fixedMessages[i]!, mac), 'HMAC: key.verify refuses a good MAC');
      },
    });
  }
  if (can('ECDH P-256', 'generate') && can('ECDH P-256', 'agree', 'secret-leaves')) {
    const key = await generate({ name: 'ECDH', namedCurve: 'P-256' }, ['deriveKey']);
    const pub = spki(key);
    ops.push({
      name: 'ECDH P-256 shared secret',
      run: async () => {
        const peer = generateKeyPairSync('ec', { namedCurve: 'P-256' });
        const z = await key.sharedSecret(peer.publicKey.export({ type: 'spki', format: 'der' }), 'secret-leaves-module');
        check(z.equals(diffieHellman({ privateKey: peer.privateKey, publicKey: pub })), 'ECDH: differs from node:crypto');
      },
    });
  }
  // random: offered by every backend here; 32 bytes never repeat (and are never all zero)
  const seen = new Set<string>();
  ops.push({
    name: 'random',
    run: async () => {
      const r = await env.random(32);
      check(r.length === 32, 'random: wrong length');
      const hex = r.toString('hex');
      check(!seen.has(hex) && !/^(00)+$/.test(hex), 'random: a repeated or all-zero block');
      seen.add(hex);
    },
  });

  return {
    ops,
    cleanup: async () => {
      for (const k of made.reverse()) await k.destroy();
    },
  };
}

/** `clients` loops picking random ops until `ms` have passed; every failure is collected, not thrown. */
async function hammer(ops: Op[], clients: number, ms: number): Promise<{ counts: Map<string, number>; errors: string[]; total: number }> {
  const counts = new Map<string, number>(ops.map((o) => [o.name, 0]));
  const errors: string[] = [];
  const end = Date.now() + ms;
  let total = 0;
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (Date.now() < end) {
        const op = ops[randomInt(ops.length)]!;
        try {
          await op.run();
          counts.set(op.name, counts.get(op.name)! + 1);
          total++;
        } catch (e) {
          const err = e as { code?: string; backendCode?: string; message?: string };
          errors.push(`${op.name}: ${err.code ?? 'Error'}${err.backendCode ? ` (${err.backendCode})` : ''}: ${err.message ?? String(e)}`);
          if (errors.length > 50) return;
        }
      }
    }),
  );
  return { counts, errors, total };
}

/** PKCS#11 sessions open on `slot` in this process: C_GetSessionInfo over every handle handed out so far. */
function openSessions(lib: PKCS11, slot: Handle): number {
  // SoftHSM2 numbers sessions upwards: a new one shows the highest handle yet
  const mark = lib.C_OpenSession(slot, 4 /* CKF_SERIAL_SESSION */);
  const highest = Number(mark.readBigUInt64LE(0));
  lib.C_CloseSession(mark);
  const id = (v: unknown): string => (Buffer.isBuffer(v) ? v.toString('hex') : String(v));
  let open = 0;
  for (let i = 1; i < highest; i++) {
    const h = Buffer.alloc(8);
    h.writeBigUInt64LE(BigInt(i));
    let info;
    try {
      info = lib.C_GetSessionInfo(h);
    } catch {
      continue; // CKR_SESSION_HANDLE_INVALID: closed
    }
    if (id(info.slotID) === id(slot)) open++;
  }
  return open;
}

describe('stress: concurrent clients on every simulator', () => {
  // figures are printed before the assertions, so a failing case shows them too
  const report = (line: string): void => console.log(line);

  it('has at least one environment to stress', () => {
    expect(PRESENT.length, 'no SEAL_*_URI is set: run through npm test or eval "$(scripts/sim start)"').toBeGreaterThan(0);
  });

  it.each(PRESENT)('$name: $clients clients for $ms ms, a random mix of what the capabilities offer, every result checked, no error, nothing left behind', async (t) => {
    const uri = process.env[t.variable]!;
    const scheme = SealUri.parse(uri).scheme;
    const run = `stress-${randomBytes(3).toString('hex')}`;
    // PKCS#11: a second environment on the token keeps the module loaded after ours is closed
    const holder = scheme === 'pkcs11' ? await openEnvironment(uri) : undefined;
    const p11 = holder ? (holder as unknown as { pool: { lib: PKCS11; slot: Handle } }).pool : undefined;
    const tcti = scheme === 'tpm2' ? requireTcti(uri) : undefined;
    try {
      const sessionsBefore = p11 ? openSessions(p11.lib, p11.slot) : 0;
      const handlesBefore = tcti ? { objects: tpmHandles(tcti, 'handles-transient'), sessions: tpmHandles(tcti, 'handles-loaded-session') } : undefined;
      const rss = [rssMb()];
      const env = await openEnvironment(uri);
      let stats = '';
      let sessionsDuring = 0;
      let objectsDuring = 0;
      const result = { counts: new Map<string, number>(), errors: [] as string[], total: 0 };
      try {
        const { ops, cleanup } = await buildOps(env, run);
        try {
          // two halves, with the resident size between them: growth that goes on is a leak, a step is not
          for (const half of [0, 1]) {
            const r = await hammer(ops, t.clients, t.ms / 2);
            for (const [n, c] of r.counts) result.counts.set(n, (result.counts.get(n) ?? 0) + c);
            result.errors.push(...r.errors);
            result.total += r.total;
            rss.push(rssMb());
            if (half === 1 && p11) sessionsDuring = openSessions(p11.lib, p11.slot);
            if (half === 1 && tcti) objectsDuring = tpmHandles(tcti, 'handles-transient').length;
          }
        } finally {
          await cleanup();
        }
        const pool = (env as unknown as { pool?: { stats: Record<string, number> } }).pool;
        if (pool) stats = `; pool: ${pool.stats.sessionsOpened} sessions opened, ${pool.stats.sessionsDiscarded} discarded, ${pool.stats.retries} retries, ${pool.stats.timeouts} timeouts`;
      } finally {
        await env.close();
      }
      rss.push(rssMb());
      const perOp = [...result.counts].map(([n, c]) => `${n} ${c}`).join(', ');
      report(`stress: ${t.name}: ${t.clients} clients, ${(t.ms / 1000).toFixed(0)} s: ${result.total} operations checked (${(result.total / (t.ms / 1000)).toFixed(0)}/s), ${result.errors.length} errors${stats}`);
      report(`stress: ${t.name}: ${perOp}`);
      expect(result.errors).toEqual([]);
      for (const [name, count] of result.counts) expect(count, `${name} ran at least once`).toBeGreaterThan(0);
      if (p11) {
        const after = openSessions(p11.lib, p11.slot);
        report(`stress: ${t.name}: sessions on the token (C_GetSessionInfo) ${sessionsBefore} before, ${sessionsDuring} while open, ${after} after close`);
        expect(sessionsDuring, 'the count sees the environment\'s own sessions').toBeGreaterThan(sessionsBefore);
        expect(after).toBe(sessionsBefore);
      }
      if (tcti && handlesBefore) {
        const objects = tpmHandles(tcti, 'handles-transient');
        const sessions = tpmHandles(tcti, 'handles-loaded-session');
        report(`stress: ${t.name}: TPM transient objects ${handlesBefore.objects.length} before, ${objectsDuring} while open, ${objects.length} after close; loaded sessions ${handlesBefore.sessions.length} before, ${sessions.length} after`);
        expect(objectsDuring, 'tpm2_getcap sees the environment\'s own objects').toBeGreaterThan(handlesBefore.objects.length);
        expect(objects.filter((h) => !handlesBefore.objects.includes(h)), 'transient objects left by this environment').toEqual([]);
        expect(sessions.filter((h) => !handlesBefore.sessions.includes(h)), 'sessions left by this environment').toEqual([]);
      }
      const mb = (v: number): string => `${v >= 0 ? '+' : ''}${v.toFixed(1)}`;
      report(`stress: ${t.name}: resident memory ${rss[0]!.toFixed(0)} MB before, ${mb(rss[1]! - rss[0]!)} MB after the first half, ${mb(rss[2]! - rss[1]!)} MB in the second half, ${rss[3]!.toFixed(0)} MB after close (${mb(rss[3]! - rss[0]!)} MB${gc ? ', each after a GC' : ', no GC available'})`);
    } finally {
      await holder?.close();
    }
  });
});

function requireTcti(uri: string): string {
  const tcti = SealUri.parse(uri).query('tcti');
  if (!tcti) throw new Error('SEAL_TPM_URI names no tcti');
  return tcti;
}
