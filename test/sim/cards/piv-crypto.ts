/**
 * The cryptography behind the virtual PIV card, all from node:crypto: key pairs (kept as PKCS#8
 * in the card's state file), the private-key operations PIV defines on the card side (ECDSA over a
 * digest the host computed, raw RSA, ECDH returning the x-coordinate), the management key's block
 * cipher (3DES / AES, ECB, one block per step of the challenge-response), and YubiKey-style
 * attestation certificates built with @peculiar/x509. Test code only.
 */
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import {
  constants,
  createCipheriv,
  createDecipheriv,
  createECDH,
  createPrivateKey,
  createPublicKey,
  generateKeyPair as generateKeyPairCb,
  privateDecrypt,
  randomBytes,
  webcrypto,
  type KeyObject,
} from 'node:crypto';
import { promisify } from 'node:util';
import { tlv } from './piv-tlv.js';

const generateKeyPair = promisify(generateKeyPairCb);

/** PIV algorithm identifiers (SP 800-78-4 Table 6-2) the card supports for key slots. */
export const ALG = { RSA1024: 0x06, RSA2048: 0x07, ECCP256: 0x11, ECCP384: 0x14 } as const;
export type KeyAlg = (typeof ALG)[keyof typeof ALG];

/** Management key algorithms: 3DES (also `00` in older PIV specs), AES-128/192/256. */
export type MgmtAlgName = '3des' | 'aes128' | 'aes192' | 'aes256';
export const MGMT_ALGS: Record<MgmtAlgName, { id: number; keyLength: number; blockLength: number; cipher: string }> = {
  '3des': { id: 0x03, keyLength: 24, blockLength: 8, cipher: 'des-ede3' },
  aes128: { id: 0x08, keyLength: 16, blockLength: 16, cipher: 'aes-128-ecb' },
  aes192: { id: 0x0a, keyLength: 24, blockLength: 16, cipher: 'aes-192-ecb' },
  aes256: { id: 0x0c, keyLength: 32, blockLength: 16, cipher: 'aes-256-ecb' },
};

export function mgmtAlgById(id: number): MgmtAlgName | undefined {
  return (Object.keys(MGMT_ALGS) as MgmtAlgName[]).find((k) => MGMT_ALGS[k].id === id);
}

/** One block of the management key's cipher in ECB mode, no padding. */
export function mgmtCipher(alg: MgmtAlgName, key: Buffer, block: Buffer, encrypt: boolean): Buffer {
  const c = MGMT_ALGS[alg];
  const cipher = encrypt ? createCipheriv(c.cipher, key, null) : createDecipheriv(c.cipher, key, null);
  cipher.setAutoPadding(false);
  return Buffer.concat([cipher.update(block), cipher.final()]);
}

interface CurveInfo {
  name: 'P-256' | 'P-384';
  ecdhName: string;
  order: bigint;
  bytes: number;
}

const CURVES: Partial<Record<number, CurveInfo>> = {
  [ALG.ECCP256]: {
    name: 'P-256',
    ecdhName: 'prime256v1',
    order: 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n,
    bytes: 32,
  },
  [ALG.ECCP384]: {
    name: 'P-384',
    ecdhName: 'secp384r1',
    order: 0xffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973n,
    bytes: 48,
  },
};

const RSA_BITS: Partial<Record<number, number>> = { [ALG.RSA1024]: 1024, [ALG.RSA2048]: 2048 };

export const isEcAlg = (alg: number): boolean => CURVES[alg] !== undefined;
export const isRsaAlg = (alg: number): boolean => RSA_BITS[alg] !== undefined;
export const isKeyAlg = (alg: number): alg is KeyAlg => isEcAlg(alg) || isRsaAlg(alg);

const b64u = (s: string | undefined): Buffer => Buffer.from(s ?? '', 'base64url');
const toBig = (b: Buffer): bigint => (b.length === 0 ? 0n : BigInt('0x' + b.toString('hex')));
function fromBig(n: bigint, length: number): Buffer {
  const hex = n.toString(16).padStart(length * 2, '0');
  return Buffer.from(hex.slice(-length * 2), 'hex');
}
function modPow(base: bigint, exp: bigint, mod: bigint): bigint {
  let result = 1n;
  base %= mod;
  while (exp > 0n) {
    if (exp & 1n) result = (result * base) % mod;
    base = (base * base) % mod;
    exp >>= 1n;
  }
  return result;
}
function modInverse(a: bigint, m: bigint): bigint {
  let [r0, r1] = [((a % m) + m) % m, m];
  let [s0, s1] = [1n, 0n];
  while (r1 !== 0n) {
    const q = r0 / r1;
    [r0, r1] = [r1, r0 - q * r1];
    [s0, s1] = [s1, s0 - q * s1];
  }
  return ((s0 % m) + m) % m;
}

/** A key pair as the state file keeps it. */
export interface StoredKey {
  alg: KeyAlg;
  /** PKCS#8 DER, base64. */
  pkcs8: string;
}

export async function generateKey(alg: KeyAlg): Promise<StoredKey> {
  const curve = CURVES[alg];
  const { privateKey } = curve
    ? await generateKeyPair('ec', { namedCurve: curve.name })
    : await generateKeyPair('rsa', { modulusLength: RSA_BITS[alg]!, publicExponent: 65537 });
  return { alg, pkcs8: privateKey.export({ format: 'der', type: 'pkcs8' }).toString('base64') };
}

export function privateKeyOf(key: StoredKey): KeyObject {
  return createPrivateKey({ key: Buffer.from(key.pkcs8, 'base64'), format: 'der', type: 'pkcs8' });
}

export function spkiOf(key: StoredKey): Buffer {
  return createPublicKey(privateKeyOf(key)).export({ format: 'der', type: 'spki' });
}

/** The public key as PIV encodes it inside `7F49` (and YubiKey metadata tag 04): `86` point or `81` modulus + `82` exponent. */
export function pivPublicKey(key: StoredKey): Buffer {
  const jwk = privateKeyOf(key).export({ format: 'jwk' });
  if (isEcAlg(key.alg)) return tlv(0x86, Buffer.from([0x04]), b64u(jwk.x), b64u(jwk.y));
  return Buffer.concat([tlv(0x81, b64u(jwk.n)), tlv(0x82, b64u(jwk.e))]);
}

/** Byte length of the RSA modulus or of the curve's field. */
export function keyLength(alg: KeyAlg): number {
  return CURVES[alg]?.bytes ?? RSA_BITS[alg]! / 8;
}

function derInteger(n: bigint): Buffer {
  let hex = n.toString(16);
  if (hex.length % 2) hex = '0' + hex;
  let b = Buffer.from(hex, 'hex');
  if (b[0]! & 0x80) b = Buffer.concat([Buffer.from([0]), b]);
  return tlv(0x02, b);
}

/**
 * ECDSA (FIPS 186-4 6.4) over a digest the host computed: the digest is truncated to the bit
 * length of the group order, k is fresh randomness, the signature is a DER SEQUENCE { r, s }.
 */
export function ecdsaSignDigest(key: StoredKey, digest: Buffer): Buffer {
  const curve = CURVES[key.alg]!;
  const d = toBig(b64u(privateKeyOf(key).export({ format: 'jwk' }).d));
  const nBits = curve.bytes * 8;
  let e = toBig(digest);
  if (digest.length * 8 > nBits) e >>= BigInt(digest.length * 8 - nBits);
  for (;;) {
    const k = toBig(randomBytes(curve.bytes)) % curve.order;
    if (k === 0n) continue;
    // k·G through node's ECDH: the "public key" of private scalar k
    const ecdh = createECDH(curve.ecdhName);
    ecdh.setPrivateKey(fromBig(k, curve.bytes));
    const point = ecdh.getPublicKey();
    const r = toBig(point.subarray(1, 1 + curve.bytes)) % curve.order;
    if (r === 0n) continue;
    const s = (modInverse(k, curve.order) * (e + r * d)) % curve.order;
    if (s === 0n) continue;
    return tlv(0x30, derInteger(r), derInteger(s));
  }
}

/** ECDH (SP 800-56A, cofactor 1): the x-coordinate of d·Q; `undefined` for a point not on the curve. */
export function ecdhSharedX(key: StoredKey, peerPoint: Buffer): Buffer | undefined {
  const curve = CURVES[key.alg]!;
  if (peerPoint.length !== 1 + 2 * curve.bytes || peerPoint[0] !== 0x04) return undefined;
  const ecdh = createECDH(curve.ecdhName);
  ecdh.setPrivateKey(b64u(privateKeyOf(key).export({ format: 'jwk' }).d));
  try {
    return ecdh.computeSecret(peerPoint);
  } catch {
    return undefined;
  }
}

/** The raw RSA private-key operation m^d mod n (PIV sign and decrypt alike); `undefined` when m ≥ n or the length is not the modulus length. */
export function rsaRaw(key: StoredKey, block: Buffer): Buffer | undefined {
  if (block.length !== keyLength(key.alg)) return undefined;
  try {
    // RSA_NO_PADDING: the input is already a padded block; the card adds and removes no padding
    return privateDecrypt({ key: privateKeyOf(key), padding: constants.RSA_NO_PADDING }, block);
  } catch {
    return undefined;
  }
}

/** Builds a key pair from imported private components (YubiKey IMPORT KEY, INS FE). */
export function importKey(alg: KeyAlg, parts: Map<number, Buffer>): StoredKey | undefined {
  try {
    const curve = CURVES[alg];
    if (curve) {
      const d = parts.get(0x06);
      if (!d || d.length !== curve.bytes) return undefined;
      const ecdh = createECDH(curve.ecdhName);
      ecdh.setPrivateKey(d);
      const pub = ecdh.getPublicKey();
      const jwk = {
        kty: 'EC',
        crv: curve.name,
        d: d.toString('base64url'),
        x: pub.subarray(1, 1 + curve.bytes).toString('base64url'),
        y: pub.subarray(1 + curve.bytes).toString('base64url'),
      };
      const k = createPrivateKey({ key: jwk, format: 'jwk' });
      return { alg, pkcs8: k.export({ format: 'der', type: 'pkcs8' }).toString('base64') };
    }
    const half = keyLength(alg) / 2;
    const [p, q, dp, dq, qinv] = [1, 2, 3, 4, 5].map((t) => parts.get(t));
    if (!p || !q || !dp || !dq || !qinv) return undefined;
    if ([p, q, dp, dq, qinv].some((x) => x.length !== half)) return undefined;
    const P = toBig(p);
    const Q = toBig(q);
    const e = 65537n; // YubiKey import assumes F4
    const d = modInverse(e, (P - 1n) * (Q - 1n));
    const n = P * Q;
    const full = keyLength(alg);
    if (n.toString(16).length > full * 2) return undefined;
    const jwk = {
      kty: 'RSA',
      n: fromBig(n, full).toString('base64url'),
      e: fromBig(e, 3).toString('base64url'),
      d: fromBig(d, full).toString('base64url'),
      p: p.toString('base64url'),
      q: q.toString('base64url'),
      dp: dp.toString('base64url'),
      dq: dq.toString('base64url'),
      qi: qinv.toString('base64url'),
    };
    // reject inconsistent CRT components and a round trip that does not give m back
    if (toBig(dp) !== d % (P - 1n) || toBig(dq) !== d % (Q - 1n) || (toBig(qinv) * Q) % P !== 1n) return undefined;
    const m = 0x1234567n;
    if (modPow(modPow(m, d, n), e, n) !== m) return undefined;
    const k = createPrivateKey({ key: jwk, format: 'jwk' });
    return { alg, pkcs8: k.export({ format: 'der', type: 'pkcs8' }).toString('base64') };
  } catch {
    return undefined;
  }
}

const YUBICO_OID = '1.3.6.1.4.1.41482.3';

/** The attestation key (slot F9) and its self-signed certificate, made once when the card is created. */
export async function createAttestationIdentity(serial: number): Promise<{ key: StoredKey; certDer: Buffer }> {
  const key = await generateKey(ALG.ECCP256);
  const signingKey = await webcrypto.subtle.importKey('pkcs8', Buffer.from(key.pkcs8, 'base64'), { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
  const notBefore = new Date(Date.now() - 60_000);
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: randomBytes(8).toString('hex').replace(/^[89a-f]/, '1'),
      subject: `CN=seal-bridge virtual PIV attestation ${serial}`,
      issuer: `CN=seal-bridge virtual PIV attestation ${serial}`,
      notBefore,
      notAfter: new Date(notBefore.getTime() + 20 * 365 * 86_400_000),
      publicKey: spkiOf(key),
      signingKey,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      extensions: [new x509.BasicConstraintsExtension(true, 0, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)],
    },
    webcrypto as unknown as X509Crypto,
  );
  return { key, certDer: Buffer.from(cert.rawData) };
}

type X509Crypto = Parameters<typeof x509.X509CertificateGenerator.create>[1];

/**
 * A YubiKey-style attestation certificate for a slot's public key: issued by the F9 key, subject
 * `CN=YubiKey PIV Attestation <slot>`, with Yubico's extensions for firmware version (…3.3),
 * serial (…3.7), PIN/touch policy (…3.8) and form factor (…3.9).
 */
export async function attestSlot(params: {
  slot: number;
  key: StoredKey;
  attestationKey: StoredKey;
  attestationCertDer: Buffer;
  version: [number, number, number];
  serial: number;
  pinPolicy: number;
  touchPolicy: number;
}): Promise<Buffer> {
  const issuerCert = new x509.X509Certificate(params.attestationCertDer);
  const signingKey = await webcrypto.subtle.importKey(
    'pkcs8',
    Buffer.from(params.attestationKey.pkcs8, 'base64'),
    { name: 'ECDSA', namedCurve: 'P-256' },
    false,
    ['sign'],
  );
  const serialDer = derInteger(BigInt(params.serial));
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: randomBytes(8).toString('hex').replace(/^[89a-f]/, '1'),
      subject: `CN=YubiKey PIV Attestation ${params.slot.toString(16).padStart(2, '0')}`,
      issuer: issuerCert.subject,
      notBefore: new Date(Date.now() - 60_000),
      notAfter: issuerCert.notAfter,
      publicKey: spkiOf(params.key),
      signingKey,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      extensions: [
        new x509.Extension(`${YUBICO_OID}.3`, false, Buffer.from(params.version)),
        new x509.Extension(`${YUBICO_OID}.7`, false, serialDer),
        new x509.Extension(`${YUBICO_OID}.8`, false, Buffer.from([params.pinPolicy, params.touchPolicy])),
        new x509.Extension(`${YUBICO_OID}.9`, false, Buffer.from([0x01])), // form factor: USB-A keychain
      ],
    },
    webcrypto as unknown as X509Crypto,
  );
  return Buffer.from(cert.rawData);
}
