/**
 * Proves the pkcs11_kdf native shim against real PKCS#11 modules. Every
 * expected value is computed independently with node:crypto; the shim only
 * produces the token-side result. A missing module or unbuilt shim fails.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { createCipheriv, createHmac, hkdfSync } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pkcs11 from 'pkcs11js';
import type { PKCS11 } from 'pkcs11js';
import {
  encodeTemplate,
  kdfShimUnavailableReason,
  loadKdfShim,
  type KdfShim,
} from '../../src/backends/pkcs11/kdf-native.js';

const NSS_LIB = '/usr/lib/x86_64-linux-gnu/libsoftokn3.so';
const SOFTHSM_LIB = '/usr/lib/softhsm/libsofthsm2.so';
const CKR_CRYPTOKI_NOT_INITIALIZED = 0x190;

function requireShim(): KdfShim {
  const shim = loadKdfShim();
  if (!shim) throw new Error(`pkcs11_kdf shim unavailable: ${kdfShimUnavailableReason() ?? '?'}`);
  return shim;
}

function requireModule(lib: string): void {
  if (!existsSync(lib)) throw new Error(`PKCS#11 module ${lib} is missing`);
}

function readValue(p: PKCS11, session: Buffer, key: Buffer): Buffer {
  const [attr] = p.C_GetAttributeValue(session, key, [{ type: pkcs11.CKA_VALUE }]);
  if (!attr || !Buffer.isBuffer(attr.value)) throw new Error('CKA_VALUE is not a byte array');
  return attr.value;
}

function readBool(p: PKCS11, session: Buffer, key: Buffer, type: number): boolean {
  const [attr] = p.C_GetAttributeValue(session, key, [{ type }]);
  if (!attr || !Buffer.isBuffer(attr.value) || attr.value.length !== 1) throw new Error('not a CK_BBOOL');
  return attr.value[0] === 1;
}

/** Independent KDFa (TPM 2.0 Part 1, 11.4.10.2): K(i) = HMAC(key, [i]_32 || label || 0x00 || context [|| [L]_32]). */
function kdfa(key: Buffer, label: Buffer, context: Buffer, bytes: number, withL: boolean): Buffer {
  const be32 = (n: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  const out: Buffer[] = [];
  for (let i = 1, got = 0; got < bytes; i++) {
    const parts = [be32(i), label, Buffer.from([0x00]), context, ...(withL ? [be32(bytes * 8)] : [])];
    const block = createHmac('sha256', key).update(Buffer.concat(parts)).digest();
    out.push(block);
    got += block.length;
  }
  return Buffer.concat(out).subarray(0, bytes);
}

const secretTemplate = (len: number, extra: Record<number, boolean> = {}) =>
  encodeTemplate([
    { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
    { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_GENERIC_SECRET },
    { type: pkcs11.CKA_VALUE_LEN, value: len },
    { type: pkcs11.CKA_TOKEN, value: false },
    { type: pkcs11.CKA_SENSITIVE, value: extra[pkcs11.CKA_SENSITIVE] ?? false },
    { type: pkcs11.CKA_EXTRACTABLE, value: extra[pkcs11.CKA_EXTRACTABLE] ?? true },
    { type: pkcs11.CKA_SIGN, value: true },
    { type: pkcs11.CKA_LABEL, value: 'derived' },
  ]);

describe('encodeTemplate', () => {
  it('encodes CK_BBOOL, native little-endian CK_ULONG, strings and buffers', () => {
    const enc = encodeTemplate([
      { type: 1, value: true },
      { type: 2, value: false },
      { type: 3, value: 0x0102030405 },
      { type: 4, value: 'ab' },
      { type: 5, value: Buffer.from([9, 8]) },
    ]);
    expect(enc.map((a) => [a.type, a.value.toString('hex')])).toEqual([
      [1, '01'],
      [2, '00'],
      [3, '0504030201000000'],
      [4, '6162'],
      [5, '0908'],
    ]);
  });

  it('rejects values that are not a CK_ULONG / supported type', () => {
    expect(() => encodeTemplate([{ type: 1, value: -1 }])).toThrow(TypeError);
    expect(() => encodeTemplate([{ type: 1, value: 1.5 }])).toThrow(TypeError);
    expect(() => encodeTemplate([{ type: -3, value: true }])).toThrow(TypeError);
    expect(() => encodeTemplate([{ type: 1, value: {} as unknown as Buffer }])).toThrow(TypeError);
  });
});

describe('pkcs11_kdf shim on NSS softokn', () => {
  const ikm = Buffer.from('0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b5a5a5a5a5a5a5a5a5a5a', 'hex');
  let shim: KdfShim;
  let p: PKCS11;
  let dir: string;
  let session: Buffer;
  let baseKey: Buffer;

  beforeAll(() => {
    shim = requireShim();
    requireModule(NSS_LIB);
    dir = mkdtempSync(path.join(tmpdir(), 'seal-kdf-nss-'));
    p = new pkcs11.PKCS11();
    p.load(NSS_LIB);
    p.C_Initialize({
      libraryParameters: `configdir='sql:${dir}' certPrefix='' keyPrefix='' secmod='secmod.db' flags=`,
      flags: pkcs11.CKF_OS_LOCKING_OK,
    });
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === 'NSS Generic Crypto Services');
    if (!slot) throw new Error('NSS Generic Crypto Services slot not found');
    // Session objects on the crypto-services token need no login.
    session = p.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    baseKey = p.C_CreateObject(session, [
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
      { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_GENERIC_SECRET },
      { type: pkcs11.CKA_TOKEN, value: false },
      { type: pkcs11.CKA_DERIVE, value: true },
      { type: pkcs11.CKA_SENSITIVE, value: false },
      { type: pkcs11.CKA_EXTRACTABLE, value: true },
      { type: pkcs11.CKA_VALUE, value: ikm },
    ]);
  });

  afterAll(() => {
    if (p) {
      try {
        p.C_Finalize();
      } finally {
        p.close();
      }
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('HKDF-SHA-256 with salt and info equals node:crypto hkdfSync', async () => {
    const salt = Buffer.from('000102030405060708090a0b0c', 'hex');
    const info = Buffer.from('f0f1f2f3f4f5f6f7f8f9', 'hex');
    const handle = await shim.deriveKey(
      NSS_LIB,
      session,
      baseKey,
      { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true, salt, info },
      secretTemplate(32),
    );
    expect(handle).toHaveLength(8);
    expect(handle.equals(baseKey)).toBe(false);
    const expected = Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));
    expect(readValue(p, session, handle).toString('hex')).toBe(expected.toString('hex'));
  });

  it('HKDF without salt (CKF_HKDF_SALT_NULL) equals hkdfSync with an empty salt', async () => {
    const info = Buffer.from('seal-bridge hkdf');
    const handle = await shim.deriveKey(
      NSS_LIB,
      session,
      baseKey,
      { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true, info },
      secretTemplate(42),
    );
    const expected = Buffer.from(hkdfSync('sha256', ikm, Buffer.alloc(0), info, 42));
    expect(readValue(p, session, handle).toString('hex')).toBe(expected.toString('hex'));
  });

  it('SP 800-108 counter HMAC-SHA-256 with [L]_32 equals an independent KDFa (2 PRF blocks)', async () => {
    const label = Buffer.from('STORAGE');
    const context = Buffer.from('00112233445566778899', 'hex');
    const handle = await shim.deriveKey(
      NSS_LIB,
      session,
      baseKey,
      { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC, label, context, counterBits: 32, dkmLengthBits: 32 },
      secretTemplate(48),
    );
    const expected = kdfa(ikm, label, context, 48, true);
    expect(readValue(p, session, handle).toString('hex')).toBe(expected.toString('hex'));
  });

  it('SP 800-108 counter without label or [L] still inserts the 0x00 separator', async () => {
    const context = Buffer.from('context only');
    const handle = await shim.deriveKey(
      NSS_LIB,
      session,
      baseKey,
      { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC, context, counterBits: 32 },
      secretTemplate(32),
    );
    const expected = kdfa(ikm, Buffer.alloc(0), context, 32, false);
    expect(readValue(p, session, handle).toString('hex')).toBe(expected.toString('hex'));
  });

  it('derives a sensitive, non-extractable key whose CKA_VALUE is refused but which HMACs correctly', async () => {
    const salt = Buffer.from('sensitive salt');
    const info = Buffer.from('sensitive info');
    const handle = await shim.deriveKey(
      NSS_LIB,
      session,
      baseKey,
      { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true, salt, info },
      secretTemplate(32, { [pkcs11.CKA_SENSITIVE]: true, [pkcs11.CKA_EXTRACTABLE]: false }),
    );
    expect(readBool(p, session, handle, pkcs11.CKA_SENSITIVE)).toBe(true);
    expect(readBool(p, session, handle, pkcs11.CKA_EXTRACTABLE)).toBe(false);
    expect(() => readValue(p, session, handle)).toThrow(/CKR_ATTRIBUTE_SENSITIVE/);
    const msg = Buffer.from('message');
    p.C_SignInit(session, { mechanism: pkcs11.CKM_SHA256_HMAC }, handle);
    const mac = p.C_Sign(session, msg, Buffer.alloc(32));
    const expectedKey = Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));
    expect(mac.toString('hex')).toBe(createHmac('sha256', expectedKey).update(msg).digest('hex'));
  });

  it('returns PKCS#11 errors as Error{code, method}', async () => {
    const bogusSession = Buffer.alloc(8);
    bogusSession.writeBigUInt64LE(0xdeadn);
    await expect(
      shim.deriveKey(NSS_LIB, bogusSession, baseKey, { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true }, secretTemplate(32)),
    ).rejects.toMatchObject({ code: pkcs11.CKR_SESSION_HANDLE_INVALID, method: 'C_DeriveKey' });
  });

  it('throws TypeError for malformed input without crashing, and keeps working afterwards', async () => {
    const call = shim.deriveKey as unknown as (...args: unknown[]) => Promise<Buffer>;
    const hkdf = { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true };
    const tmpl = secretTemplate(32);
    const bad: unknown[][] = [
      [],
      [NSS_LIB, session, baseKey, hkdf],
      [42, session, baseKey, hkdf, tmpl],
      [NSS_LIB, 'session', baseKey, hkdf, tmpl],
      [NSS_LIB, Buffer.alloc(4), baseKey, hkdf, tmpl],
      [NSS_LIB, session, null, hkdf, tmpl],
      [NSS_LIB, session, baseKey, null, tmpl],
      [NSS_LIB, session, baseKey, { ...hkdf, kind: 'pbkdf2' }, tmpl],
      [NSS_LIB, session, baseKey, { ...hkdf, extract: 'yes' }, tmpl],
      [NSS_LIB, session, baseKey, { ...hkdf, prf: -1 }, tmpl],
      [NSS_LIB, session, baseKey, { ...hkdf, salt: 'salt' }, tmpl],
      [NSS_LIB, session, baseKey, { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC, counterBits: 0 }, tmpl],
      [NSS_LIB, session, baseKey, { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC }, tmpl],
      [NSS_LIB, session, baseKey, { kind: 'ecb-encrypt-data', data: [1, 2, 3] }, tmpl],
      [NSS_LIB, session, baseKey, hkdf, 'template'],
      [NSS_LIB, session, baseKey, hkdf, [{ type: pkcs11.CKA_VALUE_LEN, value: 32 }]],
      [NSS_LIB, session, baseKey, hkdf, [{ type: 'x', value: Buffer.alloc(1) }]],
    ];
    for (const args of bad) expect(() => call(...args), JSON.stringify(args.length)).toThrow(TypeError);
    const handle = await shim.deriveKey(NSS_LIB, session, baseKey, { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true }, tmpl);
    expect(readValue(p, session, handle)).toHaveLength(32);
  });
});

describe('pkcs11_kdf shim on a module that is not loaded', () => {
  it('maps a fresh, uninitialised instance and reports CKR_CRYPTOKI_NOT_INITIALIZED', async () => {
    const shim = requireShim();
    requireModule(SOFTHSM_LIB);
    await expect(
      shim.deriveKey(SOFTHSM_LIB, Buffer.alloc(8), Buffer.alloc(8), { kind: 'ecb-encrypt-data', data: Buffer.alloc(16) }, []),
    ).rejects.toMatchObject({ code: CKR_CRYPTOKI_NOT_INITIALIZED, method: 'C_DeriveKey' });
  });
});

describe('pkcs11_kdf shim on SoftHSM2', () => {
  const aesKey = Buffer.from('603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4', 'hex');
  let shim: KdfShim;
  let p: PKCS11;
  let dir: string;
  let session: Buffer;
  let baseKey: Buffer;
  const savedConf = process.env.SOFTHSM2_CONF;

  const aesTemplate = () =>
    encodeTemplate([
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
      { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_AES },
      { type: pkcs11.CKA_VALUE_LEN, value: 32 },
      { type: pkcs11.CKA_TOKEN, value: false },
      { type: pkcs11.CKA_SENSITIVE, value: false },
      { type: pkcs11.CKA_EXTRACTABLE, value: true },
      { type: pkcs11.CKA_ENCRYPT, value: true },
    ]);

  beforeAll(() => {
    shim = requireShim();
    requireModule(SOFTHSM_LIB);
    dir = mkdtempSync(path.join(tmpdir(), 'seal-kdf-softhsm-'));
    mkdirSync(path.join(dir, 'tokens'));
    const conf = path.join(dir, 'softhsm2.conf');
    writeFileSync(conf, `directories.tokendir = ${dir}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n`);
    process.env.SOFTHSM2_CONF = conf;
    const init = spawnSync(
      'softhsm2-util',
      ['--init-token', '--free', '--label', 'kdf-test', '--pin', '1234', '--so-pin', '5678'],
      { env: { ...process.env, SOFTHSM2_CONF: conf }, encoding: 'utf8' },
    );
    if (init.status !== 0) throw new Error(`softhsm2-util failed: ${init.error?.message ?? init.stderr}`);
    p = new pkcs11.PKCS11();
    p.load(SOFTHSM_LIB);
    p.C_Initialize();
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === 'kdf-test');
    if (!slot) throw new Error('SoftHSM token kdf-test not found');
    session = p.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    p.C_Login(session, pkcs11.CKU_USER, '1234');
    baseKey = p.C_CreateObject(session, [
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
      { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_AES },
      { type: pkcs11.CKA_TOKEN, value: false },
      { type: pkcs11.CKA_DERIVE, value: true },
      { type: pkcs11.CKA_SENSITIVE, value: false },
      { type: pkcs11.CKA_EXTRACTABLE, value: true },
      { type: pkcs11.CKA_VALUE, value: aesKey },
    ]);
  });

  afterAll(() => {
    if (p) {
      try {
        p.C_Finalize();
      } finally {
        p.close();
      }
    }
    if (savedConf === undefined) delete process.env.SOFTHSM2_CONF;
    else process.env.SOFTHSM2_CONF = savedConf;
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('CKM_AES_ECB_ENCRYPT_DATA equals node:crypto aes-256-ecb (no padding)', async () => {
    const data = Buffer.from('6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51', 'hex');
    const handle = await shim.deriveKey(SOFTHSM_LIB, session, baseKey, { kind: 'ecb-encrypt-data', data }, aesTemplate());
    const cipher = createCipheriv('aes-256-ecb', aesKey, null).setAutoPadding(false);
    const expected = Buffer.concat([cipher.update(data), cipher.final()]);
    expect(readValue(p, session, handle).toString('hex')).toBe(expected.toString('hex'));
    const [type] = p.C_GetAttributeValue(session, handle, [{ type: pkcs11.CKA_KEY_TYPE }]);
    expect(type?.value).toEqual(encodeTemplate([{ type: 0, value: pkcs11.CKK_AES }])[0]?.value);
  });

  it('rejects data that is not a whole number of AES blocks with the module CKR', async () => {
    await expect(
      shim.deriveKey(SOFTHSM_LIB, session, baseKey, { kind: 'ecb-encrypt-data', data: Buffer.alloc(15) }, aesTemplate()),
    ).rejects.toMatchObject({ code: pkcs11.CKR_MECHANISM_PARAM_INVALID, method: 'C_DeriveKey' });
  });
});
