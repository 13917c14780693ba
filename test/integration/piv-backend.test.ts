/**
 * The `pcsc:` backend with the PIV driver against the simulator's virtual PIV card (pcscd + vpcd,
 * nothing of the hardware layer mocked). Expected values come from node:crypto, openssl,
 * OpenSC's opensc-tool (PIN counter through an empty VERIFY), yubico-piv-tool (certificates,
 * unblocking) and the specifications — never from the code under test.
 *
 * Slots used: 9A (P-256), 9C (P-384, PIN policy "always"), 9D (RSA-2048), 9E (P-256), 82 and 83 (ECDH P-256 /
 * P-384); keys there are replaced. The PIN counter is full again and the management key is the
 * card's original 3DES key when the file ends.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import {
  X509Certificate,
  constants,
  createCipheriv,
  createDecipheriv,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  publicEncrypt,
  randomBytes,
  randomInt,
  verify as nodeVerify,
} from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireEnv } from '../helpers/env.js';
import { expectSealError as sealError } from '../helpers/errors.js';
import { insertCard, removeCard } from '../helpers/cards.js';
import { openEnvironment, SealUri, type KeyHandle } from '../../src/index.js';
import type { PivEnvironment, PivGenerateKeySpec } from '../../src/backends/pcsc/index.js';
import { commandApdu, expectOk } from '../../src/backends/pcsc/apdu.js';
import { findTag, parseBerTlv, requireTag } from '../../src/backends/pcsc/tlv.js';
import { openPcscTransport, type PcscTransport } from '../../src/backends/pcsc/pcsc-transport.js';
import { PivApplet, parseSlot, type GenerationalTransport } from '../../src/backends/pcsc/piv.js';
import { PivKey } from '../../src/backends/pcsc/key.js';
import type { CardChannel } from '../../src/backends/pcsc/transport.js';

const PIV_AID = Buffer.from('A000000308', 'hex');
const reader = (): string => requireEnv('SEAL_PIV_READER');
const pivDir = (): string => join(requireEnv('SEAL_SIM_DIR'), 'cards', 'piv');
const secretPath = (name: 'piv-pin' | 'piv-puk' | 'piv-mgmt-key' | 'piv-mgmt-alg'): string => join(pivDir(), name);
const secret = (name: 'piv-pin' | 'piv-puk' | 'piv-mgmt-key' | 'piv-mgmt-alg'): string => readFileSync(secretPath(name), 'utf8').replace(/\r?\n$/, '');

/** The environment URI: PIN and management key from the card's 0600 secret files. */
function pivUri(extra: Record<string, string> = {}): string {
  const q = new URLSearchParams({ 'pin-source': `file:${secretPath('piv-pin')}`, 'mgmt-key-source': `file:${secretPath('piv-mgmt-key')}`, ...extra });
  return `pcsc:reader=${encodeURIComponent(reader())};applet=piv?${[...q.entries()].map(([k, v]) => `${k}=${v}`).join('&')}`;
}

function run(cmd: string, args: string[], input = ''): { status: number | null; out: string; stdout: string } {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', timeout: 60_000 });
  if (r.error) throw r.error;
  return { status: r.status, out: `${r.stdout}${r.stderr}`, stdout: r.stdout };
}

/** Status word of an empty VERIFY sent by opensc-tool (SP 800-73-4: 63Cx = x tries left, 6983 = blocked). */
function emptyVerifySw(): string {
  const r = run('opensc-tool', ['-r', reader(), '-s', '00:A4:04:00:05:A0:00:00:03:08', '-s', '00:20:00:80']);
  const sws = [...r.out.matchAll(/SW1=0x([0-9A-F]{2}), SW2=0x([0-9A-F]{2})/gi)].map((m) => `${m[1]}${m[2]}`.toUpperCase());
  expect(sws, r.out).toHaveLength(2);
  expect(sws[0]).toBe('9000');
  return sws[1]!;
}

function triesLeft(): number {
  const sw = emptyVerifySw();
  if (sw === '6983') return 0;
  expect(sw, 'an empty VERIFY answers 63Cx').toMatch(/^63C[0-9A-F]$/);
  return parseInt(sw.slice(3), 16);
}

function wrongPin(): string {
  const pin = secret('piv-pin');
  for (;;) {
    const c = String(randomInt(1_000_000)).padStart(6, '0');
    if (c !== pin) return c;
  }
}


const spki = (k: KeyHandle) => createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' });
const data = Buffer.from('seal-bridge PIV backend test');

describe('pcsc: PIV backend on the virtual PIV card', () => {
  let env: PivEnvironment;
  let work: string;

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), 'seal-piv-'));
    env = (await openEnvironment(pivUri())) as PivEnvironment;
  });

  afterAll(async () => {
    await env?.close();
    rmSync(work, { recursive: true, force: true });
  });

  const generate = (spec: Omit<PivGenerateKeySpec, 'replace'>): Promise<KeyHandle> => env.generateKey({ ...spec, replace: true } as PivGenerateKeySpec);

  it('reports a virtual card honestly and describes its capabilities', async () => {
    expect(env.info.protectionLevel).toBe(1);
    expect(env.info.protectionReason).toContain('virtual reader (vsmartcard)');
    expect(env.info.firmware).toMatch(/^\d+\.\d+\.\d+$/);
    expect(env.info.serial.length).toBeGreaterThan(0);
    const u = SealUri.parse(env.uri);
    expect(u.get('reader')).toBe(reader());
    expect(u.get('applet')).toBe('piv');
    const rows = env.capabilities.map((c) => `${c.algorithm}|${c.operation}|${c.result}`);
    for (const r of ['ECDSA P-256|sign|output', 'ECDSA P-384|sign|output', 'RSA-2048|decrypt|output', 'ECDH P-256|agree|secret-leaves', 'RSA-2048|generate|key-inside']) expect(rows).toContain(r);
    expect(env.capabilities.some((c) => c.operation === 'unwrap' || c.operation === 'derive' || c.operation === 'import-public')).toBe(false);
    // the override is allowed, loudly
    const warnings: string[] = [];
    const onWarning = (w: Error): void => void warnings.push(w.message);
    process.on('warning', onWarning);
    try {
      const forced = await openEnvironment(pivUri({ 'protection-level': '3' }));
      expect(forced.info.protectionLevel).toBe(3);
      await forced.close();
      await new Promise((r) => setImmediate(r));
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings.some((w) => w.includes('protection level'))).toBe(true);
    await sealError(openEnvironment(pivUri(), { minProtectionLevel: 2 }), 'PROTECTION_LEVEL_TOO_LOW');
  });

  it('P-256 in 9A: generated on the card, signs DER and P1363; node:crypto and openssl verify', async () => {
    const key = await generate({ label: '9a', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
    expect(key.label).toBe('9a');
    expect(key.provenance).toMatchObject({ origin: 'generated-inside', alwaysSensitive: true, neverExtractable: true });
    const u = SealUri.parse(key.uri);
    expect(u.get('slot')).toBe('9a');
    expect(u.get('reader')).toBe(reader());
    expect(u.query('pin-source')).toBe(`file:${secretPath('piv-pin')}`);
    expect(key.uri).not.toContain('pin-value');
    const der = await key.sign(data);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, der)).toBe(true);
    const p1363 = await key.sign(data, { format: 'p1363' });
    expect(p1363.length).toBe(64);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'ieee-p1363' }, p1363)).toBe(true);
    expect(await key.verify(data, der)).toBe(true);
    expect(await key.verify(Buffer.from('other'), der)).toBe(false);
    // openssl, once, over files
    writeFileSync(join(work, 'data'), data);
    writeFileSync(join(work, 'sig'), der);
    writeFileSync(join(work, 'pub.pem'), key.publicKeyPem());
    const v = run('openssl', ['dgst', '-sha256', '-verify', join(work, 'pub.pem'), '-signature', join(work, 'sig'), join(work, 'data')]);
    expect(v.out).toContain('Verified OK');
    // re-opened by URI, in another environment, it is the same key
    const again = await env.getKey(key.uri);
    expect(again.publicKey!.equals(key.publicKey!)).toBe(true);
    expect((await env.listKeys()).map((k) => k.label)).toContain('9a');
    expect((await env.listKeys({ id: Buffer.from([0x9a]) })).map((k) => k.id)).toEqual(['9a']);
    const second = await openEnvironment(key.uri);
    try {
      const k2 = await second.getKey(key.uri);
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await k2.sign(data))).toBe(true);
    } finally {
      await second.close();
    }
  });

  it('P-384 in 9C (PIN policy always): every signature verifies, with SHA-384 by default and SHA-256 on request', async () => {
    const key = await generate({ label: 'signature', algorithm: { name: 'ECDSA', namedCurve: 'P-384' }, usages: ['sign'] });
    expect(key.label).toBe('9c');
    for (let i = 0; i < 3; i++) {
      const sig = await key.sign(data);
      expect(nodeVerify('sha384', data, { key: spki(key), dsaEncoding: 'der' }, sig)).toBe(true);
    }
    const sig256 = await key.sign(data, { hash: 'SHA-256', format: 'p1363' });
    expect(sig256.length).toBe(96);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'ieee-p1363' }, sig256)).toBe(true);
    await sealError(key.verify(data, sig256), 'USAGE_NOT_PERMITTED'); // created without 'verify'
  });

  it('RSA-2048 in 9D: PKCS#1 v1.5 and PSS signatures (padding on the host) verify; OAEP decryption round trips', async () => {
    const key = await generate({ label: 'key-management', algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['sign', 'verify', 'encrypt', 'decrypt'] });
    for (const hash of ['SHA-256', 'SHA-384', 'SHA-512'] as const) {
      const node = hash.replace('-', '').toLowerCase();
      const pkcs1 = await key.sign(data, { hash });
      expect(pkcs1.length).toBe(256);
      expect(nodeVerify(node, data, { key: spki(key), padding: constants.RSA_PKCS1_PADDING }, pkcs1), `PKCS#1 ${hash}`).toBe(true);
      const pss = await key.sign(data, { hash, scheme: 'RSA-PSS' });
      expect(nodeVerify(node, data, { key: spki(key), padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_AUTO }, pss), `PSS ${hash}`).toBe(true);
      // salt = hash length by default (RFC 8017 9.1 recommendation), as node:crypto checks it strictly
      expect(nodeVerify(node, data, { key: spki(key), padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: { 'SHA-256': 32, 'SHA-384': 48, 'SHA-512': 64 }[hash] }, pss)).toBe(true);
      expect(await key.verify(data, pss, { hash, scheme: 'RSA-PSS' })).toBe(true);
    }
    const pss0 = await key.sign(data, { scheme: 'RSA-PSS', saltLength: 0 });
    expect(nodeVerify('sha256', data, { key: spki(key), padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 0 }, pss0)).toBe(true);
    // two PSS signatures of the same data differ (random salt); PKCS#1 v1.5 ones are equal
    expect((await key.sign(data, { scheme: 'RSA-PSS' })).equals(await key.sign(data, { scheme: 'RSA-PSS' }))).toBe(false);
    expect((await key.sign(data)).equals(await key.sign(data))).toBe(true);

    const plaintext = randomBytes(100);
    for (const [hash, node] of [['SHA-1', 'sha1'], ['SHA-256', 'sha256']] as const) {
      const ct = publicEncrypt({ key: spki(key), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: node }, plaintext);
      expect((await key.decrypt(ct, { hash })).equals(plaintext), `OAEP ${hash}`).toBe(true);
      const bad = Buffer.from(ct);
      bad[17]! ^= 0x01;
      const e = await sealError(key.decrypt(bad, { hash }), 'DECRYPTION_FAILED');
      expect(e.message).toBe('decryption failed');
    }
    const { ciphertext } = await key.encrypt(plaintext);
    expect((await key.decrypt(ciphertext)).equals(plaintext)).toBe(true);
    await sealError(key.decrypt(randomBytes(100)), 'DECRYPTION_FAILED');
  });

  it('ECDH in retired slots: sharedSecret equals node:crypto; agree() is refused because the secret leaves the card', async () => {
    for (const [slot, curve, nodeCurve] of [['82', 'P-256', 'prime256v1'], ['retired-2', 'P-384', 'secp384r1']] as const) {
      const key = await generate({ label: slot, algorithm: { name: 'ECDH', namedCurve: curve }, usages: ['deriveKey'] });
      expect(key.algorithm).toEqual({ name: 'ECDH', namedCurve: curve });
      const peer = generateKeyPairSync('ec', { namedCurve: nodeCurve });
      const expected = diffieHellman({ privateKey: peer.privateKey, publicKey: spki(key) });
      const z = await key.sharedSecret(peer.publicKey.export({ type: 'spki', format: 'der' }), 'secret-leaves-module');
      expect(z.equals(expected)).toBe(true);
      const pointJwk = peer.publicKey.export({ format: 'jwk' });
      const point = Buffer.concat([Buffer.from([4]), Buffer.from(pointJwk.x!, 'base64url'), Buffer.from(pointJwk.y!, 'base64url')]);
      expect((await key.sharedSecret(point, 'secret-leaves-module')).equals(expected)).toBe(true);
      await sealError(key.sharedSecret(point, 'yes' as 'secret-leaves-module'), 'INVALID_ARGUMENT');
      await sealError(key.agree(point, { algorithm: { name: 'AES', length: 256 }, usages: ['encrypt'] }), 'NOT_SUPPORTED');
      await sealError(key.sign(data), 'USAGE_NOT_PERMITTED');
    }
    // found again by URI, the EC key in a key-management slot is an agreement key
    const again = await env.getKey('retired-1');
    expect(again.algorithm).toEqual({ name: 'ECDH', namedCurve: 'P-256' });
    expect(again.usages).toContain('deriveKey');
  });

  it('certificates: written with PUT DATA, read back, seen by yubico-piv-tool, deleted', async () => {
    const key = await env.getKey('9a');
    // a certificate from an outside tool (openssl); the card stores it, whatever key it names
    const keyFile = join(work, 'ca.key');
    const certFile = join(work, 'cert.der');
    const made = run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=seal-bridge piv test', '-days', '2', '-keyout', keyFile, '-outform', 'DER', '-out', certFile]);
    expect(made.status, made.out).toBe(0);
    const der = readFileSync(certFile);
    const info = await env.writeData('cert-9a', der);
    expect(info).toMatchObject({ label: 'cert-9a', size: der.length });
    expect((await env.readData('cert-9a')).equals(der)).toBe(true);
    expect((await (key as PivKey).certificate())!.equals(der)).toBe(true);
    expect((await env.listData()).map((d) => d.label)).toContain('cert-9a');
    const read = run('yubico-piv-tool', ['-r', reader(), '-a', 'read-certificate', '-s', '9a', '-K', 'DER', '-o', join(work, 'read.der')]);
    expect(read.status, read.out).toBe(0);
    expect(readFileSync(join(work, 'read.der')).equals(der)).toBe(true);
    await env.deleteData('cert-9a');
    await sealError(env.readData('cert-9a'), 'OBJECT_NOT_FOUND');
    await sealError(env.writeData('cert-9a', Buffer.from('not a certificate')), 'INVALID_ARGUMENT');
    await sealError(env.writeData('device-id', der), 'NOT_SUPPORTED');
  });

  it('attestation: a certificate for the generated key, signed by the card attestation key (slot F9)', async () => {
    const key = await env.getKey('9a');
    const att = new X509Certificate(await env.attest('9a'));
    expect(att.publicKey.export({ type: 'spki', format: 'der' }).equals(key.publicKey!)).toBe(true);
    const f9 = run('yubico-piv-tool', ['-r', reader(), '-a', 'read-certificate', '-s', 'f9', '-K', 'DER', '-o', join(work, 'f9.der')]);
    expect(f9.status, f9.out).toBe(0);
    const issuer = new X509Certificate(readFileSync(join(work, 'f9.der')));
    expect(att.verify(issuer.publicKey)).toBe(true);
  });

  it('concurrent signatures are serialised on the card and all verify; the card refuses every extraction route', async () => {
    const key = await env.getKey('9a');
    const messages = Array.from({ length: 40 }, (_, i) => Buffer.from(`message ${i}`));
    const sigs = await Promise.all(messages.map((m) => key.sign(m)));
    sigs.forEach((sig, i) => expect(nodeVerify('sha256', messages[i]!, { key: spki(key), dsaEncoding: 'der' }, sig), `signature ${i}`).toBe(true));
    const attempts = await env.probeExtraction(key);
    expect(attempts.length).toBeGreaterThan(0);
    for (const a of attempts) {
      expect(a.refused, a.route).toBe(true);
      expect(a.backendCode).toMatch(/^SW_[0-9A-F]{4}$/);
    }
  });

  it('random bytes come from the card', async () => {
    const a = await env.random(32);
    const b = await env.random(32);
    expect(a.length).toBe(32);
    expect(a.equals(b)).toBe(false);
    expect((await env.random(1000)).length).toBe(1000);
    await sealError(env.random(0), 'INVALID_ARGUMENT');
  });

  it('refuses what a PIV card cannot do, before anything is sent', async () => {
    await sealError(env.generateKey({ label: 'my-key', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'INVALID_ARGUMENT');
    await sealError(env.generateKey({ label: '9a', algorithm: { name: 'Ed25519' }, usages: ['sign'] }), 'NOT_SUPPORTED');
    await sealError(env.generateKey({ label: '9a', algorithm: { name: 'AES', length: 256 }, usages: ['encrypt'] }), 'NOT_SUPPORTED');
    // a slot with a key is not overwritten unless asked to
    await sealError(env.generateKey({ label: '9a', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'KEY_EXISTS');
    const key = await env.getKey('9a');
    await sealError(key.destroy(), 'NOT_SUPPORTED');
    await sealError(key.deriveKey({ kdf: 'HKDF', hash: 'SHA-256' }, { algorithm: { name: 'AES', length: 256 }, usages: ['encrypt'] }), 'NOT_SUPPORTED');
    await sealError(env.importPublicKey({ label: 'x', spki: key.publicKey! }), 'NOT_SUPPORTED');
    await sealError(env.getKey('retired-20'), 'KEY_NOT_FOUND'); // slot 95: no test puts a key there
    await sealError(env.getKey('pcsc:reader=Other%20Reader;applet=piv;slot=9a'), 'KEY_NOT_FOUND');
    await sealError(openEnvironment(`pcsc:reader=${encodeURIComponent(reader())};applet=piv;object=x`), 'INVALID_URI');
    await sealError(openEnvironment(`pcsc:reader=${encodeURIComponent(reader())};applet=piv?mgmt-key-alg=rot13`), 'INVALID_URI');
  });

  it('management key: AES-192 mutual authentication, algorithm found through the card metadata', async () => {
    // switch the card to an AES-192 management key with raw APDUs (3DES mutual authentication
    // done here with node:crypto, SET MANAGEMENT KEY FF), then let the backend generate with it
    const original = Buffer.from(secret('piv-mgmt-key'), 'hex');
    expect(secret('piv-mgmt-alg')).toBe('3des');
    const aesKey = randomBytes(24);
    await setManagementKey(original, '3des', aesKey, 'aes192');
    try {
      expect(secret('piv-mgmt-alg')).toBe('aes192');
      const aesEnv = await openEnvironment(pivUri());
      try {
        const k = await aesEnv.generateKey({ label: '9e', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'], replace: true } as PivGenerateKeySpec);
        // 9E (card authentication) signs without a PIN
        expect(nodeVerify('sha256', data, { key: spki(k), dsaEncoding: 'der' }, await k.sign(data))).toBe(true);
      } finally {
        await aesEnv.close();
      }
      // a wrong algorithm is refused by the card and said so
      const wrongAlg = await openEnvironment(pivUri({ 'mgmt-key-alg': '3des' }));
      try {
        const e = await sealError(wrongAlg.generateKey({ label: '9e', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], replace: true } as PivGenerateKeySpec), 'INVALID_ARGUMENT');
        expect(e.message).toContain('mgmt-key-alg');
      } finally {
        await wrongAlg.close();
      }
    } finally {
      await setManagementKey(aesKey, 'aes192', original, '3des');
    }
    expect(secret('piv-mgmt-alg')).toBe('3des');
  });

  it('a wrong PIN: PIN_INCORRECT with the tries left, exactly one try spent and never retried; then PIN_LOCKED; the PUK restores', async () => {
    const before = triesLeft();
    expect(before).toBeGreaterThan(1);
    const pin = wrongPin();
    const bad = await openEnvironment(pivUri(), { pin });
    try {
      const key = await bad.getKey('9a');
      const e = await sealError(key.sign(data), 'PIN_INCORRECT');
      expect(e.triesLeft).toBe(before - 1);
      expect(e.backendCode).toBe(`SW_63C${(before - 1).toString(16).toUpperCase()}`);
      expect(e.message).not.toContain(pin);
      expect(triesLeft()).toBe(before - 1);
      // the same environment does not send the refused PIN again
      await sealError(key.sign(data), 'PIN_INCORRECT');
      expect(triesLeft()).toBe(before - 1);
    } finally {
      await bad.close();
    }
    try {
      // spend the rest, one environment per try, then the card is blocked
      for (let left = before - 1; left > 0; left--) {
        const e2 = await openEnvironment(pivUri(), { pin });
        try {
          const err = await sealError((await e2.getKey('9a')).sign(data), 'PIN_INCORRECT');
          expect(err.triesLeft).toBe(left - 1);
        } finally {
          await e2.close();
        }
      }
      expect(emptyVerifySw()).toBe('6983');
      const locked = await openEnvironment(pivUri());
      try {
        const err = await sealError((await locked.getKey('9a')).sign(data), 'PIN_LOCKED');
        expect(err.backendCode).toBe('SW_6983');
      } finally {
        await locked.close();
      }
    } finally {
      // unblock with the PUK through yubico-piv-tool, setting the same PIN again
      if (triesLeft() < 3) {
        const u = run('yubico-piv-tool', ['-r', reader(), '--stdin-input', '-a', 'unblock-pin'], `${secret('piv-puk')}\n${secret('piv-pin')}\n`);
        expect(u.status, u.out).toBe(0);
      }
    }
    expect(triesLeft()).toBe(3);
    const good = await openEnvironment(pivUri());
    try {
      const key = await good.getKey('9a');
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    } finally {
      await good.close();
    }
  });

  it('a card removed mid-session: DEVICE_UNAVAILABLE, then the next call after insertion works (PIN verified again)', async () => {
    const key = await env.getKey('9a');
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    await removeCard('piv');
    try {
      await sealError(key.sign(data), 'DEVICE_UNAVAILABLE');
    } finally {
      await insertCard('piv');
    }
    const sig = await key.sign(data);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, sig)).toBe(true);
    expect(triesLeft()).toBe(3);
  });

  it('another application between operations (OpenSC selecting PIV again) does not break the session', async () => {
    const key = await env.getKey('9a');
    await key.sign(data);
    // opensc-tool's SELECT clears the card's security status; the backend verifies again
    expect(emptyVerifySw()).toMatch(/^63C/);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
  });
});

/**
 * The driver over the real PC/SC transport, with a thin recorder in between that notes every
 * APDU's INS and the exclusive section it was sent in: how often the PIN goes to the card, and
 * that it goes only together with the operation that needs it.
 */
describe('PIV driver: when the PIN is sent', () => {
  interface Sent {
    ins: number;
    section: number;
  }
  let transport: PcscTransport;
  let sent: Sent[];
  let applet: PivApplet;
  const owner = { closed: false, label: 'PIV (recorded)', get applet() { return applet; }, keyUri: (s: string) => `pcsc:applet=piv;slot=${s}` };

  beforeAll(async () => {
    transport = await openPcscTransport({ reader: reader(), disposition: 'leave' });
    sent = [];
    let section = 0;
    let current = 0;
    const record = (apdu: Buffer): void => void sent.push({ ins: apdu[1]!, section: current });
    const wrap = (ch: CardChannel): CardChannel => ({ number: ch.number, transmit: (a) => (record(a), ch.transmit(a)), close: () => ch.close() });
    const recorder: GenerationalTransport = {
      get info() { return transport.info; },
      get generation() { return transport.generation; },
      get extendedLength() { return transport.extendedLength; },
      transmit: (a) => (record(a), transport.transmit(a)),
      select: async (aid, o) => {
        const r = await transport.select(aid, o);
        return { ...r, channel: wrap(r.channel) };
      },
      exclusive: (fn) =>
        transport.exclusive(async () => {
          const outer = current;
          current = outer || ++section;
          try {
            return await fn();
          } finally {
            current = outer;
          }
        }),
      close: () => transport.close(),
    };
    applet = new PivApplet(recorder, {
      pin: async () => Buffer.from(secret('piv-pin'), 'utf8'),
      managementKey: () => Buffer.from(secret('piv-mgmt-key'), 'hex'),
      managementAlgorithm: undefined,
    });
  });

  afterAll(async () => {
    await applet?.close();
    await transport?.close();
  });

  const verifies = (): Sent[] => sent.filter((s) => s.ins === 0x20);
  const keyIn = async (slot: string): Promise<PivKey> => {
    const info = await applet.slotInfo(parseSlot(slot)!);
    expect(info, `slot ${slot} holds a key (made by the tests above)`).toBeDefined();
    return PivKey.described(owner, info!);
  };

  it('"once" key (9A): one VERIFY for many signatures, inside the same exclusive section as the signature', async () => {
    const key = await keyIn('9a');
    sent.length = 0;
    for (let i = 0; i < 3; i++) expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    expect(verifies()).toHaveLength(1);
    const v = verifies()[0]!;
    expect(v.section, 'VERIFY inside transport.exclusive').toBeGreaterThan(0);
    expect(sent.some((s) => s.ins === 0x87 && s.section === v.section), 'the signature in the same exclusive section').toBe(true);
    // another application resets the security status (opensc-tool selects PIV): one VERIFY again
    expect(emptyVerifySw()).toMatch(/^63C/);
    sent.length = 0;
    await key.sign(data);
    await key.sign(data);
    expect(verifies()).toHaveLength(1);
  });

  it('"always" key (9C): a VERIFY right before every signature; "never" key (9E): none', async () => {
    const always = await keyIn('9c');
    expect(always.pinPolicy).toBe('always');
    sent.length = 0;
    for (let i = 0; i < 3; i++) await always.sign(data);
    expect(verifies()).toHaveLength(3);
    for (const v of verifies()) {
      const i = sent.indexOf(v);
      expect(sent[i + 1]?.ins, 'the signature follows the VERIFY directly').toBe(0x87);
      expect(sent[i + 1]?.section).toBe(v.section);
    }
    const never = await keyIn('9e');
    expect(never.pinPolicy).toBe('never');
    sent.length = 0;
    expect(nodeVerify('sha256', data, { key: spki(never), dsaEncoding: 'der' }, await never.sign(data))).toBe(true);
    expect(verifies()).toHaveLength(0);
  });
});

/**
 * Replaces the management key with raw APDUs: mutual authentication with the current key
 * (SP 800-73-4 part 2 appendix A, computed here with node:crypto) and YubiKey SET MANAGEMENT KEY
 * (`00 FF FF FF`, data: algorithm, 9B, length, key).
 */
async function setManagementKey(current: Buffer, currentAlg: '3des' | 'aes192', next: Buffer, nextAlg: '3des' | 'aes192'): Promise<void> {
  const alg = { '3des': { id: 0x03, cipher: 'des-ede3-ecb', block: 8 }, aes192: { id: 0x0a, cipher: 'aes-192-ecb', block: 16 } };
  const c = alg[currentAlg];
  const ecb = (encrypt: boolean, block: Buffer): Buffer => {
    const x = encrypt ? createCipheriv(c.cipher, current, null) : createDecipheriv(c.cipher, current, null);
    x.setAutoPadding(false);
    return Buffer.concat([x.update(block), x.final()]);
  };
  const t = await openPcscTransport({ reader: reader(), disposition: 'leave' });
  try {
    await t.exclusive(async () => {
      expect((await t.select(PIV_AID)).response.sw).toBe(0x9000);
      const r1 = expectOk(await t.transmit(commandApdu(0x00, 0x87, c.id, 0x9b, Buffer.from([0x7c, 0x02, 0x80, 0x00]), 256)), 'witness');
      const witness = ecb(false, requireTag(parseBerTlv(requireTag(parseBerTlv(r1), 0x7c, 'template')), 0x80, 'witness'));
      const challenge = randomBytes(c.block);
      const body = Buffer.concat([Buffer.from([0x80, witness.length]), witness, Buffer.from([0x81, challenge.length]), challenge]);
      const r2 = expectOk(await t.transmit(commandApdu(0x00, 0x87, c.id, 0x9b, Buffer.concat([Buffer.from([0x7c, body.length]), body]), 256)), 'response');
      const answer = findTag(parseBerTlv(requireTag(parseBerTlv(r2), 0x7c, 'template')), 0x82);
      expect(answer?.equals(ecb(true, challenge))).toBe(true);
      const set = Buffer.concat([Buffer.from([alg[nextAlg].id, 0x9b, next.length]), next]);
      expectOk(await t.transmit(commandApdu(0x00, 0xff, 0xff, 0xff, set)), 'SET MANAGEMENT KEY');
    });
  } finally {
    await t.close();
  }
}
