/**
 * Encodings shared by every backend: PEM armour, ECDSA signatures between IEEE P1363 (r‖s) and
 * DER (RFC 3279 Ecdsa-Sig-Value).
 */
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
  const ri = Buffer.concat([Buffer.from([0x02]), derLength(r.length), r]);
  const si = Buffer.concat([Buffer.from([0x02]), derLength(s.length), s]);
  return Buffer.concat([Buffer.from([0x30]), derLength(ri.length + si.length), ri, si]);
}

/** A DER length in its minimal form. */
function derLength(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const bytes: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

/** Reads a minimal definite DER length at `pos`: [length, position after it], or undefined. */
function readLength(b: Buffer, pos: number): [number, number] | undefined {
  const first = b[pos];
  if (first === undefined) return undefined;
  if (first < 0x80) return [first, pos + 1];
  const k = first & 0x7f;
  if (k === 0 || k > 4 || pos + k >= b.length || b[pos + 1] === 0) return undefined; // indefinite, huge, or not minimal
  let v = 0;
  for (let i = 1; i <= k; i++) v = v * 256 + b[pos + i]!;
  return v >= 0x80 ? [v, pos + 1 + k] : undefined;
}

/**
 * Strict DER Ecdsa-Sig-Value → r‖s, each left-padded to `coordinateLength`. Only the canonical
 * encoding is accepted: definite minimal lengths, no trailing bytes, INTEGERs non-negative and
 * without redundant leading zeros. Read by hand for the same reason as above (unit tests hold it to
 * the ASN.1 library's reading of random and mutated inputs).
 */
export function derToP1363(der: Buffer, coordinateLength: number): Buffer {
  const bad = (): never => {
    throw new SealError('INVALID_ARGUMENT', 'malformed DER ECDSA signature');
  };
  if (der.length < 8 || der[0] !== 0x30) bad();
  const seq = readLength(der, 1) ?? bad();
  let pos = seq[1];
  if (pos + seq[0] !== der.length) bad();
  const out = Buffer.alloc(2 * coordinateLength);
  for (let half = 0; half < 2; half++) {
    if (der[pos] !== 0x02) bad();
    const [len, start] = readLength(der, pos + 1) ?? bad();
    pos = start;
    if (len === 0 || pos + len > der.length) bad();
    const v = der.subarray(pos, pos + len);
    if (v[0]! & 0x80) bad(); // negative
    if (len > 1 && v[0] === 0 && (v[1]! & 0x80) === 0) bad(); // redundant leading zero
    const digits = v[0] === 0 && len > 1 ? v.subarray(1) : v;
    if (digits.length > coordinateLength) throw new SealError('INVALID_ARGUMENT', 'ECDSA signature value too long for the curve');
    digits.copy(out, (half + 1) * coordinateLength - digits.length);
    pos += len;
  }
  if (pos !== der.length) bad();
  return out;
}
