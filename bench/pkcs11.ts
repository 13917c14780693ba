/**
 * PKCS#11 on SoftHSM2 (the simulator token of scripts/sim): seal-bridge against raw pkcs11js in
 * the same process, on the same token and the same key — one call at a time, 1,000 calls in
 * flight, RSA-2048, AES-GCM 1 KiB, ECDH and HMAC — and against node-webcrypto-p11 under the same
 * concurrent load (its failures counted), `openssl speed ecdsap256` as the one-core ceiling of the
 * arithmetic, and resident memory over many signatures.
 *
 * The raw anchors are what a careful hand-written caller does: one session, C_SignInit + C_Sign
 * (synchronous), the digest computed in Node like seal-bridge does; and pkcs11js' *Async calls
 * over four sessions.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import pkcs11 from 'pkcs11js';
import type { Handle, Mechanism } from 'pkcs11js';
import { openEnvironment } from '../src/index.js';
import type { KeyHandle, SecureEnvironment } from '../src/index.js';
import { concurrent, fromCount, runSync, sequential, takeTurns, type Measurement, type Row } from './lib.js';

const IN_FLIGHT = 1000;

interface Raw {
  lib: pkcs11.PKCS11;
  slot: Handle;
  session: Handle;
  find(label: string, cls: number): Handle;
}

/** Raw pkcs11js on the module seal-bridge already initialized (C_Initialize answers ALREADY_INITIALIZED). */
function openRaw(modulePath: string, tokenLabel: string): Raw {
  const lib = new pkcs11.PKCS11();
  lib.load(modulePath);
  try {
    lib.C_Initialize({ flags: pkcs11.CKF_OS_LOCKING_OK });
  } catch (e) {
    if (!String((e as Error).message).startsWith('CKR_CRYPTOKI_ALREADY_INITIALIZED')) throw e;
  }
  const slot = lib.C_GetSlotList(true).find((s) => lib.C_GetTokenInfo(s).label.trim() === tokenLabel);
  if (!slot) throw new Error(`token ${tokenLabel} not found`);
  // seal-bridge's environment is logged in: every session of the process shares that login
  const session = lib.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
  const find = (label: string, cls: number): Handle => {
    lib.C_FindObjectsInit(session, [{ type: pkcs11.CKA_CLASS, value: cls }, { type: pkcs11.CKA_LABEL, value: label }]);
    const [h] = lib.C_FindObjects(session, 1);
    lib.C_FindObjectsFinal(session);
    if (!h) throw new Error(`object ${label} not found`);
    return h;
  };
  return { lib, slot, session, find };
}

/** Loops `op` synchronously for `seconds` (it blocks the event loop, as raw synchronous pkcs11js does). */
function syncLoop(seconds: number, op: () => void): Measurement {
  const start = performance.now();
  const end = start + seconds * 1000;
  let n = 0;
  let now = start;
  while (now < end) {
    for (let i = 0; i < 16; i++) op();
    n += 16;
    now = performance.now();
  }
  return fromCount(n, (now - start) / 1000);
}

function row(name: string, m: { anchor: Measurement; seal: Measurement }, anchor: string, target?: number, note?: string): Row {
  return { case: name, seal: m.seal, anchor, anchorResult: m.anchor, ratio: m.seal.opsPerSecond / m.anchor.opsPerSecond, ...(target !== undefined ? { target } : {}), ...(note ? { note } : {}) };
}

/** pkcs11js *Async calls over `n` sessions, C_SignInit on the event loop before each. */
function asyncSigner(raw: Raw, key: Handle, n: number): () => Promise<Buffer> {
  const free = Array.from({ length: n }, () => raw.lib.C_OpenSession(raw.slot, pkcs11.CKF_SERIAL_SESSION));
  const waiting: Array<(s: Handle) => void> = [];
  return async () => {
    const s = free.pop() ?? (await new Promise<Handle>((r) => waiting.push(r)));
    try {
      const digest = createHash('sha256').update(MESSAGE).digest();
      raw.lib.C_SignInit(s, { mechanism: pkcs11.CKM_ECDSA }, key);
      return await raw.lib.C_SignAsync(s, digest, Buffer.alloc(64));
    } finally {
      const w = waiting.shift();
      if (w) w(s);
      else free.push(s);
    }
  };
}

const MESSAGE = Buffer.from('benchmark message');

/** node-webcrypto-p11 on the same token: sign with 1,000 calls in flight, failures counted. */
async function webcryptoCase(seconds: number, modulePath: string, raw: Raw, pin: string): Promise<Measurement & { error?: string }> {
  const { Crypto } = await import('node-webcrypto-p11');
  const slotIndex = raw.lib.C_GetSlotList(true).findIndex((s) => s.equals(raw.slot));
  const crypto = new Crypto({ library: modulePath, slot: slotIndex, readWrite: true, pin });
  const alg = { name: 'ECDSA', namedCurve: 'P-256' };
  const keys = (await crypto.subtle.generateKey(alg, false, ['sign', 'verify'])) as { privateKey: Parameters<typeof crypto.subtle.sign>[1] };
  const sign = { name: 'ECDSA', hash: 'SHA-256' };
  return concurrent(seconds, IN_FLIGHT, () => crypto.subtle.sign(sign, keys.privateKey, MESSAGE));
}

function opensslSpeed(seconds: number): Measurement | undefined {
  const r = runSync('openssl', ['speed', '-seconds', String(Math.max(1, Math.round(seconds))), 'ecdsap256']);
  const m = /256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)/.exec(r.stdout);
  return m ? fromCount(Number(m[1]) * seconds, seconds) : undefined;
}

function rss(): number {
  (globalThis as { gc?: () => void }).gc?.();
  return process.memoryUsage().rss;
}

export async function pkcs11Cases(seconds: number, options: { memorySigns: number }): Promise<Row[]> {
  const uri = process.env.SEAL_SOFTHSM_URI;
  const modulePath = process.env.SEAL_SOFTHSM_MODULE;
  if (!uri || !modulePath) throw new Error('SEAL_SOFTHSM_URI and SEAL_SOFTHSM_MODULE are not set (bench/run.ts starts the simulators)');
  const rows: Row[] = [];
  const env: SecureEnvironment = await openEnvironment(uri);
  const tag = `bench-${randomBytes(4).toString('hex')}`;
  const keys: KeyHandle[] = [];
  const make = async (name: string, algorithm: Parameters<SecureEnvironment['generateKey']>[0]['algorithm'], usages: Parameters<SecureEnvironment['generateKey']>[0]['usages']): Promise<KeyHandle> => {
    const k = await env.generateKey({ label: `${tag}-${name}`, algorithm, usages });
    keys.push(k);
    return k;
  };
  try {
    const raw = openRaw(modulePath, env.info.label);
    const pinFile = /pin-source=file:([^&]+)/.exec(uri)?.[1];
    const pin = pinFile ? readFileSync(decodeURIComponent(pinFile), 'utf8').trim() : undefined;

    // ECDSA P-256: the main case
    const ec = await make('ec', { name: 'ECDSA', namedCurve: 'P-256' }, ['sign', 'verify']);
    const ecHandle = raw.find(ec.label, pkcs11.CKO_PRIVATE_KEY);
    const rawEcdsa = (): void => {
      const digest = createHash('sha256').update(MESSAGE).digest();
      raw.lib.C_SignInit(raw.session, { mechanism: pkcs11.CKM_ECDSA }, ecHandle);
      raw.lib.C_Sign(raw.session, digest, Buffer.alloc(64));
    };
    const sign = (): Promise<Buffer> => ec.sign(MESSAGE);
    await concurrent(0.5, IN_FLIGHT, sign); // threads started, sessions open
    const seq = await takeTurns(seconds, { anchor: (t) => syncLoop(t, rawEcdsa), seal: (t) => sequential(t, sign) });
    rows.push(row('PKCS#11 ECDSA P-256 sign, one call at a time', seq, 'raw pkcs11js C_SignInit+C_Sign, one session (sync)', 0.95,
      'each call crosses to a worker thread and back; a synchronous call on the event loop has no such hop'));
    const flight = await takeTurns(seconds, { anchor: (t) => syncLoop(t, rawEcdsa), seal: (t) => concurrent(t, IN_FLIGHT, sign) });
    rows.push(row(`PKCS#11 ECDSA P-256 sign, ${IN_FLIGHT} in flight`, flight, 'raw pkcs11js C_SignInit+C_Sign, one session (sync)', 1.5));
    const signAsync = asyncSigner(raw, ecHandle, 4);
    const flightAsync = await takeTurns(seconds, { anchor: (t) => concurrent(t, IN_FLIGHT, signAsync), seal: (t) => concurrent(t, IN_FLIGHT, sign) });
    rows.push(row(`PKCS#11 ECDSA P-256 sign, ${IN_FLIGHT} in flight`, flightAsync, `raw pkcs11js *Async, 4 sessions, ${IN_FLIGHT} in flight`));
    if (pin) {
      try {
        const wc = await webcryptoCase(seconds, modulePath, raw, pin);
        rows.push({ case: `PKCS#11 ECDSA P-256 sign, ${IN_FLIGHT} in flight`, seal: flight.seal, anchor: `node-webcrypto-p11, ${IN_FLIGHT} in flight (failures: ${wc.failures ?? 0})`, anchorResult: wc, ratio: flight.seal.opsPerSecond / Math.max(wc.opsPerSecond, 1e-9) });
      } catch (e) {
        rows.push({ case: `PKCS#11 ECDSA P-256 sign, ${IN_FLIGHT} in flight`, seal: flight.seal, anchor: 'node-webcrypto-p11', note: `could not run: ${(e as Error).message.slice(0, 120)}` });
      }
    }
    const speed = opensslSpeed(seconds);
    if (speed) rows.push({ case: `PKCS#11 ECDSA P-256 sign, ${IN_FLIGHT} in flight`, seal: flight.seal, anchor: 'openssl speed ecdsap256 (one core, no module)', anchorResult: speed, ratio: flight.seal.opsPerSecond / speed.opsPerSecond });

    // the other mechanisms: one at a time and 64 in flight, against the raw synchronous loop
    const rsa = await make('rsa', { name: 'RSA', modulusLength: 2048 }, ['sign', 'verify']);
    const rsaHandle = raw.find(rsa.label, pkcs11.CKO_PRIVATE_KEY);
    const digestInfo = Buffer.concat([Buffer.from('3031300d060960864801650304020105000420', 'hex'), createHash('sha256').update(MESSAGE).digest()]);
    const rawRsa = (): void => {
      raw.lib.C_SignInit(raw.session, { mechanism: pkcs11.CKM_RSA_PKCS }, rsaHandle);
      raw.lib.C_Sign(raw.session, digestInfo, Buffer.alloc(256));
    };
    const aes = await make('aes', { name: 'AES', length: 256 }, ['encrypt', 'decrypt']);
    const aesHandle = raw.find(aes.label, pkcs11.CKO_SECRET_KEY);
    const kib = randomBytes(1024);
    const rawGcm = (): void => {
      const mech: Mechanism = { mechanism: pkcs11.CKM_AES_GCM, parameter: { type: pkcs11.CK_PARAMS_AES_GCM_v240, iv: randomBytes(12), ivBits: 96, tagBits: 128 } as pkcs11.AesGCM };
      raw.lib.C_EncryptInit(raw.session, mech, aesHandle);
      raw.lib.C_Encrypt(raw.session, kib, Buffer.alloc(1024 + 16));
    };
    const hmac = await make('hmac', { name: 'HMAC', hash: 'SHA-256' }, ['sign', 'verify']);
    const hmacHandle = raw.find(hmac.label, pkcs11.CKO_SECRET_KEY);
    const rawHmac = (): void => {
      raw.lib.C_SignInit(raw.session, { mechanism: pkcs11.CKM_SHA256_HMAC }, hmacHandle);
      raw.lib.C_Sign(raw.session, MESSAGE, Buffer.alloc(32));
    };
    const cases: Array<[string, () => void, () => Promise<unknown>]> = [
      ['RSA-2048 PKCS#1 v1.5 sign', rawRsa, () => rsa.sign(MESSAGE)],
      ['AES-256-GCM encrypt 1 KiB', rawGcm, () => aes.encrypt(kib)],
      ['HMAC-SHA-256 (17 bytes)', rawHmac, () => hmac.mac(MESSAGE)],
    ];
    for (const [name, rawOp, sealOp] of cases) {
      await concurrent(0.2, 64, sealOp);
      rows.push(row(`PKCS#11 ${name}, one call at a time`, await takeTurns(seconds, { anchor: (t) => syncLoop(t, rawOp), seal: (t) => sequential(t, sealOp) }), 'raw pkcs11js, one session (sync)'));
      rows.push(row(`PKCS#11 ${name}, 64 in flight`, await takeTurns(seconds, { anchor: (t) => syncLoop(t, rawOp), seal: (t) => concurrent(t, 64, sealOp) }), 'raw pkcs11js, one session (sync)'));
    }

    // ECDH: derive an AES key inside from a peer's point, then destroy it
    const ecdh = await make('ecdh', { name: 'ECDH', namedCurve: 'P-256' }, ['deriveKey']);
    const ecdhHandle = raw.find(ecdh.label, pkcs11.CKO_PRIVATE_KEY);
    const { generateKeyPairSync } = await import('node:crypto');
    const peer = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'der', type: 'spki' });
    const point = peer.subarray(peer.length - 65);
    const rawEcdh = (): void => {
      const mech: Mechanism = { mechanism: pkcs11.CKM_ECDH1_DERIVE, parameter: { type: pkcs11.CK_PARAMS_EC_DH, kdf: pkcs11.CKD_NULL, publicData: point } as pkcs11.ECDH1 };
      const h = raw.lib.C_DeriveKey(raw.session, mech, ecdhHandle, [
        { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY }, { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_AES }, { type: pkcs11.CKA_VALUE_LEN, value: 32 },
        { type: pkcs11.CKA_TOKEN, value: false }, { type: pkcs11.CKA_SENSITIVE, value: true }, { type: pkcs11.CKA_EXTRACTABLE, value: false },
        { type: pkcs11.CKA_ENCRYPT, value: true }, { type: pkcs11.CKA_DECRYPT, value: true },
      ]);
      raw.lib.C_DestroyObject(raw.session, h);
    };
    const sealEcdh = async (): Promise<void> => {
      const k = await ecdh.agree(peer, { algorithm: { name: 'AES', length: 256 }, usages: ['encrypt', 'decrypt'] });
      await k.destroy();
    };
    rows.push(row('PKCS#11 ECDH P-256 agree into an AES key (and destroy it), one at a time', await takeTurns(seconds, { anchor: (t) => syncLoop(t, rawEcdh), seal: (t) => sequential(t, sealEcdh) }), 'raw pkcs11js C_DeriveKey + C_DestroyObject (sync)', undefined,
      'derivation creates a key object: it runs through pkcs11js C_DeriveKeyAsync (a libuv hop) on the anchor session, where a session key lives as long as the login, not on the worker threads; destroy is a second call'));

    // resident memory over many signatures
    for (let i = 0; i < 3; i++) await concurrent(1, IN_FLIGHT, sign);
    const before = rss();
    let done = 0;
    const t0 = performance.now();
    await Promise.all(Array.from({ length: IN_FLIGHT }, async () => {
      while (done < options.memorySigns) {
        done++;
        await sign();
      }
    }));
    const secs = (performance.now() - t0) / 1000;
    const growth = (rss() - before) / (1024 * 1024);
    rows.push({ case: `PKCS#11 resident-set growth over ${options.memorySigns.toLocaleString('en')} signs (${IN_FLIGHT} in flight)`, seal: fromCount(done, secs), note: `RSS growth ${growth.toFixed(1)} MiB (target < 20 MiB over 1,000,000)`, growthMiB: growth });
    raw.lib.C_CloseSession(raw.session);
  } finally {
    for (const k of keys) await k.destroy().catch(() => undefined);
    await env.close();
  }
  return rows;
}
