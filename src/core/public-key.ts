/**
 * Public keys between raw module forms (EC points, RSA modulus/exponent) and SubjectPublicKeyInfo, through node:crypto's JWK
 * import/export (no hand-written ASN.1): CKA_EC_POINT (a DER OCTET STRING around the point),
 * CKA_MODULUS + CKA_PUBLIC_EXPONENT.
 */
import { createPublicKey, type JsonWebKey } from 'node:crypto';
import { SealError } from './errors.js';
import type { KeyAlgorithm, NamedCurve } from './algorithms.js';

const COORD: Record<NamedCurve, number> = { 'P-256': 32, 'P-384': 48 };

/** Removes the DER OCTET STRING wrapper around CKA_EC_POINT when present (some modules omit it). */
export function unwrapEcPoint(value: Buffer, expectedLength: number): Buffer {
  if (value.length === expectedLength) return value;
  if (value[0] === 0x04) {
    let len = value[1]!;
    let off = 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      if (n < 1 || n > 2) throw new SealError('INVALID_ARGUMENT', 'malformed CKA_EC_POINT');
      len = n === 1 ? value[2]! : value.readUInt16BE(2);
      off = 2 + n;
    }
    if (off + len === value.length && len === expectedLength) return value.subarray(off);
  }
  throw new SealError('INVALID_ARGUMENT', 'malformed CKA_EC_POINT');
}

export function wrapEcPoint(point: Buffer): Buffer {
  if (point.length < 128) return Buffer.concat([Buffer.from([0x04, point.length]), point]);
  return Buffer.concat([Buffer.from([0x04, 0x81, point.length]), point]);
}

const b64u = (b: Buffer): string => b.toString('base64url');

export function spkiFromAttributes(a: KeyAlgorithm, attrs: { ecPoint?: Buffer; modulus?: Buffer; exponent?: Buffer }): Buffer {
  let jwk: JsonWebKey;
  if (a.name === 'ECDSA' || a.name === 'ECDH') {
    const n = COORD[a.namedCurve];
    const point = unwrapEcPoint(attrs.ecPoint ?? Buffer.alloc(0), 1 + 2 * n);
    if (point[0] !== 0x04) throw new SealError('NOT_SUPPORTED', 'compressed EC points are not supported');
    jwk = { kty: 'EC', crv: a.namedCurve, x: b64u(point.subarray(1, 1 + n)), y: b64u(point.subarray(1 + n)) };
  } else if (a.name === 'Ed25519') {
    jwk = { kty: 'OKP', crv: 'Ed25519', x: b64u(unwrapEcPoint(attrs.ecPoint ?? Buffer.alloc(0), 32)) };
  } else if (a.name === 'RSA') {
    if (!attrs.modulus || !attrs.exponent) throw new SealError('INVALID_ARGUMENT', 'RSA public key without modulus');
    jwk = { kty: 'RSA', n: b64u(stripZeros(attrs.modulus)), e: b64u(stripZeros(attrs.exponent)) };
  } else {
    throw new SealError('NOT_SUPPORTED', 'secret keys have no public key');
  }
  try {
    return createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'der' });
  } catch (e) {
    throw new SealError('INVALID_ARGUMENT', 'the public key values do not form a valid key (point not on the curve, or malformed)', { cause: e });
  }
}

function stripZeros(b: Buffer): Buffer {
  let i = 0;
  while (i < b.length - 1 && b[i] === 0) i++;
  return b.subarray(i);
}

/** Parses SPKI (DER or PEM) into the algorithm and the attributes a PKCS#11 public key object needs. */
export function attributesFromSpki(spki: Buffer | string): {
  algorithm: KeyAlgorithm;
  ecPoint?: Buffer;
  modulus?: Buffer;
  exponent?: Buffer;
} {
  let key;
  try {
    key = typeof spki === 'string' || spki.subarray(0, 10).toString('latin1').startsWith('-----')
      ? createPublicKey({ key: spki.toString(), format: 'pem' })
      : createPublicKey({ key: spki, format: 'der', type: 'spki' });
  } catch (e) {
    throw new SealError('INVALID_ARGUMENT', 'not a valid SubjectPublicKeyInfo public key', { cause: e });
  }
  const jwk = key.export({ format: 'jwk' });
  const d = (s: string | undefined): Buffer => Buffer.from(s ?? '', 'base64url');
  if (jwk.kty === 'EC' && (jwk.crv === 'P-256' || jwk.crv === 'P-384')) {
    return { algorithm: { name: 'ECDSA', namedCurve: jwk.crv }, ecPoint: Buffer.concat([Buffer.from([4]), d(jwk.x), d(jwk.y)]) };
  }
  if (jwk.kty === 'OKP' && jwk.crv === 'Ed25519') return { algorithm: { name: 'Ed25519' }, ecPoint: d(jwk.x) };
  if (jwk.kty === 'RSA') {
    const bits = d(jwk.n).length * 8;
    if (bits !== 2048 && bits !== 3072 && bits !== 4096) throw new SealError('NOT_SUPPORTED', `RSA-${bits} public keys are not supported`);
    return { algorithm: { name: 'RSA', modulusLength: bits }, modulus: d(jwk.n), exponent: d(jwk.e) };
  }
  throw new SealError('NOT_SUPPORTED', `public key type ${String(jwk.kty)} ${String(jwk.crv ?? '')} is not supported`);
}

/** The uncompressed EC point of a peer public key given as SPKI DER/PEM or as a raw point. */
export function peerPoint(peer: Buffer | string, curve: NamedCurve): Buffer {
  const n = COORD[curve];
  if (Buffer.isBuffer(peer) && peer.length === 1 + 2 * n && peer[0] === 0x04) {
    // an invalid-curve point never reaches a key agreement: node:crypto checks it lies on the curve
    spkiFromAttributes({ name: 'ECDH', namedCurve: curve }, { ecPoint: peer });
    return peer;
  }
  const parsed = attributesFromSpki(peer);
  if (parsed.algorithm.name !== 'ECDSA' || parsed.algorithm.namedCurve !== curve || !parsed.ecPoint) {
    throw new SealError('INVALID_ARGUMENT', `peer public key is not on ${curve}`);
  }
  return parsed.ecPoint;
}
