/**
 * Algorithms and usages, described once. WebCrypto-style names; the CLI's short names
 * (`ecdsa-p256`, `rsa-2048`, …) map onto the same table. Backends map these to their own
 * mechanisms in their own tables.
 */
import { SealError } from './errors.js';

export type NamedCurve = 'P-256' | 'P-384';
export type HashName = 'SHA-256' | 'SHA-384' | 'SHA-512';

export type KeyAlgorithm =
  | { name: 'ECDSA'; namedCurve: NamedCurve }
  | { name: 'ECDH'; namedCurve: NamedCurve }
  | { name: 'Ed25519' }
  | { name: 'RSA'; modulusLength: 2048 | 3072 | 4096 }
  | { name: 'AES'; length: 128 | 192 | 256 }
  | { name: 'HMAC'; hash: HashName; length?: number };

export type KeyUsage = 'sign' | 'verify' | 'encrypt' | 'decrypt' | 'wrapKey' | 'unwrapKey' | 'deriveKey';
export const KEY_USAGES: readonly KeyUsage[] = ['sign', 'verify', 'encrypt', 'decrypt', 'wrapKey', 'unwrapKey', 'deriveKey'];

export type KeyKind = 'private' | 'public' | 'secret';

/** Input accepted where a key algorithm is expected: the canonical form or a WebCrypto alias. */
export type KeyAlgorithmInput =
  | KeyAlgorithm
  | { name: 'RSASSA-PKCS1-v1_5' | 'RSA-PSS' | 'RSA-OAEP'; modulusLength: number }
  | { name: 'AES-GCM' | 'AES-KW' | 'AES-CBC'; length: number }
  | { name: 'EdDSA' | 'Ed25519'; namedCurve?: 'Ed25519' };

export function normalizeAlgorithm(input: KeyAlgorithmInput | undefined): KeyAlgorithm {
  if (!input || typeof input !== 'object' || typeof (input as { name?: unknown }).name !== 'string') {
    throw new SealError('INVALID_ARGUMENT', 'algorithm must be an object with a name');
  }
  const a = input as Record<string, unknown> & { name: string };
  const curve = (): NamedCurve => {
    if (a.namedCurve === 'P-256' || a.namedCurve === 'P-384') return a.namedCurve;
    throw new SealError('NOT_SUPPORTED', `curve ${String(a.namedCurve)} is not supported (P-256, P-384)`);
  };
  switch (a.name) {
    case 'ECDSA':
      return { name: 'ECDSA', namedCurve: curve() };
    case 'ECDH':
      return { name: 'ECDH', namedCurve: curve() };
    case 'Ed25519':
    case 'EdDSA':
      return { name: 'Ed25519' };
    case 'RSA':
    case 'RSASSA-PKCS1-v1_5':
    case 'RSA-PSS':
    case 'RSA-OAEP': {
      const n = a.modulusLength;
      if (n === 2048 || n === 3072 || n === 4096) return { name: 'RSA', modulusLength: n };
      throw new SealError('NOT_SUPPORTED', `RSA modulus length ${String(n)} is not supported (2048, 3072, 4096)`);
    }
    case 'AES':
    case 'AES-GCM':
    case 'AES-KW':
    case 'AES-CBC': {
      const l = a.length;
      if (l === 128 || l === 192 || l === 256) return { name: 'AES', length: l };
      throw new SealError('NOT_SUPPORTED', `AES key length ${String(l)} is not supported (128, 192, 256)`);
    }
    case 'HMAC': {
      const hash = typeof a.hash === 'object' && a.hash ? (a.hash as { name?: unknown }).name : a.hash;
      if (hash !== 'SHA-256' && hash !== 'SHA-384' && hash !== 'SHA-512') {
        throw new SealError('NOT_SUPPORTED', `HMAC hash ${String(hash)} is not supported`);
      }
      const length = typeof a.length === 'number' ? a.length : undefined;
      if (length !== undefined && (length < 128 || length > 1024 || length % 8)) {
        throw new SealError('INVALID_ARGUMENT', 'HMAC key length must be 128..1024 bits, whole bytes');
      }
      return length === undefined ? { name: 'HMAC', hash } : { name: 'HMAC', hash, length };
    }
    default:
      throw new SealError('NOT_SUPPORTED', `unknown algorithm '${a.name.slice(0, 40)}'`);
  }
}

/** The CLI's short algorithm names, with the usages a key of that kind gets by default. */
export const SHORT_ALGORITHMS: Record<string, { algorithm: KeyAlgorithm; usages: KeyUsage[] }> = {
  'ecdsa-p256': { algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] },
  'ecdsa-p384': { algorithm: { name: 'ECDSA', namedCurve: 'P-384' }, usages: ['sign', 'verify'] },
  ed25519: { algorithm: { name: 'Ed25519' }, usages: ['sign', 'verify'] },
  'rsa-2048': { algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['sign', 'verify'] },
  'rsa-3072': { algorithm: { name: 'RSA', modulusLength: 3072 }, usages: ['sign', 'verify'] },
  'rsa-4096': { algorithm: { name: 'RSA', modulusLength: 4096 }, usages: ['sign', 'verify'] },
  'ecdh-p256': { algorithm: { name: 'ECDH', namedCurve: 'P-256' }, usages: ['deriveKey'] },
  'ecdh-p384': { algorithm: { name: 'ECDH', namedCurve: 'P-384' }, usages: ['deriveKey'] },
  'aes-128': { algorithm: { name: 'AES', length: 128 }, usages: ['encrypt', 'decrypt'] },
  'aes-256': { algorithm: { name: 'AES', length: 256 }, usages: ['encrypt', 'decrypt'] },
  'hmac-sha256': { algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign', 'verify'] },
};

export function shortAlgorithm(name: string): { algorithm: KeyAlgorithm; usages: KeyUsage[] } {
  const entry = SHORT_ALGORITHMS[name];
  if (!entry) {
    throw new SealError('NOT_SUPPORTED', `unknown algorithm '${name.slice(0, 40)}'; one of: ${Object.keys(SHORT_ALGORITHMS).join(' ')}`);
  }
  return { algorithm: entry.algorithm, usages: [...entry.usages] };
}

/** The short name of a key algorithm, for listings (`ecdsa-p256`, `aes-256`, …). */
export function algorithmShortName(a: KeyAlgorithm): string {
  switch (a.name) {
    case 'ECDSA':
    case 'ECDH':
      return `${a.name.toLowerCase()}-${a.namedCurve.replace('-', '').toLowerCase()}`;
    case 'Ed25519':
      return 'ed25519';
    case 'RSA':
      return `rsa-${a.modulusLength}`;
    case 'AES':
      return `aes-${a.length}`;
    case 'HMAC':
      return `hmac-${a.hash.replace('-', '').toLowerCase()}`;
  }
}

export function isAsymmetric(a: KeyAlgorithm): boolean {
  return a.name !== 'AES' && a.name !== 'HMAC';
}

/** Usages a key of this algorithm can have at all. */
export function allowedUsages(a: KeyAlgorithm): KeyUsage[] {
  switch (a.name) {
    case 'ECDSA':
    case 'Ed25519':
      return ['sign', 'verify'];
    case 'ECDH':
      return ['deriveKey'];
    case 'RSA':
      return ['sign', 'verify', 'encrypt', 'decrypt', 'wrapKey', 'unwrapKey'];
    case 'AES':
      return ['encrypt', 'decrypt', 'wrapKey', 'unwrapKey', 'deriveKey'];
    case 'HMAC':
      return ['sign', 'verify', 'deriveKey'];
  }
}

export function checkUsages(a: KeyAlgorithm, usages: readonly string[]): KeyUsage[] {
  if (!Array.isArray(usages) || usages.length === 0) throw new SealError('INVALID_ARGUMENT', 'a key needs at least one usage');
  const allowed = allowedUsages(a);
  for (const u of usages) {
    if (!(KEY_USAGES as readonly string[]).includes(u)) throw new SealError('INVALID_ARGUMENT', `unknown usage '${String(u).slice(0, 30)}'`);
    if (!allowed.includes(u as KeyUsage)) {
      throw new SealError('USAGE_NOT_PERMITTED', `usage '${u}' is not possible for ${algorithmShortName(a)} keys`);
    }
  }
  return [...new Set(usages as KeyUsage[])];
}

export function defaultHash(a: KeyAlgorithm): HashName {
  if ((a.name === 'ECDSA' || a.name === 'ECDH') && a.namedCurve === 'P-384') return 'SHA-384';
  if (a.name === 'HMAC') return a.hash;
  return 'SHA-256';
}
