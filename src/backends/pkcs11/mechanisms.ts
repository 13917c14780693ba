/**
 * The PKCS#11 side of the algorithm table: key types, key-generation mechanisms and templates,
 * and the capability rows (algorithm × operation → mechanism). Every private and secret key
 * template sets every protection attribute and every usage flag explicitly.
 */
import pkcs11 from 'pkcs11js';
import type { Template } from 'pkcs11js';
import type { KeyAlgorithm, KeyUsage, NamedCurve, HashName } from '../../core/algorithms.js';
import type { Capability } from '../../core/types.js';

/** Constants pkcs11js 2.1.7 does not export (PKCS#11 v3.0). */
export const CK = {
  CKK_EC_EDWARDS: 0x40,
  CKM_EC_EDWARDS_KEY_PAIR_GEN: 0x1055,
  CKM_EDDSA: 0x1057,
  CKZ_DATA_SPECIFIED: 0x1,
  CKM_HKDF_DERIVE: 0x402a,
  CKM_SP800_108_COUNTER_KDF: 0x3ac,
} as const;

/** DER of the curve OIDs for CKA_EC_PARAMS. */
export const CURVE_OID_DER: Record<NamedCurve | 'Ed25519', Buffer> = {
  'P-256': Buffer.from('06082a8648ce3d030107', 'hex'), // 1.2.840.10045.3.1.7
  'P-384': Buffer.from('06052b81040022', 'hex'), // 1.3.132.0.34
  Ed25519: Buffer.from('06032b6570', 'hex'), // 1.3.101.112 (RFC 8410)
};

export const HASH_MECH: Record<HashName | 'SHA-1', { mech: number; mgf: number; size: number; node: string }> = {
  'SHA-1': { mech: pkcs11.CKM_SHA_1, mgf: pkcs11.CKG_MGF1_SHA1, size: 20, node: 'sha1' },
  'SHA-256': { mech: pkcs11.CKM_SHA256, mgf: pkcs11.CKG_MGF1_SHA256, size: 32, node: 'sha256' },
  'SHA-384': { mech: pkcs11.CKM_SHA384, mgf: pkcs11.CKG_MGF1_SHA384, size: 48, node: 'sha384' },
  'SHA-512': { mech: pkcs11.CKM_SHA512, mgf: pkcs11.CKG_MGF1_SHA512, size: 64, node: 'sha512' },
};

export const HMAC_MECH: Record<HashName, number> = {
  'SHA-256': pkcs11.CKM_SHA256_HMAC,
  'SHA-384': pkcs11.CKM_SHA384_HMAC,
  'SHA-512': pkcs11.CKM_SHA512_HMAC,
};

/** DigestInfo prefixes for RSASSA-PKCS1-v1_5 over a host-computed hash (RFC 8017 §9.2 note 1). */
export const DIGEST_INFO: Record<HashName, Buffer> = {
  'SHA-256': Buffer.from('3031300d060960864801650304020105000420', 'hex'),
  'SHA-384': Buffer.from('3041300d060960864801650304020205000430', 'hex'),
  'SHA-512': Buffer.from('3051300d060960864801650304020305000440', 'hex'),
};

export function algorithmLabel(a: KeyAlgorithm): string {
  switch (a.name) {
    case 'ECDSA':
    case 'ECDH':
      return `${a.name} ${a.namedCurve}`;
    case 'Ed25519':
      return 'Ed25519';
    case 'RSA':
      return `RSA-${a.modulusLength}`;
    case 'AES':
      return `AES-${a.length}`;
    case 'HMAC':
      return `HMAC ${a.hash}`;
  }
}

export function keyTypeOf(a: KeyAlgorithm): number {
  switch (a.name) {
    case 'ECDSA':
    case 'ECDH':
      return pkcs11.CKK_EC;
    case 'Ed25519':
      return CK.CKK_EC_EDWARDS;
    case 'RSA':
      return pkcs11.CKK_RSA;
    case 'AES':
      return pkcs11.CKK_AES;
    case 'HMAC':
      return pkcs11.CKK_GENERIC_SECRET;
  }
}

export function keyGenMechanism(a: KeyAlgorithm): number {
  switch (a.name) {
    case 'ECDSA':
    case 'ECDH':
      return pkcs11.CKM_EC_KEY_PAIR_GEN;
    case 'Ed25519':
      return CK.CKM_EC_EDWARDS_KEY_PAIR_GEN;
    case 'RSA':
      return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN;
    case 'AES':
      return pkcs11.CKM_AES_KEY_GEN;
    case 'HMAC':
      return pkcs11.CKM_GENERIC_SECRET_KEY_GEN;
  }
}

export function secretLengthBytes(a: KeyAlgorithm): number | undefined {
  if (a.name === 'AES') return a.length / 8;
  if (a.name === 'HMAC') return (a.length ?? HASH_MECH[a.hash].size * 8) / 8;
  return undefined;
}

interface Naming {
  label: string;
  id: Buffer;
  token: boolean;
}

const has = (u: readonly KeyUsage[], x: KeyUsage): boolean => u.includes(x);

/** Template of a private key: protected, with exactly the requested usages. */
export function privateTemplate(a: KeyAlgorithm, usages: readonly KeyUsage[], n: Naming): Template {
  return [
    { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_PRIVATE_KEY },
    { type: pkcs11.CKA_KEY_TYPE, value: keyTypeOf(a) },
    { type: pkcs11.CKA_TOKEN, value: n.token },
    { type: pkcs11.CKA_PRIVATE, value: true },
    { type: pkcs11.CKA_SENSITIVE, value: true },
    { type: pkcs11.CKA_EXTRACTABLE, value: false },
    { type: pkcs11.CKA_LABEL, value: n.label },
    { type: pkcs11.CKA_ID, value: n.id },
    { type: pkcs11.CKA_SIGN, value: has(usages, 'sign') },
    { type: pkcs11.CKA_SIGN_RECOVER, value: false },
    { type: pkcs11.CKA_DECRYPT, value: has(usages, 'decrypt') },
    { type: pkcs11.CKA_UNWRAP, value: has(usages, 'unwrapKey') },
    { type: pkcs11.CKA_DERIVE, value: has(usages, 'deriveKey') },
  ];
}

/** Template of the public half: public, no secret usages. */
export function publicTemplate(a: KeyAlgorithm, usages: readonly KeyUsage[], n: Naming): Template {
  const t: Template = [
    { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_PUBLIC_KEY },
    { type: pkcs11.CKA_KEY_TYPE, value: keyTypeOf(a) },
    { type: pkcs11.CKA_TOKEN, value: n.token },
    { type: pkcs11.CKA_PRIVATE, value: false },
    { type: pkcs11.CKA_LABEL, value: n.label },
    { type: pkcs11.CKA_ID, value: n.id },
    { type: pkcs11.CKA_VERIFY, value: has(usages, 'verify') || has(usages, 'sign') },
    { type: pkcs11.CKA_VERIFY_RECOVER, value: false },
    { type: pkcs11.CKA_ENCRYPT, value: has(usages, 'encrypt') || has(usages, 'decrypt') },
    { type: pkcs11.CKA_WRAP, value: has(usages, 'wrapKey') || has(usages, 'unwrapKey') },
    { type: pkcs11.CKA_DERIVE, value: false },
  ];
  if (a.name === 'ECDSA' || a.name === 'ECDH') t.push({ type: pkcs11.CKA_EC_PARAMS, value: CURVE_OID_DER[a.namedCurve] });
  if (a.name === 'Ed25519') t.push({ type: pkcs11.CKA_EC_PARAMS, value: CURVE_OID_DER.Ed25519 });
  if (a.name === 'RSA') {
    t.push({ type: pkcs11.CKA_MODULUS_BITS, value: a.modulusLength });
    t.push({ type: pkcs11.CKA_PUBLIC_EXPONENT, value: Buffer.from([1, 0, 1]) });
  }
  return t;
}

/** Template of a secret key (generated, derived or unwrapped): protected, exact usages. */
export function secretTemplate(a: KeyAlgorithm, usages: readonly KeyUsage[], n: Naming, withLength = true): Template {
  const t: Template = [
    { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_SECRET_KEY },
    { type: pkcs11.CKA_KEY_TYPE, value: keyTypeOf(a) },
    { type: pkcs11.CKA_TOKEN, value: n.token },
    { type: pkcs11.CKA_PRIVATE, value: true },
    { type: pkcs11.CKA_SENSITIVE, value: true },
    { type: pkcs11.CKA_EXTRACTABLE, value: false },
    { type: pkcs11.CKA_LABEL, value: n.label },
    { type: pkcs11.CKA_ID, value: n.id },
    { type: pkcs11.CKA_ENCRYPT, value: has(usages, 'encrypt') },
    { type: pkcs11.CKA_DECRYPT, value: has(usages, 'decrypt') },
    { type: pkcs11.CKA_SIGN, value: has(usages, 'sign') },
    { type: pkcs11.CKA_VERIFY, value: has(usages, 'verify') },
    { type: pkcs11.CKA_WRAP, value: has(usages, 'wrapKey') },
    { type: pkcs11.CKA_UNWRAP, value: has(usages, 'unwrapKey') },
    { type: pkcs11.CKA_DERIVE, value: has(usages, 'deriveKey') },
  ];
  const len = secretLengthBytes(a);
  if (withLength && len !== undefined) t.push({ type: pkcs11.CKA_VALUE_LEN, value: len });
  return t;
}

/** One row of what this backend can do, and the mechanism the module must offer for it. */
export interface MechanismRow extends Capability {
  requires: number[];
}

const EC_ALGS: Array<[string, NamedCurve]> = [
  ['ECDSA P-256', 'P-256'],
  ['ECDSA P-384', 'P-384'],
];

function rows(): MechanismRow[] {
  const r: MechanismRow[] = [];
  const add = (row: Omit<MechanismRow, 'mechanism'> & { mechanism: string }): void => {
    r.push(row);
  };
  for (const [alg] of EC_ALGS) {
    add({ algorithm: alg, operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'CKM_EC_KEY_PAIR_GEN', requires: [pkcs11.CKM_EC_KEY_PAIR_GEN] });
    add({ algorithm: alg, operation: 'sign', variant: 'ECDSA (DER or P1363), hash on host', result: 'output', mechanism: 'CKM_ECDSA', requires: [pkcs11.CKM_ECDSA] });
    add({ algorithm: alg, operation: 'verify', variant: 'ECDSA', result: 'output', mechanism: 'host (public key)', requires: [] });
  }
  add({ algorithm: 'Ed25519', operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'CKM_EC_EDWARDS_KEY_PAIR_GEN', requires: [CK.CKM_EC_EDWARDS_KEY_PAIR_GEN] });
  add({ algorithm: 'Ed25519', operation: 'sign', variant: 'EdDSA (RFC 8032)', result: 'output', mechanism: 'CKM_EDDSA', requires: [CK.CKM_EDDSA] });
  add({ algorithm: 'Ed25519', operation: 'verify', variant: 'EdDSA', result: 'output', mechanism: 'host (public key)', requires: [] });
  for (const bits of [2048, 3072, 4096]) {
    const alg = `RSA-${bits}`;
    add({ algorithm: alg, operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'CKM_RSA_PKCS_KEY_PAIR_GEN', requires: [pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN] });
    add({ algorithm: alg, operation: 'sign', variant: 'RSASSA-PKCS1-v1_5', result: 'output', mechanism: 'CKM_RSA_PKCS', requires: [pkcs11.CKM_RSA_PKCS] });
    add({ algorithm: alg, operation: 'sign', variant: 'RSA-PSS', result: 'output', mechanism: 'CKM_RSA_PKCS_PSS', requires: [pkcs11.CKM_RSA_PKCS_PSS] });
    add({ algorithm: alg, operation: 'verify', variant: 'PKCS1-v1_5 / PSS', result: 'output', mechanism: 'host (public key)', requires: [] });
    add({ algorithm: alg, operation: 'decrypt', variant: 'RSA-OAEP', result: 'output', mechanism: 'CKM_RSA_PKCS_OAEP', requires: [pkcs11.CKM_RSA_PKCS_OAEP] });
    add({ algorithm: alg, operation: 'unwrap', variant: 'RSA-OAEP', result: 'key-inside', mechanism: 'CKM_RSA_PKCS_OAEP', requires: [pkcs11.CKM_RSA_PKCS_OAEP] });
  }
  for (const [alg] of [['ECDH P-256'], ['ECDH P-384']] as const) {
    add({ algorithm: alg, operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'CKM_EC_KEY_PAIR_GEN', requires: [pkcs11.CKM_EC_KEY_PAIR_GEN] });
    add({ algorithm: alg, operation: 'agree', variant: 'ECDH (CKD_NULL) into an AES or generic secret', result: 'key-inside', mechanism: 'CKM_ECDH1_DERIVE', requires: [pkcs11.CKM_ECDH1_DERIVE] });
  }
  for (const len of [128, 256]) {
    const alg = `AES-${len}`;
    add({ algorithm: alg, operation: 'generate', variant: 'secret key', result: 'key-inside', mechanism: 'CKM_AES_KEY_GEN', requires: [pkcs11.CKM_AES_KEY_GEN] });
    add({ algorithm: alg, operation: 'encrypt', variant: 'AES-GCM', result: 'output', mechanism: 'CKM_AES_GCM', requires: [pkcs11.CKM_AES_GCM] });
    add({ algorithm: alg, operation: 'decrypt', variant: 'AES-GCM', result: 'output', mechanism: 'CKM_AES_GCM', requires: [pkcs11.CKM_AES_GCM] });
    add({ algorithm: alg, operation: 'wrap', variant: 'AES-KW (RFC 3394)', result: 'output', mechanism: 'CKM_AES_KEY_WRAP', requires: [pkcs11.CKM_AES_KEY_WRAP], note: 'only keys the module lets out wrapped' });
    add({ algorithm: alg, operation: 'unwrap', variant: 'AES-KW (RFC 3394)', result: 'key-inside', mechanism: 'CKM_AES_KEY_WRAP', requires: [pkcs11.CKM_AES_KEY_WRAP] });
    add({ algorithm: alg, operation: 'unwrap', variant: 'AES-KWP (RFC 5649)', result: 'key-inside', mechanism: 'CKM_AES_KEY_WRAP_PAD', requires: [pkcs11.CKM_AES_KEY_WRAP_PAD] });
    add({ algorithm: alg, operation: 'derive', variant: 'AES-CBC-ENCRYPT-DATA', result: 'key-inside', mechanism: 'CKM_AES_CBC_ENCRYPT_DATA', requires: [pkcs11.CKM_AES_CBC_ENCRYPT_DATA] });
    add({ algorithm: alg, operation: 'derive', variant: 'AES-ECB-ENCRYPT-DATA', result: 'key-inside', mechanism: 'CKM_AES_ECB_ENCRYPT_DATA', requires: [pkcs11.CKM_AES_ECB_ENCRYPT_DATA], note: 'native shim' });
  }
  add({ algorithm: 'HMAC SHA-256', operation: 'generate', variant: 'generic secret', result: 'key-inside', mechanism: 'CKM_GENERIC_SECRET_KEY_GEN', requires: [pkcs11.CKM_GENERIC_SECRET_KEY_GEN] });
  add({ algorithm: 'HMAC SHA-256', operation: 'sign', variant: 'HMAC-SHA-256', result: 'output', mechanism: 'CKM_SHA256_HMAC', requires: [pkcs11.CKM_SHA256_HMAC] });
  add({ algorithm: 'HMAC SHA-256', operation: 'verify', variant: 'HMAC-SHA-256', result: 'output', mechanism: 'CKM_SHA256_HMAC', requires: [pkcs11.CKM_SHA256_HMAC] });
  add({ algorithm: 'HMAC SHA-256', operation: 'derive', variant: 'HKDF', result: 'key-inside', mechanism: 'CKM_HKDF_DERIVE', requires: [CK.CKM_HKDF_DERIVE], note: 'native shim' });
  add({ algorithm: 'HMAC SHA-256', operation: 'derive', variant: 'SP800-108-COUNTER', result: 'key-inside', mechanism: 'CKM_SP800_108_COUNTER_KDF', requires: [CK.CKM_SP800_108_COUNTER_KDF], note: 'native shim' });
  return r;
}

/** Everything this backend knows how to do, before asking a module. */
export const PKCS11_MECHANISM_ROWS: readonly MechanismRow[] = rows();

/** The rows a module offers, given its mechanism list. */
export function capabilitiesFor(mechanisms: ReadonlySet<number>): Capability[] {
  return PKCS11_MECHANISM_ROWS.filter((row) => row.requires.every((m) => mechanisms.has(m))).map(({ requires: _r, ...cap }) => cap);
}
