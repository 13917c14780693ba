/**
 * Encodings shared by every backend: PEM armour, ECDSA signatures between IEEE P1363 (r‖s) and
 * DER (RFC 3279 Ecdsa-Sig-Value; parsed through @peculiar/asn1-ecc).
 */
import { AsnConvert } from '@peculiar/asn1-schema';
import { ECDSASigValue } from '@peculiar/asn1-ecc';
import { SealError } from './errors.js';

export function toPem(der: Buffer, label = 'PUBLIC KEY'): string {
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

/** A DER INTEGER's content for an unsigned big-endian value: no redundant zeros, 0x00 before a set top bit. */
function integerContent(b: Buffer): Buffer {
  let i = 0;
  while (i < b.length - 1 && b[i] === 0) i++;
  const v = b.subarray(i);
  return v[0]! & 0x80 ? Buffer.concat([ZERO, v]) : v;
}
const ZERO = Buffer.from([0]);

/**
 * r‖s → DER Ecdsa-Sig-Value. Written out rather than built through the ASN.1 library because it
 * runs once per signature on the event loop: two INTEGERs in a SEQUENCE (unit tests check it
 * against @peculiar/asn1-ecc's encoding for every curve size and edge case).
 */
export function p1363ToDer(sig: Buffer): Buffer {
  if (sig.length === 0 || sig.length % 2) throw new SealError('INVALID_ARGUMENT', 'malformed P1363 signature');
  const n = sig.length / 2;
  const r = integerContent(sig.subarray(0, n));
  const s = integerContent(sig.subarray(n));
  const body = 4 + r.length + s.length; // at most 2 × (66 + 1) + 4 = 138 for P-521
  const head = body < 0x80 ? Buffer.from([0x30, body]) : Buffer.from([0x30, 0x81, body]);
  return Buffer.concat([head, Buffer.from([0x02, r.length]), r, Buffer.from([0x02, s.length]), s]);
}

export function derToP1363(der: Buffer, coordinateLength: number): Buffer {
  let v: ECDSASigValue;
  try {
    v = AsnConvert.parse(der, ECDSASigValue);
  } catch (e) {
    throw new SealError('INVALID_ARGUMENT', 'malformed DER ECDSA signature', { cause: e });
  }
  // strict DER: only the canonical encoding is accepted (no trailing bytes, no padded or negative integers)
  const canonical = (x: ArrayBuffer): boolean => {
    const b = Buffer.from(x);
    return b.length > 0 && (b[0]! & 0x80) === 0 && !(b.length > 1 && b[0] === 0 && (b[1]! & 0x80) === 0);
  };
  if (!canonical(v.r) || !canonical(v.s) || !Buffer.from(AsnConvert.serialize(v)).equals(der)) {
    throw new SealError('INVALID_ARGUMENT', 'malformed DER ECDSA signature');
  }
  const fix = (x: ArrayBuffer): Buffer => {
    let b = Buffer.from(x);
    while (b.length > coordinateLength && b[0] === 0) b = b.subarray(1);
    if (b.length > coordinateLength) throw new SealError('INVALID_ARGUMENT', 'ECDSA signature value too long for the curve');
    return Buffer.concat([Buffer.alloc(coordinateLength - b.length), b]);
  };
  return Buffer.concat([fix(v.r), fix(v.s)]);
}
