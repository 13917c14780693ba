/**
 * The server side of TPM provisioning and attestation, in plain TypeScript with node:crypto: no
 * TPM, no native code. A provisioning server wraps a key for one TPM's storage key
 * (`wrapForTpm`, a TPM2_Duplicate-format blob with an outer wrapper only) and a verifier checks
 * what an attestation key signed (`verifyQuote`, `verifyCertify`).
 *
 * Wrapping (TPM 2.0 Part 1, "Protected Storage" / "Duplication", ECC parent):
 *   ephemeral ECDH with the SRK → Z;  seed = KDFe(SHA-256, Z, "DUPLICATE", eph.x, srk.x, 256)
 *   symKey = KDFa(SHA-256, seed, "STORAGE", name, ∅, 128);  hmacKey = KDFa(SHA-256, seed, "INTEGRITY", ∅, ∅, 256)
 *   dupSensitive = AES-128-CFB(symKey, iv 0, TPM2B(TPMT_SENSITIVE))
 *   duplicate = TPM2B( TPM2B(HMAC(hmacKey, dupSensitive ‖ name)) ‖ dupSensitive )
 */
import { createCipheriv, createECDH, createHash, createHmac, createPublicKey, randomBytes, verify as nodeVerify, type KeyObject } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import { p1363ToDer } from '../../core/encoding.js';
import {
  ALG,
  CURVE,
  OBJ,
  ST_ATTEST_CERTIFY,
  ST_ATTEST_QUOTE,
  Writer,
  decodeAttest,
  decodePublic,
  decodeSignature,
  encodePublic,
  nodeHash,
  objectName,
  type Attest,
  type PublicArea,
} from './marshal.js';
import type { WrappedTpmKey } from './environment.js';
import { spkiOf } from './environment.js';

/** TPM 2.0 KDFa (SP 800-108 counter mode, HMAC). */
export function kdfa(hash: string, key: Buffer, label: string, contextU: Buffer, contextV: Buffer, bits: number): Buffer {
  const out: Buffer[] = [];
  const l = Buffer.concat([Buffer.from(label, 'latin1'), Buffer.from([0])]);
  const lenBits = Buffer.alloc(4);
  lenBits.writeUInt32BE(bits);
  let total = 0;
  for (let i = 1; total * 8 < bits; i++) {
    const counter = Buffer.alloc(4);
    counter.writeUInt32BE(i);
    const block = createHmac(hash, key).update(counter).update(l).update(contextU).update(contextV).update(lenBits).digest();
    out.push(block);
    total += block.length;
  }
  return Buffer.concat(out).subarray(0, bits / 8);
}

/** TPM 2.0 KDFe (SP 800-56A concatenation KDF). */
export function kdfe(hash: string, z: Buffer, label: string, partyU: Buffer, partyV: Buffer, bits: number): Buffer {
  const out: Buffer[] = [];
  const l = Buffer.concat([Buffer.from(label, 'latin1'), Buffer.from([0])]);
  let total = 0;
  for (let i = 1; total * 8 < bits; i++) {
    const counter = Buffer.alloc(4);
    counter.writeUInt32BE(i);
    const block = createHash(hash).update(counter).update(z).update(l).update(partyU).update(partyV).digest();
    out.push(block);
    total += block.length;
  }
  return Buffer.concat(out).subarray(0, bits / 8);
}

/**
 * Wraps a private key (node:crypto KeyObject: EC P-256/P-384 or RSA-2048) for the TPM whose storage
 * key public area is `srkPublic` (TPM2B_PUBLIC, from `storageKeyPublic()` on the device). Only that
 * TPM can import the result; the imported key is not duplicable again (no policy).
 */
export function wrapForTpm(srkPublic: Buffer, privateKey: KeyObject | { derivationSeed: Buffer }, usage: 'sign' | 'decrypt' = 'sign'): WrappedTpmKey {
  const srk = decodePublic(srkPublic).area;
  if (srk.type !== 'ecc' || srk.curve !== CURVE['P-256'] || (srk.attributes & (OBJ.restricted | OBJ.decrypt)) !== (OBJ.restricted | OBJ.decrypt)) {
    throw new SealError('NOT_SUPPORTED', 'wrapForTpm needs an ECC P-256 storage key');
  }
  const jwk = 'derivationSeed' in privateKey ? {} : privateKey.export({ format: 'jwk' });
  const d = (s: string | undefined): Buffer => Buffer.from(s ?? '', 'base64url');
  const attrs = OBJ.userWithAuth | OBJ.noDA | (usage === 'sign' ? OBJ.sign : OBJ.decrypt);
  let area: PublicArea;
  let sensitive: Buffer;
  if ('derivationSeed' in privateKey) {
    // a derivation parent whose secret the server keeps: it can compute every key the TPM derives
    // from it. The TPM derives from the parent's sensitive data (TPM2B_SENSITIVE_DATA), so the
    // secret goes there; seedValue is a fresh obfuscation value and unique = HMAC(seedValue, data).
    const secret = privateKey.derivationSeed;
    if (secret.length !== 32) throw new SealError('INVALID_ARGUMENT', 'a derivation secret is 32 bytes');
    const obfuscation = randomBytes(32);
    area = {
      type: 'keyedhash',
      nameAlg: ALG.SHA256,
      attributes: OBJ.userWithAuth | OBJ.noDA | OBJ.restricted | OBJ.decrypt,
      authPolicy: Buffer.alloc(0),
      scheme: { alg: ALG.XOR, hash: ALG.SHA256, kdf: ALG.KDF1_SP800_108 },
      unique: createHmac('sha256', obfuscation).update(secret).digest(),
    };
    sensitive = new Writer().u16(ALG.KEYEDHASH).tpm2b().tpm2b(obfuscation).tpm2b(secret).out();
  } else if (jwk.kty === 'EC' && (jwk.crv === 'P-256' || jwk.crv === 'P-384')) {
    area = { type: 'ecc', nameAlg: ALG.SHA256, attributes: attrs, authPolicy: Buffer.alloc(0), symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.NULL }, curve: CURVE[jwk.crv], kdf: { alg: ALG.NULL }, x: d(jwk.x), y: d(jwk.y) };
    sensitive = new Writer().u16(ALG.ECC).tpm2b().tpm2b().tpm2b(d(jwk.d)).out();
  } else if (jwk.kty === 'RSA' && d(jwk.n).length === 256) {
    area = { type: 'rsa', nameAlg: ALG.SHA256, attributes: attrs, authPolicy: Buffer.alloc(0), symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.NULL }, keyBits: 2048, exponent: d(jwk.e).readUIntBE(0, d(jwk.e).length) === 65537 ? 0 : d(jwk.e).readUIntBE(0, d(jwk.e).length), modulus: d(jwk.n) };
    sensitive = new Writer().u16(ALG.RSA).tpm2b().tpm2b().tpm2b(d(jwk.p)).out();
  } else {
    throw new SealError('NOT_SUPPORTED', 'wrapForTpm wraps EC P-256/P-384 and RSA-2048 private keys');
  }
  const pub = encodePublic(area);
  const name = objectName(pub.subarray(2));

  // seed, agreed with the SRK through an ephemeral ECDH key
  const eph = createECDH('prime256v1');
  eph.generateKeys();
  const srkPoint = Buffer.concat([Buffer.from([4]), srk.x, srk.y]);
  const z = eph.computeSecret(srkPoint);
  const ephPub = eph.getPublicKey();
  const ephX = ephPub.subarray(1, 33);
  const ephY = ephPub.subarray(33);
  const seed = kdfe('sha256', z, 'DUPLICATE', ephX, srk.x, 256);
  const symKey = kdfa('sha256', seed, 'STORAGE', name, Buffer.alloc(0), 128);
  const hmacKey = kdfa('sha256', seed, 'INTEGRITY', Buffer.alloc(0), Buffer.alloc(0), 256);
  const plain = new Writer().tpm2b(sensitive).out();
  const c = createCipheriv('aes-128-cfb', symKey, Buffer.alloc(16));
  const dupSensitive = Buffer.concat([c.update(plain), c.final()]);
  const integrity = createHmac('sha256', hmacKey).update(dupSensitive).update(name).digest();
  const duplicate = new Writer().tpm2b(new Writer().tpm2b(integrity).bytes(dupSensitive).out()).out();
  const seedPoint = new Writer().tpm2b(ephX).tpm2b(ephY).out();
  for (const b of [z, seed, symKey, hmacKey, plain, sensitive]) b.fill(0);
  return { public: pub, duplicate, seed: new Writer().tpm2b(seedPoint).out() };
}

/** TPM_MAX_DERIVATION_BITS: the KDF limit a TPM's derivation DRBG is instantiated with (libtpms, TCG reference code). */
const MAX_DERIVATION_BITS = 8192;

/**
 * The HMAC-SHA-256 key a TPM derives as a derived object (TPM2_CreateLoaded, label, context) under
 * a derivation parent whose secret is `parentSecret` — what a provisioning server that made the
 * parent with `wrapForTpm(srk, { derivationSeed })` computes to share the key with the device:
 * the first block of KDFa(SHA-256, secret, label, context, TPM_MAX_DERIVATION_BITS).
 */
export function tpmDerivedHmacKey(parentSecret: Buffer, label: Buffer, context: Buffer): Buffer {
  const counter = Buffer.alloc(4);
  counter.writeUInt32BE(1);
  const bits = Buffer.alloc(4);
  bits.writeUInt32BE(MAX_DERIVATION_BITS);
  const l = label.length > 0 && label[label.length - 1] === 0 ? label : Buffer.concat([label, Buffer.from([0])]);
  return createHmac('sha256', parentSecret).update(counter).update(l).update(context).update(bits).digest();
}

export interface AttestationResult {
  attest: Attest;
}

function checkSignature(akPublic: KeyObject | Buffer, attest: Buffer, signature: Buffer): void {
  const key = Buffer.isBuffer(akPublic) ? createPublicKey({ key: akPublic, format: 'der', type: 'spki' }) : akPublic;
  if (key.asymmetricKeyType !== 'ec') throw new SealError('NOT_SUPPORTED', 'only ECDSA attestation keys are supported');
  const sig = decodeSignature(signature);
  if (sig.alg !== 'ecdsa') throw new SealError('NOT_SUPPORTED', 'only ECDSA attestation signatures are verified');
  const n = key.asymmetricKeyDetails?.namedCurve === 'secp384r1' ? 48 : 32;
  const pad = (b: Buffer): Buffer => {
    let v = b;
    while (v.length > n && v[0] === 0) v = v.subarray(1);
    if (v.length > n) throw new SealError('USAGE_NOT_PERMITTED', 'attestation signature does not verify');
    return Buffer.concat([Buffer.alloc(n - v.length), v]);
  };
  const der = p1363ToDer(Buffer.concat([pad(sig.r), pad(sig.s)]));
  if (!nodeVerify(nodeHash(sig.hash), attest, key, der)) throw new SealError('USAGE_NOT_PERMITTED', 'attestation signature does not verify');
}

/**
 * Checks a TPM2_Quote: the attestation key's signature, the nonce, and (when given) that the
 * quoted PCR digest is the SHA-256 of the expected PCR values in index order. Throws SealError
 * on any mismatch; returns the parsed attestation.
 */
export function verifyQuote(
  akPublic: KeyObject | Buffer,
  quote: { attest: Buffer; signature: Buffer },
  nonce: Buffer,
  expectedPcrs?: { pcrs: number[]; values: Buffer[] },
): AttestationResult {
  checkSignature(akPublic, quote.attest, quote.signature);
  const attest = decodeAttest(quote.attest);
  if (attest.type !== ST_ATTEST_QUOTE || !attest.quote) throw new SealError('INVALID_ARGUMENT', 'not a quote');
  if (!attest.extraData.equals(nonce)) throw new SealError('USAGE_NOT_PERMITTED', 'quote nonce does not match');
  if (expectedPcrs) {
    const sel = attest.quote.selection;
    const quoted = sel.length === 1 && sel[0]!.hashAlg === ALG.SHA256 ? sel[0]!.pcrs : [];
    const wanted = [...expectedPcrs.pcrs].sort((a, b) => a - b);
    if (quoted.join(',') !== wanted.join(',')) throw new SealError('USAGE_NOT_PERMITTED', 'quote covers other PCRs than expected');
    const digest = createHash('sha256').update(Buffer.concat(expectedPcrs.values)).digest();
    if (!digest.equals(attest.quote.pcrDigest)) throw new SealError('USAGE_NOT_PERMITTED', 'quoted PCR digest does not match the expected PCR values');
  }
  return { attest };
}

/**
 * Checks a TPM2_Certify: signature, nonce, and that the certified Name is the Name of the key
 * whose TPM2B_PUBLIC is `certifiedPublic` (so the verifier learns that key's public key lives in
 * the same TPM as the attestation key).
 */
export function verifyCertify(akPublic: KeyObject | Buffer, result: { attest: Buffer; signature: Buffer }, nonce: Buffer, certifiedPublic: Buffer): AttestationResult & { spki: Buffer | undefined } {
  checkSignature(akPublic, result.attest, result.signature);
  const attest = decodeAttest(result.attest);
  if (attest.type !== ST_ATTEST_CERTIFY || !attest.certify) throw new SealError('INVALID_ARGUMENT', 'not a certification');
  if (!attest.extraData.equals(nonce)) throw new SealError('USAGE_NOT_PERMITTED', 'certification nonce does not match');
  const { area, bytes } = decodePublic(certifiedPublic);
  if (!objectName(bytes).equals(attest.certify.name)) throw new SealError('USAGE_NOT_PERMITTED', 'certified Name is not the Name of the given public area');
  const alg = area.type === 'ecc' ? { name: 'ECDSA' as const, namedCurve: area.curve === CURVE['P-384'] ? ('P-384' as const) : ('P-256' as const) } : area.type === 'rsa' ? { name: 'RSA' as const, modulusLength: 2048 as const } : undefined;
  return { attest, spki: alg ? spkiOf(alg, area) : undefined };
}
