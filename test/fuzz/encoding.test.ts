/**
 * Fuzz: signature and public-key encodings read from outside — DER ↔ IEEE P1363 ECDSA signatures
 * (src/core/encoding.ts), SubjectPublicKeyInfo in DER and PEM, raw and wrapped EC points, peer
 * keys (src/core/public-key.ts). Oracles are node:crypto: a DER signature it verifies, the SPKI it
 * exports. test/unit/encoding.test.ts holds the spec vectors and hand-made malformed cases.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createPublicKey, generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { derToP1363, p1363ToDer, toPem } from '../../src/core/encoding.js';
import { attributesFromSpki, peerPoint, spkiFromAttributes, unwrapEcPoint, wrapEcPoint } from '../../src/core/public-key.js';
import { bytes, fuzz, mutated, mutatedOrRandom, sealOnly, timeoutFor } from './support.js';

const p256 = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
const p384 = generateKeyPairSync('ec', { namedCurve: 'secp384r1' });
const ed = generateKeyPairSync('ed25519');
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const spkiOf = (k: KeyObject): Buffer => k.export({ type: 'spki', format: 'der' });

const SIG_SEEDS = [
  sign('sha256', Buffer.from('a'), { key: p256.privateKey, dsaEncoding: 'der' }),
  sign('sha384', Buffer.from('b'), { key: p384.privateKey, dsaEncoding: 'der' }),
  Buffer.from('3006020101020101', 'hex'),
  Buffer.from('30080202008002020080', 'hex'),
];

describe('fuzz: ECDSA signature encodings', () => {
  it(
    'derToP1363: INVALID_ARGUMENT, or 2n bytes that p1363ToDer turns back into the very same DER',
    () => {
      fuzz('derToP1363', fc.tuple(mutatedOrRandom(SIG_SEEDS, 200), fc.constantFrom(32, 48, 66)), ([der, n]) => {
        const raw = sealOnly(() => derToP1363(der, n), ['INVALID_ARGUMENT']);
        if (!raw) return;
        expect(raw.length).toBe(2 * n);
        // only canonical DER is accepted, so the way back is exact
        expect(p1363ToDer(raw).equals(der)).toBe(true);
      });
    },
    timeoutFor(1),
  );

  it(
    'p1363ToDer: INVALID_ARGUMENT for empty or odd input, else DER that reads back to the same r‖s',
    () => {
      fuzz('p1363ToDer', bytes(200), (raw) => {
        const der = sealOnly(() => p1363ToDer(raw), ['INVALID_ARGUMENT']);
        if (!der) return expect(raw.length === 0 || raw.length % 2 === 1).toBe(true);
        expect(derToP1363(der, raw.length / 2).equals(raw)).toBe(true);
      });
    },
    timeoutFor(1),
  );
});

const SPKI_SEEDS = [spkiOf(p256.publicKey), spkiOf(p384.publicKey), spkiOf(ed.publicKey), spkiOf(rsa.publicKey)];

describe('fuzz: public keys', () => {
  it(
    'attributesFromSpki (DER): a SealError, or attributes from which spkiFromAttributes rebuilds the SPKI node:crypto reads',
    () => {
      fuzz('attributesFromSpki (DER)', mutatedOrRandom(SPKI_SEEDS, 400), (der) => {
        const attrs = sealOnly(() => attributesFromSpki(der), ['INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (!attrs) return;
        const oracle = createPublicKey({ key: der, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
        expect(spkiFromAttributes(attrs.algorithm, attrs).equals(oracle)).toBe(true);
      });
    },
    timeoutFor(2),
  );

  it(
    'attributesFromSpki (PEM text and PEM bytes): a SealError or the key node:crypto reads',
    () => {
      const pemArb = fc.tuple(mutated(SPKI_SEEDS, 2), fc.constantFrom('PUBLIC KEY', 'RSA PUBLIC KEY', 'CERTIFICATE', 'X'), fc.boolean(), fc.boolean()).map(([der, label, asBuffer, damage]) => {
        let pem = toPem(der, label);
        if (damage) pem = pem.replace(/[A-Za-z]/, '!').replace('-----END', '--END');
        return asBuffer ? Buffer.from(pem) : pem;
      });
      fuzz('attributesFromSpki (PEM)', fc.oneof(pemArb, fc.string({ maxLength: 200 }).map((s) => `-----BEGIN PUBLIC KEY-----\n${s}\n-----END PUBLIC KEY-----\n`)), (pem) => {
        const attrs = sealOnly(() => attributesFromSpki(pem), ['INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (!attrs) return;
        const oracle = createPublicKey({ key: pem.toString(), format: 'pem' }).export({ type: 'spki', format: 'der' });
        expect(spkiFromAttributes(attrs.algorithm, attrs).equals(oracle)).toBe(true);
      });
    },
    timeoutFor(2),
  );

  it(
    'peerPoint: INVALID_ARGUMENT/NOT_SUPPORTED or an uncompressed point that lies on the named curve (no invalid-curve points reach a key agreement)',
    () => {
      const rawPoint = Buffer.concat([Buffer.from([4]), Buffer.from(p256.publicKey.export({ format: 'jwk' }).x!, 'base64url'), Buffer.from(p256.publicKey.export({ format: 'jwk' }).y!, 'base64url')]);
      fuzz('peerPoint', fc.tuple(mutatedOrRandom([...SPKI_SEEDS, rawPoint], 200), fc.constantFrom('P-256' as const, 'P-384' as const)), ([peer, curve]) => {
        const point = sealOnly(() => peerPoint(peer, curve), ['INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (!point) return;
        const n = curve === 'P-256' ? 32 : 48;
        expect(point.length).toBe(1 + 2 * n);
        expect(point[0]).toBe(4);
        // the oracle: node:crypto (OpenSSL) accepts the point as a public key on that curve
        const jwk = { kty: 'EC', crv: curve, x: point.subarray(1, 1 + n).toString('base64url'), y: point.subarray(1 + n).toString('base64url') };
        expect(() => createPublicKey({ key: jwk, format: 'jwk' }), 'peerPoint returned a point that is not on the curve').not.toThrow();
      });
    },
    timeoutFor(2),
  );

  it(
    'unwrapEcPoint and spkiFromAttributes on module-supplied CKA_EC_POINT values: a SealError or an SPKI node:crypto reads',
    () => {
      const point = Buffer.concat([Buffer.from([4]), Buffer.from(p256.publicKey.export({ format: 'jwk' }).x!, 'base64url'), Buffer.from(p256.publicKey.export({ format: 'jwk' }).y!, 'base64url')]);
      fuzz('unwrapEcPoint + spkiFromAttributes', mutatedOrRandom([wrapEcPoint(point), point], 200), (value) => {
        const p = sealOnly(() => unwrapEcPoint(value, 65), ['INVALID_ARGUMENT']);
        if (p) expect(p.length).toBe(65);
        const spki = sealOnly(() => spkiFromAttributes({ name: 'ECDSA', namedCurve: 'P-256' }, { ecPoint: value }), ['INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (spki) expect(createPublicKey({ key: spki, format: 'der', type: 'spki' }).asymmetricKeyType).toBe('ec');
      });
    },
    timeoutFor(1),
  );
});
