/**
 * The algorithm table: WebCrypto-style names and aliases (W3C Web Cryptography API §18–§29 names),
 * the CLI's 11 short names, and which usages a key of each kind may have.
 */
import { describe, expect, it } from 'vitest';
import { SealError, SHORT_ALGORITHMS, algorithmShortName, normalizeAlgorithm, shortAlgorithm } from '../../src/index.js';
import { checkUsages, type KeyAlgorithm, type KeyAlgorithmInput } from '../../src/core/algorithms.js';

function expectCode(fn: () => unknown, code: string): SealError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(SealError);
  expect((caught as SealError).code).toBe(code);
  return caught as SealError;
}

describe('normalizeAlgorithm', () => {
  it.each<[string, unknown, KeyAlgorithm]>([
    ['ECDSA P-256', { name: 'ECDSA', namedCurve: 'P-256' }, { name: 'ECDSA', namedCurve: 'P-256' }],
    ['ECDSA P-384', { name: 'ECDSA', namedCurve: 'P-384' }, { name: 'ECDSA', namedCurve: 'P-384' }],
    ['ECDH P-256', { name: 'ECDH', namedCurve: 'P-256' }, { name: 'ECDH', namedCurve: 'P-256' }],
    ['Ed25519', { name: 'Ed25519' }, { name: 'Ed25519' }],
    ['EdDSA alias', { name: 'EdDSA', namedCurve: 'Ed25519' }, { name: 'Ed25519' }],
    ['RSA', { name: 'RSA', modulusLength: 3072 }, { name: 'RSA', modulusLength: 3072 }],
    ['RSASSA-PKCS1-v1_5 alias', { name: 'RSASSA-PKCS1-v1_5', modulusLength: 2048 }, { name: 'RSA', modulusLength: 2048 }],
    ['RSA-PSS alias', { name: 'RSA-PSS', modulusLength: 4096 }, { name: 'RSA', modulusLength: 4096 }],
    ['RSA-OAEP alias', { name: 'RSA-OAEP', modulusLength: 2048 }, { name: 'RSA', modulusLength: 2048 }],
    ['AES', { name: 'AES', length: 192 }, { name: 'AES', length: 192 }],
    ['AES-GCM alias', { name: 'AES-GCM', length: 256 }, { name: 'AES', length: 256 }],
    ['AES-KW alias', { name: 'AES-KW', length: 128 }, { name: 'AES', length: 128 }],
    ['AES-CBC alias', { name: 'AES-CBC', length: 256 }, { name: 'AES', length: 256 }],
    ['HMAC with a hash name', { name: 'HMAC', hash: 'SHA-256' }, { name: 'HMAC', hash: 'SHA-256' }],
    ['HMAC with a WebCrypto hash object', { name: 'HMAC', hash: { name: 'SHA-384' } }, { name: 'HMAC', hash: 'SHA-384' }],
    ['HMAC with a length', { name: 'HMAC', hash: 'SHA-512', length: 512 }, { name: 'HMAC', hash: 'SHA-512', length: 512 }],
  ])('%s', (_name, input, expected) => {
    expect(normalizeAlgorithm(input as KeyAlgorithmInput)).toEqual(expected);
  });

  it.each<[string, unknown, string]>([
    ['undefined', undefined, 'INVALID_ARGUMENT'],
    ['null', null, 'INVALID_ARGUMENT'],
    ['a string', 'ECDSA', 'INVALID_ARGUMENT'],
    ['no name', { namedCurve: 'P-256' }, 'INVALID_ARGUMENT'],
    ['a numeric name', { name: 42 }, 'INVALID_ARGUMENT'],
    ['unknown name', { name: 'ROT13' }, 'NOT_SUPPORTED'],
    ['names are case-sensitive', { name: 'ecdsa', namedCurve: 'P-256' }, 'NOT_SUPPORTED'],
    ['curve P-521', { name: 'ECDSA', namedCurve: 'P-521' }, 'NOT_SUPPORTED'],
    ['curve missing', { name: 'ECDH' }, 'NOT_SUPPORTED'],
    ['secp256k1', { name: 'ECDSA', namedCurve: 'secp256k1' }, 'NOT_SUPPORTED'],
    ['RSA-1024', { name: 'RSA', modulusLength: 1024 }, 'NOT_SUPPORTED'],
    ['RSA without length', { name: 'RSA-PSS' }, 'NOT_SUPPORTED'],
    ['RSA length as a string', { name: 'RSA', modulusLength: '2048' }, 'NOT_SUPPORTED'],
    ['AES-64', { name: 'AES-GCM', length: 64 }, 'NOT_SUPPORTED'],
    ['AES-512', { name: 'AES', length: 512 }, 'NOT_SUPPORTED'],
    ['HMAC SHA-1', { name: 'HMAC', hash: 'SHA-1' }, 'NOT_SUPPORTED'],
    ['HMAC without hash', { name: 'HMAC' }, 'NOT_SUPPORTED'],
    ['HMAC key shorter than 128 bits', { name: 'HMAC', hash: 'SHA-256', length: 64 }, 'INVALID_ARGUMENT'],
    ['HMAC key not whole bytes', { name: 'HMAC', hash: 'SHA-256', length: 260 }, 'INVALID_ARGUMENT'],
    ['HMAC key longer than 1024 bits', { name: 'HMAC', hash: 'SHA-256', length: 2048 }, 'INVALID_ARGUMENT'],
  ])('refuses %s', (_name, input, code) => {
    expectCode(() => normalizeAlgorithm(input as KeyAlgorithmInput), code);
  });

  it('an unknown name is not echoed at length', () => {
    const e = expectCode(() => normalizeAlgorithm({ name: 'X'.repeat(10_000) } as unknown as KeyAlgorithmInput), 'NOT_SUPPORTED');
    expect(e.message.length).toBeLessThan(200);
  });
});

describe('shortAlgorithm (the CLI names)', () => {
  const EXPECTED: Record<string, { algorithm: KeyAlgorithm; usages: string[] }> = {
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

  it('there are exactly the 11 CLI names', () => {
    expect(Object.keys(SHORT_ALGORITHMS).sort()).toEqual(Object.keys(EXPECTED).sort());
  });

  it.each(Object.entries(EXPECTED))('%s', (name, expected) => {
    const got = shortAlgorithm(name);
    expect(got.algorithm).toEqual(expected.algorithm);
    expect([...got.usages].sort()).toEqual([...expected.usages].sort());
    // the long form normalizes to itself, its short name is the CLI name, and its usages are allowed
    expect(normalizeAlgorithm(got.algorithm)).toEqual(got.algorithm);
    expect(algorithmShortName(got.algorithm)).toBe(name);
    expect(checkUsages(got.algorithm, got.usages)).toEqual(got.usages);
  });

  it('returns a copy: changing the result does not change the table', () => {
    const a = shortAlgorithm('aes-256');
    a.usages.push('wrapKey');
    expect(shortAlgorithm('aes-256').usages).toEqual(['encrypt', 'decrypt']);
  });

  it.each(['ECDSA-P256', 'p256', 'aes-192', 'rsa-1024', 'hmac-sha1', ''])('refuses %j with NOT_SUPPORTED and lists the choices', (name) => {
    const e = expectCode(() => shortAlgorithm(name), 'NOT_SUPPORTED');
    expect(e.message).toContain('ecdsa-p256');
  });
});

describe('checkUsages', () => {
  const EC: KeyAlgorithm = { name: 'ECDSA', namedCurve: 'P-256' };
  const ECDH: KeyAlgorithm = { name: 'ECDH', namedCurve: 'P-256' };
  const ED: KeyAlgorithm = { name: 'Ed25519' };
  const RSA: KeyAlgorithm = { name: 'RSA', modulusLength: 2048 };
  const AES: KeyAlgorithm = { name: 'AES', length: 256 };
  const HMAC: KeyAlgorithm = { name: 'HMAC', hash: 'SHA-256' };

  it.each<[string, KeyAlgorithm, string[]]>([
    ['ECDSA sign+verify', EC, ['sign', 'verify']],
    ['Ed25519 sign', ED, ['sign']],
    ['ECDH deriveKey', ECDH, ['deriveKey']],
    ['RSA everything it can', RSA, ['sign', 'verify', 'encrypt', 'decrypt', 'wrapKey', 'unwrapKey']],
    ['AES everything it can', AES, ['encrypt', 'decrypt', 'wrapKey', 'unwrapKey', 'deriveKey']],
    ['HMAC sign+verify', HMAC, ['sign', 'verify']],
  ])('accepts %s', (_n, alg, usages) => {
    expect(checkUsages(alg, usages)).toEqual(usages);
  });

  it.each<[string, KeyAlgorithm, string]>([
    ['ECDSA encrypt', EC, 'encrypt'],
    ['ECDSA deriveKey', EC, 'deriveKey'],
    ['Ed25519 decrypt', ED, 'decrypt'],
    ['ECDH sign', ECDH, 'sign'],
    ['RSA deriveKey', RSA, 'deriveKey'],
    ['AES sign', AES, 'sign'],
    ['HMAC encrypt', HMAC, 'encrypt'],
    ['HMAC wrapKey', HMAC, 'wrapKey'],
  ])('refuses %s with USAGE_NOT_PERMITTED', (_n, alg, usage) => {
    expectCode(() => checkUsages(alg, [usage]), 'USAGE_NOT_PERMITTED');
  });

  it('refuses an empty list, a non-list and an unknown usage with INVALID_ARGUMENT', () => {
    expectCode(() => checkUsages(EC, []), 'INVALID_ARGUMENT');
    expectCode(() => checkUsages(EC, 'sign' as unknown as string[]), 'INVALID_ARGUMENT');
    expectCode(() => checkUsages(EC, ['sign', 'fly']), 'INVALID_ARGUMENT');
    expectCode(() => checkUsages(AES, ['Encrypt']), 'INVALID_ARGUMENT');
  });

  it('removes duplicates, keeping the first occurrence order', () => {
    expect(checkUsages(AES, ['decrypt', 'encrypt', 'decrypt'])).toEqual(['decrypt', 'encrypt']);
  });
});
