/**
 * Lazy loader and types for the `pkcs11_kdf` native shim (native-shims/pkcs11-kdf).
 *
 * pkcs11js 2.x cannot marshal mechanism parameters that contain pointers, so
 * CKM_HKDF_DERIVE (CK_HKDF_PARAMS), CKM_SP800_108_COUNTER_KDF
 * (CK_SP800_108_KDF_PARAMS) and CKM_AES_ECB_ENCRYPT_DATA
 * (CK_KEY_DERIVATION_STRING_DATA) go through this shim. It calls C_DeriveKey on
 * the module instance pkcs11js already loaded (dlopen of the same path returns
 * that instance) with the raw session/object handles pkcs11js returns (Buffers
 * holding a native-endian CK_ULONG), and resolves to the new object's handle in
 * the same form, so the result can be passed straight back to pkcs11js.
 *
 * Only node builtins are imported here.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { endianness } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { findPackageRoot } from '../../core/package-root.js';

/** PKCS#11 v3.0 mechanism numbers the shim issues (not all exported by pkcs11js 2.1.7). */
export const CKM_HKDF_DERIVE = 0x402a;
export const CKM_SP800_108_COUNTER_KDF = 0x3ac;
export const CKM_AES_ECB_ENCRYPT_DATA = 0x1104;

/**
 * Mechanism description; the shim builds the PKCS#11 parameter structure.
 *
 * - `hkdf`: CKM_HKDF_DERIVE with CK_HKDF_PARAMS. `prf` is a hash mechanism
 *   (CKM_SHA256, ...). `ulSaltType` is CKF_HKDF_SALT_DATA when `salt` is given,
 *   else CKF_HKDF_SALT_NULL. Output length comes from CKA_VALUE_LEN in the template.
 * - `sp800-108-counter`: CKM_SP800_108_COUNTER_KDF, `prf` an HMAC/CMAC mechanism
 *   (CKM_SHA256_HMAC, ...). PRF input for block i (i = 1, 2, ...):
 *     [i]_counterBits (big-endian) || label || 0x00 || context || [L]_dkmLengthBits
 *   where the trailing [L] (big-endian, L = derived key length in bits,
 *   CK_SP800_108_DKM_LENGTH_SUM_OF_KEYS) is only present when `dkmLengthBits`
 *   is given. `dkmLengthBits` is the WIDTH of that field, not L itself.
 *   counterBits = dkmLengthBits = 32 gives TPM 2.0 KDFa.
 * - `ecb-encrypt-data`: CKM_AES_ECB_ENCRYPT_DATA; the new key value is
 *   AES-ECB(baseKey, data) truncated to the template's length.
 */
export type KdfMechanism =
  | { kind: 'hkdf'; prf: number; extract: boolean; expand: boolean; salt?: Buffer; info?: Buffer }
  | {
      kind: 'sp800-108-counter';
      prf: number;
      label?: Buffer;
      context?: Buffer;
      counterBits: number;
      dkmLengthBits?: number;
    }
  | { kind: 'ecb-encrypt-data'; data: Buffer };

/** A template attribute whose value is already encoded (see encodeTemplate). */
export interface EncodedAttribute {
  type: number;
  value: Buffer;
}

/** Rejection value of deriveKey for module failures. */
export interface KdfShimError extends Error {
  /** CKR_* number returned by the module (absent when dlopen itself failed). */
  code?: number;
  /** 'C_DeriveKey' for PKCS#11 errors; 'dlopen' / 'C_GetFunctionList' for loader errors. */
  method: string;
}

export interface KdfShim {
  /**
   * C_DeriveKey(session, mech, baseKey, template) on the already-initialised
   * module at `modulePath` (must be the path pkcs11js loaded). Runs on the libuv
   * thread pool. Malformed arguments throw a TypeError synchronously; module
   * errors reject with a KdfShimError. Resolves to the new object handle.
   */
  deriveKey(
    modulePath: string,
    session: Buffer,
    baseKey: Buffer,
    mech: KdfMechanism,
    template: EncodedAttribute[],
  ): Promise<Buffer>;
  /** sizeof(CK_ULONG) the shim was compiled with. */
  readonly ulongSize: number;
}

/** sizeof(CK_ULONG): 4 on Windows (LLP64) and 32-bit targets, 8 on 64-bit Unix (LP64). */
const ULONG_SIZE = process.platform === 'win32' || !/64/.test(process.arch) ? 4 : 8;
const LITTLE_ENDIAN = endianness() === 'LE';

const SHIM_RELATIVE = path.join('native-shims', 'pkcs11-kdf', 'build', 'Release', 'pkcs11_kdf.node');

let loaded = false;
let shim: KdfShim | undefined;
let unavailable: string | undefined;

/** Loads the shim once; undefined (see kdfShimUnavailableReason) when it is not usable. */
export function loadKdfShim(): KdfShim | undefined {
  if (loaded) return shim;
  loaded = true;
  const root = findPackageRoot();
  if (root === undefined) {
    unavailable = 'seal-bridge package root not found above ' + fileURLToPath(import.meta.url);
    return undefined;
  }
  const file = path.join(root, SHIM_RELATIVE);
  if (!existsSync(file)) {
    unavailable = `${file} is not built (run: node scripts/build-shims.mjs)`;
    return undefined;
  }
  try {
    const mod = createRequire(import.meta.url)(file) as Partial<KdfShim>;
    if (typeof mod.deriveKey !== 'function' || mod.ulongSize !== ULONG_SIZE) {
      unavailable = `${file} does not look like a compatible pkcs11_kdf shim`;
      return undefined;
    }
    shim = mod as KdfShim;
    return shim;
  } catch (e) {
    unavailable = `cannot load ${file}: ${e instanceof Error ? e.message : String(e)}`;
    return undefined;
  }
}

/** Why loadKdfShim() returned undefined; undefined when it loaded (or was not tried yet). */
export function kdfShimUnavailableReason(): string | undefined {
  return unavailable;
}

/**
 * Encodes template values into the bytes the module expects:
 * boolean -> CK_BBOOL (1 byte, 0/1); number -> CK_ULONG (native width and byte
 * order, 8 bytes little-endian on x86_64 Linux); string -> UTF-8 bytes;
 * Buffer -> as is. Throws TypeError for anything else.
 */
export function encodeTemplate(
  attrs: ReadonlyArray<{ type: number; value: boolean | number | Buffer | string }>,
): EncodedAttribute[] {
  return attrs.map(({ type, value }, i) => {
    if (!Number.isSafeInteger(type) || type < 0) throw new TypeError(`template[${i}].type must be a CK_ATTRIBUTE_TYPE`);
    if (typeof value === 'boolean') return { type, value: Buffer.from([value ? 1 : 0]) };
    if (typeof value === 'string') return { type, value: Buffer.from(value, 'utf8') };
    if (Buffer.isBuffer(value)) return { type, value };
    if (typeof value === 'number') {
      if (!Number.isSafeInteger(value) || value < 0 || (ULONG_SIZE === 4 && value > 0xffffffff)) {
        throw new TypeError(`template[${i}].value ${value} is not a valid CK_ULONG`);
      }
      const b = Buffer.alloc(ULONG_SIZE);
      if (ULONG_SIZE === 8) {
        if (LITTLE_ENDIAN) b.writeBigUInt64LE(BigInt(value));
        else b.writeBigUInt64BE(BigInt(value));
      } else if (LITTLE_ENDIAN) b.writeUInt32LE(value);
      else b.writeUInt32BE(value);
      return { type, value: b };
    }
    throw new TypeError(`template[${i}].value must be a boolean, number, string or Buffer`);
  });
}
