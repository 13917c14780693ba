/**
 * TPM 2.0 wire encoding (TCG TPM 2.0 Library, Part 2 "Structures"), for the few structures
 * seal-bridge builds and reads: object templates (TPMT_PUBLIC), sensitive-create, signature and
 * symmetric schemes, PCR selections, signatures and attestation structures. Pure code (no TPM):
 * the verifier and the server-side import helper use it on machines without a TPM.
 *
 * Readers throw SealError('DEVICE_ERROR') on truncated or inconsistent input, never anything else.
 */
import { createHash } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import type { HashName, NamedCurve } from '../../core/algorithms.js';

export const ALG = {
  RSA: 0x0001,
  SHA1: 0x0004,
  HMAC: 0x0005,
  AES: 0x0006,
  KEYEDHASH: 0x0008,
  XOR: 0x000a,
  SHA256: 0x000b,
  SHA384: 0x000c,
  SHA512: 0x000d,
  NULL: 0x0010,
  RSASSA: 0x0014,
  RSAES: 0x0015,
  RSAPSS: 0x0016,
  OAEP: 0x0017,
  ECDSA: 0x0018,
  ECDH: 0x0019,
  KDF1_SP800_108: 0x0022,
  ECC: 0x0023,
  SYMCIPHER: 0x0025,
  CTR: 0x0040,
  OFB: 0x0041,
  CBC: 0x0042,
  CFB: 0x0043,
  ECB: 0x0044,
} as const;

export const CURVE = { 'P-256': 0x0003, 'P-384': 0x0004 } as const;

/** TPMA_OBJECT bits. */
export const OBJ = {
  fixedTPM: 1 << 1,
  stClear: 1 << 2,
  fixedParent: 1 << 4,
  sensitiveDataOrigin: 1 << 5,
  userWithAuth: 1 << 6,
  adminWithPolicy: 1 << 7,
  noDA: 1 << 10,
  encryptedDuplication: 1 << 11,
  restricted: 1 << 16,
  decrypt: 1 << 17,
  sign: 1 << 18,
} as const;

export const OBJECT_ATTRIBUTE_NAMES: Array<[number, string]> = Object.entries(OBJ).map(([k, v]) => [v, k.toLowerCase()]);

export const HASH_ALG: Record<HashName | 'SHA-1', number> = { 'SHA-1': ALG.SHA1, 'SHA-256': ALG.SHA256, 'SHA-384': ALG.SHA384, 'SHA-512': ALG.SHA512 };
const HASH_NODE: Record<number, string> = { [ALG.SHA1]: 'sha1', [ALG.SHA256]: 'sha256', [ALG.SHA384]: 'sha384', [ALG.SHA512]: 'sha512' };

export function nodeHash(alg: number): string {
  const h = HASH_NODE[alg];
  if (!h) throw new SealError('NOT_SUPPORTED', `TPM hash algorithm 0x${alg.toString(16)} is not supported`);
  return h;
}

export function digestSize(alg: number): number {
  return createHash(nodeHash(alg)).digest().length;
}

// ---- writer / reader ---------------------------------------------------------------------------

export class Writer {
  readonly #parts: Buffer[] = [];
  u8(v: number): this {
    this.#parts.push(Buffer.from([v & 0xff]));
    return this;
  }
  u16(v: number): this {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.#parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    this.#parts.push(b);
    return this;
  }
  bytes(b: Buffer): this {
    this.#parts.push(b);
    return this;
  }
  /** A TPM2B: 2-byte size and the bytes. */
  tpm2b(b: Buffer = Buffer.alloc(0)): this {
    return this.u16(b.length).bytes(b);
  }
  out(): Buffer {
    return Buffer.concat(this.#parts);
  }
}

export class Reader {
  #off = 0;
  constructor(readonly buf: Buffer, readonly what = 'TPM structure') {}
  #need(n: number): void {
    if (this.#off + n > this.buf.length) throw new SealError('DEVICE_ERROR', `truncated ${this.what}`);
  }
  get offset(): number {
    return this.#off;
  }
  get remaining(): number {
    return this.buf.length - this.#off;
  }
  u8(): number {
    this.#need(1);
    return this.buf[this.#off++] as number;
  }
  u16(): number {
    this.#need(2);
    const v = this.buf.readUInt16BE(this.#off);
    this.#off += 2;
    return v;
  }
  u32(): number {
    this.#need(4);
    const v = this.buf.readUInt32BE(this.#off);
    this.#off += 4;
    return v;
  }
  u64(): bigint {
    this.#need(8);
    const v = this.buf.readBigUInt64BE(this.#off);
    this.#off += 8;
    return v;
  }
  bytes(n: number): Buffer {
    this.#need(n);
    const b = this.buf.subarray(this.#off, this.#off + n);
    this.#off += n;
    return b;
  }
  tpm2b(): Buffer {
    return this.bytes(this.u16());
  }
  end(): void {
    if (this.#off !== this.buf.length) throw new SealError('DEVICE_ERROR', `trailing bytes after ${this.what}`);
  }
}

// ---- object templates --------------------------------------------------------------------------

export type PublicArea =
  | { type: 'ecc'; nameAlg: number; attributes: number; authPolicy: Buffer; symmetric: SymDef; scheme: { alg: number; hash?: number }; curve: number; kdf: { alg: number; hash?: number }; x: Buffer; y: Buffer }
  | { type: 'rsa'; nameAlg: number; attributes: number; authPolicy: Buffer; symmetric: SymDef; scheme: { alg: number; hash?: number }; keyBits: number; exponent: number; modulus: Buffer }
  | { type: 'keyedhash'; nameAlg: number; attributes: number; authPolicy: Buffer; scheme: { alg: number; hash?: number; kdf?: number }; unique: Buffer }
  | { type: 'symcipher'; nameAlg: number; attributes: number; authPolicy: Buffer; symmetric: SymDef; unique: Buffer };

export interface SymDef {
  alg: number;
  keyBits?: number;
  mode?: number;
}

export const AES128_CFB: SymDef = { alg: ALG.AES, keyBits: 128, mode: ALG.CFB };
export const SYM_NULL: SymDef = { alg: ALG.NULL };

function writeSymDef(w: Writer, s: SymDef): void {
  w.u16(s.alg);
  if (s.alg === ALG.NULL) return;
  if (s.alg === ALG.XOR) {
    w.u16(s.keyBits ?? ALG.SHA256);
    return;
  }
  w.u16(s.keyBits ?? 128).u16(s.mode ?? ALG.CFB);
}

function readSymDef(r: Reader): SymDef {
  const alg = r.u16();
  if (alg === ALG.NULL) return { alg };
  if (alg === ALG.XOR) return { alg, keyBits: r.u16() };
  return { alg, keyBits: r.u16(), mode: r.u16() };
}

function writeScheme(w: Writer, s: { alg: number; hash?: number; kdf?: number }): void {
  w.u16(s.alg);
  if (s.alg === ALG.NULL) return;
  w.u16(s.hash ?? ALG.SHA256);
  if (s.alg === ALG.XOR) w.u16(s.kdf ?? ALG.KDF1_SP800_108);
}

function readScheme(r: Reader): { alg: number; hash?: number; kdf?: number } {
  const alg = r.u16();
  if (alg === ALG.NULL) return { alg };
  const hash = r.u16();
  if (alg === ALG.XOR) return { alg, hash, kdf: r.u16() };
  return { alg, hash };
}

/** TPMT_PUBLIC wire bytes. */
export function encodePublicArea(p: PublicArea): Buffer {
  const w = new Writer();
  const typeAlg = { ecc: ALG.ECC, rsa: ALG.RSA, keyedhash: ALG.KEYEDHASH, symcipher: ALG.SYMCIPHER }[p.type];
  w.u16(typeAlg).u16(p.nameAlg).u32(p.attributes).tpm2b(p.authPolicy);
  switch (p.type) {
    case 'ecc':
      writeSymDef(w, p.symmetric);
      writeScheme(w, p.scheme);
      w.u16(p.curve);
      writeScheme(w, p.kdf);
      w.tpm2b(p.x).tpm2b(p.y);
      break;
    case 'rsa':
      writeSymDef(w, p.symmetric);
      writeScheme(w, p.scheme);
      w.u16(p.keyBits).u32(p.exponent).tpm2b(p.modulus);
      break;
    case 'keyedhash':
      writeScheme(w, p.scheme);
      w.tpm2b(p.unique);
      break;
    case 'symcipher':
      writeSymDef(w, p.symmetric);
      w.tpm2b(p.unique);
      break;
  }
  return w.out();
}

/**
 * The TPMT_TEMPLATE of a derived object: the public area with its `unique` field replaced by
 * TPMS_DERIVE { label, context } (TPM 2.0 Part 2, TPMU_PUBLIC_ID with derivation).
 */
export function encodeDerivedTemplate(p: PublicArea, label: Buffer, context: Buffer): Buffer {
  if (label.length > 32 || context.length > 32) throw new SealError('INVALID_ARGUMENT', 'derivation label and context are at most 32 bytes each');
  const empty = encodePublicArea(p.type === 'ecc' ? { ...p, x: Buffer.alloc(0), y: Buffer.alloc(0) } : p.type === 'rsa' ? { ...p, modulus: Buffer.alloc(0) } : { ...p, unique: Buffer.alloc(0) });
  const uniqueLength = p.type === 'ecc' ? 4 : 2;
  return Buffer.concat([empty.subarray(0, empty.length - uniqueLength), new Writer().tpm2b(label).tpm2b(context).out()]);
}

/** TPM2B_PUBLIC wire bytes (size-prefixed TPMT_PUBLIC). */
export function encodePublic(p: PublicArea): Buffer {
  return new Writer().tpm2b(encodePublicArea(p)).out();
}

export function decodePublicArea(buf: Buffer): PublicArea {
  const r = new Reader(buf, 'TPMT_PUBLIC');
  const type = r.u16();
  const nameAlg = r.u16();
  const attributes = r.u32();
  const authPolicy = Buffer.from(r.tpm2b());
  let out: PublicArea;
  if (type === ALG.ECC) {
    const symmetric = readSymDef(r);
    const scheme = readScheme(r);
    const curve = r.u16();
    const kdf = readScheme(r);
    out = { type: 'ecc', nameAlg, attributes, authPolicy, symmetric, scheme, curve, kdf, x: Buffer.from(r.tpm2b()), y: Buffer.from(r.tpm2b()) };
  } else if (type === ALG.RSA) {
    const symmetric = readSymDef(r);
    const scheme = readScheme(r);
    out = { type: 'rsa', nameAlg, attributes, authPolicy, symmetric, scheme, keyBits: r.u16(), exponent: r.u32(), modulus: Buffer.from(r.tpm2b()) };
  } else if (type === ALG.KEYEDHASH) {
    out = { type: 'keyedhash', nameAlg, attributes, authPolicy, scheme: readScheme(r), unique: Buffer.from(r.tpm2b()) };
  } else if (type === ALG.SYMCIPHER) {
    out = { type: 'symcipher', nameAlg, attributes, authPolicy, symmetric: readSymDef(r), unique: Buffer.from(r.tpm2b()) };
  } else {
    throw new SealError('DEVICE_ERROR', `unknown TPM object type 0x${type.toString(16)}`);
  }
  r.end();
  return out;
}

/** Parses TPM2B_PUBLIC; returns the area and its TPMT_PUBLIC bytes (for the Name). */
export function decodePublic(tpm2b: Buffer): { area: PublicArea; bytes: Buffer } {
  const r = new Reader(tpm2b, 'TPM2B_PUBLIC');
  const bytes = Buffer.from(r.tpm2b());
  r.end();
  return { area: decodePublicArea(bytes), bytes };
}

/** The object's Name: nameAlg ‖ H_nameAlg(TPMT_PUBLIC). */
export function objectName(publicArea: Buffer): Buffer {
  const nameAlg = publicArea.readUInt16BE(2);
  const h = Buffer.alloc(2);
  h.writeUInt16BE(nameAlg);
  return Buffer.concat([h, createHash(nodeHash(nameAlg)).update(publicArea).digest()]);
}

export function attributeNames(attributes: number): string[] {
  return OBJECT_ATTRIBUTE_NAMES.filter(([bit]) => (attributes & bit) !== 0).map(([, n]) => n);
}

// ---- other inputs ------------------------------------------------------------------------------

/** TPM2B_SENSITIVE_CREATE. */
export function encodeSensitiveCreate(userAuth: Buffer = Buffer.alloc(0), data: Buffer = Buffer.alloc(0)): Buffer {
  const inner = new Writer().tpm2b(userAuth).tpm2b(data).out();
  return new Writer().tpm2b(inner).out();
}

/** TPMT_SIG_SCHEME / TPMT_RSA_DECRYPT (same layout for the schemes used here). */
export function encodeScheme(alg: number, hash?: number): Buffer {
  const w = new Writer().u16(alg);
  if (alg !== ALG.NULL) w.u16(hash ?? ALG.SHA256);
  return w.out();
}

export function encodeSymDef(s: SymDef): Buffer {
  const w = new Writer();
  writeSymDef(w, s);
  return w.out();
}

/** TPML_PCR_SELECTION for one bank. */
export function encodePcrSelection(hashAlg: number, pcrs: readonly number[]): Buffer {
  const bits = Buffer.alloc(3);
  for (const p of pcrs) {
    if (!Number.isInteger(p) || p < 0 || p > 23) throw new SealError('INVALID_ARGUMENT', `PCR index ${String(p)} is out of range 0..23`);
    bits[p >> 3] = (bits[p >> 3] as number) | (1 << (p & 7));
  }
  return new Writer().u32(1).u16(hashAlg).u8(3).bytes(bits).out();
}

export function decodePcrSelection(r: Reader): Array<{ hashAlg: number; pcrs: number[] }> {
  const count = r.u32();
  if (count > 16) throw new SealError('DEVICE_ERROR', 'implausible PCR selection count');
  const out: Array<{ hashAlg: number; pcrs: number[] }> = [];
  for (let i = 0; i < count; i++) {
    const hashAlg = r.u16();
    const size = r.u8();
    const bits = r.bytes(size);
    const pcrs: number[] = [];
    for (let p = 0; p < size * 8; p++) if (((bits[p >> 3] as number) >> (p & 7)) & 1) pcrs.push(p);
    out.push({ hashAlg, pcrs });
  }
  return out;
}

/** TPML_DIGEST → list of digests. */
export function decodeDigestList(buf: Buffer): Buffer[] {
  const r = new Reader(buf, 'TPML_DIGEST');
  const count = r.u32();
  if (count > 64) throw new SealError('DEVICE_ERROR', 'implausible digest count');
  const out: Buffer[] = [];
  for (let i = 0; i < count; i++) out.push(Buffer.from(r.tpm2b()));
  r.end();
  return out;
}

/** TPM2B_ECC_POINT of an uncompressed point 04‖x‖y. */
export function encodeEccPoint(point: Buffer, coordinate: number): Buffer {
  if (point.length !== 1 + 2 * coordinate || point[0] !== 0x04) throw new SealError('INVALID_ARGUMENT', 'EC point must be uncompressed');
  const inner = new Writer().tpm2b(point.subarray(1, 1 + coordinate)).tpm2b(point.subarray(1 + coordinate)).out();
  return new Writer().tpm2b(inner).out();
}

export const COORDINATE: Record<NamedCurve, number> = { 'P-256': 32, 'P-384': 48 };

// ---- outputs -----------------------------------------------------------------------------------

export type Signature =
  | { alg: 'ecdsa'; hash: number; r: Buffer; s: Buffer }
  | { alg: 'rsassa' | 'rsapss'; hash: number; sig: Buffer }
  | { alg: 'hmac'; hash: number; digest: Buffer };

export function decodeSignature(buf: Buffer): Signature {
  const r = new Reader(buf, 'TPMT_SIGNATURE');
  const alg = r.u16();
  let out: Signature;
  if (alg === ALG.ECDSA) {
    const hash = r.u16();
    out = { alg: 'ecdsa', hash, r: Buffer.from(r.tpm2b()), s: Buffer.from(r.tpm2b()) };
  } else if (alg === ALG.RSASSA || alg === ALG.RSAPSS) {
    const hash = r.u16();
    out = { alg: alg === ALG.RSASSA ? 'rsassa' : 'rsapss', hash, sig: Buffer.from(r.tpm2b()) };
  } else if (alg === ALG.HMAC) {
    const hash = r.u16();
    out = { alg: 'hmac', hash, digest: Buffer.from(r.bytes(digestSize(hash))) };
  } else {
    throw new SealError('DEVICE_ERROR', `unknown TPM signature algorithm 0x${alg.toString(16)}`);
  }
  r.end();
  return out;
}

export const TPM_GENERATED = 0xff544347;
export const ST_ATTEST_CERTIFY = 0x8017;
export const ST_ATTEST_QUOTE = 0x8018;

export interface Attest {
  type: number;
  qualifiedSigner: Buffer;
  extraData: Buffer;
  clock: bigint;
  resetCount: number;
  restartCount: number;
  safe: boolean;
  firmwareVersion: bigint;
  certify?: { name: Buffer; qualifiedName: Buffer };
  quote?: { selection: Array<{ hashAlg: number; pcrs: number[] }>; pcrDigest: Buffer };
}

/** TPMS_ATTEST (the bytes a TPM signs in Certify/Quote). */
export function decodeAttest(buf: Buffer): Attest {
  const r = new Reader(buf, 'TPMS_ATTEST');
  const magic = r.u32();
  if (magic !== TPM_GENERATED) throw new SealError('DEVICE_ERROR', 'attestation is not TPM-generated (bad magic)');
  const type = r.u16();
  const out: Attest = {
    type,
    qualifiedSigner: Buffer.from(r.tpm2b()),
    extraData: Buffer.from(r.tpm2b()),
    clock: r.u64(),
    resetCount: r.u32(),
    restartCount: r.u32(),
    safe: r.u8() !== 0,
    firmwareVersion: r.u64(),
  };
  if (type === ST_ATTEST_CERTIFY) out.certify = { name: Buffer.from(r.tpm2b()), qualifiedName: Buffer.from(r.tpm2b()) };
  else if (type === ST_ATTEST_QUOTE) out.quote = { selection: decodePcrSelection(r), pcrDigest: Buffer.from(r.tpm2b()) };
  else throw new SealError('DEVICE_ERROR', `unsupported attestation type 0x${type.toString(16)}`);
  r.end();
  return out;
}

/** TPMS_CAPABILITY_DATA for TPM_CAP_TPM_PROPERTIES → property map. */
export function decodeProperties(buf: Buffer): Map<number, number> {
  const r = new Reader(buf, 'TPMS_CAPABILITY_DATA');
  const cap = r.u32();
  if (cap !== 6) throw new SealError('DEVICE_ERROR', 'not a TPM properties capability');
  const count = r.u32();
  const out = new Map<number, number>();
  for (let i = 0; i < count; i++) out.set(r.u32(), r.u32());
  return out;
}

/** TPMS_CAPABILITY_DATA for TPM_CAP_COMMANDS → command codes. */
export function decodeCommands(buf: Buffer): Set<number> {
  const r = new Reader(buf, 'TPMS_CAPABILITY_DATA');
  if (r.u32() !== 2) throw new SealError('DEVICE_ERROR', 'not a TPM commands capability');
  const count = r.u32();
  const out = new Set<number>();
  for (let i = 0; i < count; i++) out.add(r.u32() & 0xffff);
  return out;
}

/** TPMS_CAPABILITY_DATA for TPM_CAP_HANDLES → handles. */
export function decodeHandles(buf: Buffer): number[] {
  const r = new Reader(buf, 'TPMS_CAPABILITY_DATA');
  if (r.u32() !== 1) throw new SealError('DEVICE_ERROR', 'not a TPM handles capability');
  const count = r.u32();
  const out: number[] = [];
  for (let i = 0; i < count; i++) out.push(r.u32());
  return out;
}

// ---- policy ------------------------------------------------------------------------------------

const CC_POLICY_PCR = 0x0000017f;

/** The policy digest TPM2_PolicyPCR produces from a zero digest, for the given PCR values. */
export function pcrPolicyDigest(hashAlg: number, selection: Buffer, pcrValues: readonly Buffer[]): Buffer {
  const h = nodeHash(hashAlg);
  const pcrDigest = createHash(h).update(Buffer.concat(pcrValues)).digest();
  const cc = Buffer.alloc(4);
  cc.writeUInt32BE(CC_POLICY_PCR);
  return createHash(h).update(Buffer.alloc(digestSize(hashAlg))).update(cc).update(selection).update(pcrDigest).digest();
}
