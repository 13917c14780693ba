/**
 * AddressSanitizer driver for native-shims/pkcs11-kdf (run by scripts/asan-check.sh with the ASan
 * build's path as the argument). Real derivations on the simulators' SoftHSM2 token
 * (AES-ECB-ENCRYPT-DATA, checked against node:crypto) and, when NSS softokn is installed, on its
 * crypto-services slot (HKDF, SP 800-108 counter); then wrong argument counts and types,
 * malformed handles and mechanisms, huge templates and values, modules that are not PKCS#11
 * libraries, module errors, and many derivations in flight at once.
 */
import { createCipheriv, hkdfSync } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pkcs11 from 'pkcs11js';
import type { PKCS11 } from 'pkcs11js';
import { Driver, Prng, isTypeError, requireEnv } from './harness.js';
import { CKM_AES_ECB_ENCRYPT_DATA, encodeTemplate, type KdfShim } from '../../src/backends/pkcs11/kdf-native.js';

const d = new Driver('pkcs11-kdf');
const file = process.argv[2];
if (!file) throw new Error('usage: pkcs11-kdf.ts <path to pkcs11_kdf.node>');
const shim = d.load<KdfShim>(file);
const call = shim.deriveKey as unknown as (...args: unknown[]) => Promise<Buffer>;
const NSS_LIB = '/usr/lib/x86_64-linux-gnu/libsoftokn3.so';
const prng = new Prng(0x4b5f);

const secret = (len: number, keyType = pkcs11.CKK_GENERIC_SECRET) =>
  encodeTemplate([
    { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
    { type: pkcs11.CKA_KEY_TYPE, value: keyType },
    { type: pkcs11.CKA_VALUE_LEN, value: len },
    { type: pkcs11.CKA_TOKEN, value: false },
    { type: pkcs11.CKA_SENSITIVE, value: false },
    { type: pkcs11.CKA_EXTRACTABLE, value: true },
  ]);

function value(p: PKCS11, session: Buffer, key: Buffer): Buffer {
  const [a] = p.C_GetAttributeValue(session, key, [{ type: pkcs11.CKA_VALUE }]);
  return Buffer.isBuffer(a?.value) ? a.value : Buffer.alloc(0);
}

/** The user PIN from the SoftHSM URI's pin-source=file:… */
function softhsmPin(): string {
  const uri = requireEnv('SEAL_SOFTHSM_URI');
  const m = /pin-source=file:([^&]+)/.exec(uri);
  if (!m?.[1]) throw new Error('SEAL_SOFTHSM_URI has no pin-source=file:');
  return readFileSync(decodeURIComponent(m[1]), 'utf8').trim();
}

async function softhsm(): Promise<void> {
  const lib = requireEnv('SEAL_SOFTHSM_MODULE');
  const p = new pkcs11.PKCS11();
  p.load(lib);
  p.C_Initialize({ flags: pkcs11.CKF_OS_LOCKING_OK });
  try {
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === 'seal-sim');
    if (!slot) throw new Error('SoftHSM token seal-sim not found');
    const session = p.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    try {
      p.C_Login(session, pkcs11.CKU_USER, softhsmPin());
    } catch (e) {
      if (!String(e).includes('CKR_USER_ALREADY_LOGGED_IN')) throw e;
    }
    const keyBytes = Buffer.from('000102030405060708090a0b0c0d0e0f', 'hex');
    const base = p.C_CreateObject(session, [
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
      { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_AES },
      { type: pkcs11.CKA_TOKEN, value: false },
      { type: pkcs11.CKA_DERIVE, value: true },
      { type: pkcs11.CKA_SENSITIVE, value: false },
      { type: pkcs11.CKA_EXTRACTABLE, value: true },
      { type: pkcs11.CKA_VALUE, value: keyBytes },
    ]);
    const data = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const derived = await d.ok('AES-ECB-ENCRYPT-DATA on SoftHSM2', () => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data }, secret(16, pkcs11.CKK_AES)));
    if (derived) {
      const c = createCipheriv('aes-128-ecb', keyBytes, null).setAutoPadding(false);
      const expected = Buffer.concat([c.update(data), c.final()]);
      d.check('derived key equals AES-128-ECB(key, data) from node:crypto', value(p, session, derived).equals(expected));
    }
    await d.fails('ECB data of 15 bytes', () => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data: data.subarray(1) }, secret(16, pkcs11.CKK_AES)));
    await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data: Buffer.alloc(1 << 20) }, secret(16, pkcs11.CKK_AES)));
    await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data: Buffer.alloc(0) }, secret(16, pkcs11.CKK_AES)));
    await d.fails('HKDF on SoftHSM2 (mechanism it lacks)', () => shim.deriveKey(lib, session, base, { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true }, secret(32)), (e) => (e as { method?: string }).method === 'C_DeriveKey');
    const bogus = Buffer.alloc(8, 0xff);
    await d.fails('unknown session handle', () => shim.deriveKey(lib, bogus, base, { kind: 'ecb-encrypt-data', data }, secret(16)), (e) => (e as { code?: number }).code === pkcs11.CKR_SESSION_HANDLE_INVALID);
    await d.fails('unknown key handle', () => shim.deriveKey(lib, session, bogus, { kind: 'ecb-encrypt-data', data }, secret(16)));
    // many derivations in flight on the libuv pool
    const many = await d.ok('64 derivations at once', () => Promise.all(Array.from({ length: 64 }, (_, i) => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data: Buffer.alloc(16, i) }, secret(16, pkcs11.CKK_AES)))));
    d.check('64 distinct handles', new Set(many?.map((h) => h.toString('hex'))).size === 64);
    // templates: empty, huge, odd attribute values
    await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data }, []));
    await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data }, Array.from({ length: 5000 }, (_, i) => ({ type: i, value: Buffer.alloc(i % 7) }))));
    await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data }, [{ type: pkcs11.CKA_LABEL, value: Buffer.alloc(1 << 20, 0x41) }, ...secret(16, pkcs11.CKK_AES)]));
    for (let i = 0; i < 40; i++) {
      const tmpl = Array.from({ length: prng.int(12) }, () => ({ type: prng.int(2) ? prng.int(0x200) : prng.int(0x7fffffff), value: prng.bytes(prng.int(24)) }));
      await d.any(() => shim.deriveKey(lib, session, base, { kind: 'ecb-encrypt-data', data: prng.bytes(prng.int(3) * 16) }, tmpl));
    }
    p.C_CloseSession(session);
  } finally {
    p.C_Finalize();
    p.close();
  }
}

async function nss(): Promise<void> {
  if (!existsSync(NSS_LIB)) {
    process.stdout.write('asan: pkcs11-kdf NSS softokn not installed: HKDF and SP 800-108 success paths not exercised\n');
    return;
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'seal-asan-nss-'));
  const p = new pkcs11.PKCS11();
  p.load(NSS_LIB);
  p.C_Initialize({ libraryParameters: `configdir='sql:${dir}' certPrefix='' keyPrefix='' secmod='secmod.db' flags=`, flags: pkcs11.CKF_OS_LOCKING_OK });
  try {
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === 'NSS Generic Crypto Services');
    if (!slot) throw new Error('NSS Generic Crypto Services slot not found');
    const session = p.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    const ikm = Buffer.alloc(32, 0x0b);
    const base = p.C_CreateObject(session, [
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
      { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_GENERIC_SECRET },
      { type: pkcs11.CKA_TOKEN, value: false },
      { type: pkcs11.CKA_DERIVE, value: true },
      { type: pkcs11.CKA_SENSITIVE, value: false },
      { type: pkcs11.CKA_EXTRACTABLE, value: true },
      { type: pkcs11.CKA_VALUE, value: ikm },
    ]);
    const salt = Buffer.from('salt');
    const info = Buffer.from('info');
    const h = await d.ok('HKDF on NSS', () => shim.deriveKey(NSS_LIB, session, base, { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true, salt, info }, secret(42)));
    if (h) d.check('HKDF result equals node:crypto hkdfSync', value(p, session, h).equals(Buffer.from(hkdfSync('sha256', ikm, salt, info, 42))));
    await d.ok('SP 800-108 counter on NSS', () => shim.deriveKey(NSS_LIB, session, base, { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC, label: Buffer.from('L'), context: Buffer.from('C'), counterBits: 32, dkmLengthBits: 32 }, secret(48)));
    // long salts, infos, labels and contexts; odd counter widths
    for (let i = 0; i < 30; i++) {
      const big = (): Buffer => prng.bytes(prng.int(2) ? prng.int(64) : prng.int(70000));
      await d.any(() => shim.deriveKey(NSS_LIB, session, base, { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: prng.int(2) === 1, expand: prng.int(2) === 1, salt: big(), info: big() }, secret(1 + prng.int(255 * 32 + 10))));
      await d.any(() => shim.deriveKey(NSS_LIB, session, base, { kind: 'sp800-108-counter', prf: pkcs11.CKM_SHA256_HMAC, label: big(), context: big(), counterBits: 1 + prng.int(64), dkmLengthBits: 1 + prng.int(64) }, secret(1 + prng.int(600))));
    }
    p.C_CloseSession(session);
  } finally {
    p.C_Finalize();
    p.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function malformed(): Promise<void> {
  const lib = requireEnv('SEAL_SOFTHSM_MODULE');
  const h = Buffer.alloc(8);
  const ecb = { kind: 'ecb-encrypt-data', data: Buffer.alloc(16) };
  const hkdf = { kind: 'hkdf', prf: pkcs11.CKM_SHA256, extract: true, expand: true };
  const t = secret(16);
  const bad: Array<[string, unknown[]]> = [
    ['no arguments', []],
    ['four arguments', [lib, h, h, ecb]],
    ['six arguments', [lib, h, h, ecb, t, 1]],
    ['empty module path', ['', h, h, ecb, t]],
    ['module path with NUL', [`${lib}\0x`, h, h, ecb, t]],
    ['number module path', [1, h, h, ecb, t]],
    ['7-byte session', [lib, Buffer.alloc(7), h, ecb, t]],
    ['9-byte session', [lib, Buffer.alloc(9), h, ecb, t]],
    ['6-byte Uint16Array session', [lib, new Uint16Array(3), h, ecb, t]],
    ['null key', [lib, h, null, ecb, t]],
    ['mechanism array', [lib, h, h, [ecb], t]],
    ['mechanism string', [lib, h, h, 'hkdf', t]],
    ['unknown kind', [lib, h, h, { kind: 'pbkdf2' }, t]],
    ['kind not a string', [lib, h, h, { kind: 7 }, t]],
    ['prf negative', [lib, h, h, { ...hkdf, prf: -1 }, t]],
    ['prf fractional', [lib, h, h, { ...hkdf, prf: 1.5 }, t]],
    ['prf NaN', [lib, h, h, { ...hkdf, prf: Number.NaN }, t]],
    ['prf above 2^53', [lib, h, h, { ...hkdf, prf: 2 ** 60 }, t]],
    ['prf string', [lib, h, h, { ...hkdf, prf: '0x250' }, t]],
    ['extract not boolean', [lib, h, h, { ...hkdf, extract: 1 }, t]],
    ['salt not a Buffer', [lib, h, h, { ...hkdf, salt: [1, 2] }, t]],
    ['info not a Buffer', [lib, h, h, { ...hkdf, info: 'info' }, t]],
    ['counterBits 0', [lib, h, h, { kind: 'sp800-108-counter', prf: 1, counterBits: 0 }, t]],
    ['counterBits 65', [lib, h, h, { kind: 'sp800-108-counter', prf: 1, counterBits: 65 }, t]],
    ['dkmLengthBits 0', [lib, h, h, { kind: 'sp800-108-counter', prf: 1, counterBits: 32, dkmLengthBits: 0 }, t]],
    ['dkmLengthBits 65', [lib, h, h, { kind: 'sp800-108-counter', prf: 1, counterBits: 32, dkmLengthBits: 65 }, t]],
    ['label not a Buffer', [lib, h, h, { kind: 'sp800-108-counter', prf: 1, counterBits: 32, label: 'x' }, t]],
    ['ECB without data', [lib, h, h, { kind: 'ecb-encrypt-data' }, t]],
    ['template not an array', [lib, h, h, ecb, { length: 1 }]],
    ['template entry null', [lib, h, h, ecb, [null]]],
    ['template type negative', [lib, h, h, ecb, [{ type: -1, value: Buffer.alloc(1) }]]],
    ['template value a number', [lib, h, h, ecb, [{ type: 1, value: 16 }]]],
    ['template error after 1000 good entries', [lib, h, h, ecb, [...Array.from({ length: 1000 }, () => ({ type: 1, value: Buffer.alloc(8) })), { type: 'x', value: Buffer.alloc(1) }]]],
  ];
  for (const [what, args] of bad) await d.fails(what, () => call(...args), isTypeError);
  await d.fails('a module that does not exist', () => call('/nonexistent/libnothing.so', h, h, ecb, t), (e) => (e as { method?: string }).method === 'dlopen');
  await d.fails('a library that is not a PKCS#11 module', () => call('libc.so.6', h, h, ecb, t), (e) => (e as { method?: string }).method === 'C_GetFunctionList');
  await d.fails('a mapped but uninitialised SoftHSM2', () => call(lib, h, h, ecb, t));
  d.check(`ulongSize is 8 (LP64) and the mechanism number is ${CKM_AES_ECB_ENCRYPT_DATA}`, shim.ulongSize === 8);
}

/**
 * Objects whose property getters throw (or Proxies): the binding must return with the pending
 * exception, not throw a second one on top of it. Last, because a binding that gets this wrong
 * aborts the process.
 */
async function throwingGetters(): Promise<void> {
  const lib = requireEnv('SEAL_SOFTHSM_MODULE');
  const h = Buffer.alloc(8);
  const t = secret(16);
  const boom = (): never => {
    throw new Error('getter');
  };
  const cases: Array<[string, unknown, unknown]> = [
    ['mechanism kind getter throws', { get kind() { return boom(); } }, t],
    ['mechanism data getter throws', { kind: 'ecb-encrypt-data', get data() { return boom(); } }, t],
    ['mechanism that is a throwing Proxy', new Proxy({}, { get: boom }), t],
    ['template entry getter throws', { kind: 'ecb-encrypt-data', data: Buffer.alloc(16) }, [{ get type() { return boom(); }, value: Buffer.alloc(1) }]],
    ['template that is a throwing Proxy', { kind: 'ecb-encrypt-data', data: Buffer.alloc(16) }, new Proxy([1], { get: boom })],
  ];
  for (const [what, mech, tmpl] of cases) await d.fails(what, () => call(lib, h, h, mech, tmpl), /getter|TypeError/);
}

await malformed();
await softhsm();
await nss();
await throwingGetters();
d.finish();
