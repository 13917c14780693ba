/**
 * BER-TLV codec of ISO/IEC 7816-4 (clause 5.2, "BER-TLV data objects"), as used by PIV
 * (NIST SP 800-73-4) and GSMA IoT SAFE.
 *
 * A tag is kept as its raw bytes read as a big-endian integer: `0x7C` (dynamic authentication
 * template), `0x7F49` (public key template), `0x5FC105` (a PIV data object tag). Lengths use the
 * short form (`00`–`7F`) or the long forms `81 xx`, `82 xxxx`, `83 xxxxxx`, `84 xxxxxxxx`.
 *
 * Card answers are untrusted input: every malformed encoding (truncated tag, truncated length,
 * indefinite length `80`, a length past the end of the buffer) raises
 * `SealError('DEVICE_ERROR', 'malformed TLV …')` and nothing else; parsing is a single bounded
 * pass over the buffer (no recursion).
 */
import { SealError } from '../../core/errors.js';

export interface Tlv {
  /** The tag's raw bytes as an integer, e.g. 0x7C, 0x7F49, 0x5FC105. */
  tag: number;
  value: Buffer;
}

/** The longest tag accepted: 4 bytes (ISO 7816-4 itself allows at most 3). */
const MAX_TAG_BYTES = 4;
/** The longest length field accepted after its first byte: `84 xxxxxxxx`. */
const MAX_LENGTH_BYTES = 4;

function malformed(detail: string, offset: number): SealError {
  return new SealError('DEVICE_ERROR', `malformed TLV in the card's response: ${detail} at offset ${offset}`);
}

/**
 * Parses a sequence of BER-TLV data objects (one level; parse a constructed value again to go
 * deeper). `00` and `FF` bytes between objects are skipped as padding (ISO 7816-4 5.2.2.1).
 */
export function parseBerTlv(buf: Buffer): Tlv[] {
  const out: Tlv[] = [];
  let i = 0;
  while (i < buf.length) {
    const first = buf[i]!;
    if (first === 0x00 || first === 0xff) {
      i += 1;
      continue;
    }
    const start = i;
    // Tag: low five bits all set means subsequent bytes follow, each with b8 set except the last.
    let tag = first;
    i += 1;
    if ((first & 0x1f) === 0x1f) {
      let n = 1;
      for (;;) {
        if (i >= buf.length) throw malformed('truncated tag', start);
        const b = buf[i]!;
        i += 1;
        n += 1;
        if (n > MAX_TAG_BYTES) throw malformed('tag longer than 4 bytes', start);
        tag = tag * 256 + b;
        if ((b & 0x80) === 0) break;
      }
    }
    // Length.
    if (i >= buf.length) throw malformed('missing length', start);
    const l0 = buf[i]!;
    i += 1;
    let len: number;
    if (l0 < 0x80) {
      len = l0;
    } else if (l0 === 0x80) {
      throw malformed('indefinite length is not allowed', start);
    } else {
      const n = l0 & 0x7f;
      if (n > MAX_LENGTH_BYTES) throw malformed(`length field of ${n} bytes`, start);
      if (i + n > buf.length) throw malformed('truncated length', start);
      len = 0;
      for (let k = 0; k < n; k++) len = len * 256 + buf[i + k]!;
      i += n;
    }
    if (len > buf.length - i) throw malformed(`length ${len} beyond the ${buf.length - i} bytes left`, start);
    out.push({ tag, value: buf.subarray(i, i + len) });
    i += len;
  }
  return out;
}

/** The tag's bytes (big-endian, minimal). */
function tagBytes(tag: number): Buffer {
  if (!Number.isInteger(tag) || tag <= 0 || tag > 0xffffffff) {
    throw new SealError('INVALID_ARGUMENT', `invalid TLV tag ${String(tag)}`);
  }
  const bytes: number[] = [];
  for (let t = tag; t > 0; t = Math.floor(t / 256)) bytes.unshift(t % 256);
  // Consistency with ISO 7816-4 tag rules, so that what is encoded parses back to the same tag.
  const multi = (bytes[0]! & 0x1f) === 0x1f;
  const ok = multi
    ? bytes.length >= 2 && bytes.slice(1, -1).every((b) => (b & 0x80) !== 0) && (bytes[bytes.length - 1]! & 0x80) === 0
    : bytes.length === 1;
  if (!ok || bytes[0] === 0xff) throw new SealError('INVALID_ARGUMENT', `invalid TLV tag 0x${tag.toString(16)}`);
  return Buffer.from(bytes);
}

/** The length field in its shortest form. */
export function berLength(len: number): Buffer {
  if (!Number.isInteger(len) || len < 0 || len > 0xffffffff) {
    throw new SealError('DATA_TOO_LARGE', `TLV value of ${len} bytes cannot be encoded`);
  }
  if (len < 0x80) return Buffer.from([len]);
  if (len <= 0xff) return Buffer.from([0x81, len]);
  if (len <= 0xffff) return Buffer.from([0x82, len >> 8, len & 0xff]);
  if (len <= 0xffffff) return Buffer.from([0x83, len >> 16, (len >> 8) & 0xff, len & 0xff]);
  const b = Buffer.alloc(5);
  b[0] = 0x84;
  b.writeUInt32BE(len, 1);
  return b;
}

export function encodeBerTlv(tag: number, value: Buffer): Buffer {
  return Buffer.concat([tagBytes(tag), berLength(value.length), value]);
}

/** tag + length + the concatenation of `values` (handy for constructed objects). */
export function berTlv(tag: number, ...values: Buffer[]): Buffer {
  return encodeBerTlv(tag, Buffer.concat(values));
}

/** The value of the first object with `tag`, if any. */
export function findTag(list: readonly Tlv[], tag: number): Buffer | undefined {
  for (const t of list) if (t.tag === tag) return t.value;
  return undefined;
}

/** The value of the first object with `tag`; DEVICE_ERROR naming `what` when the card left it out. */
export function requireTag(list: readonly Tlv[], tag: number, what: string): Buffer {
  const v = findTag(list, tag);
  if (v === undefined) {
    throw new SealError('DEVICE_ERROR', `the card's response lacks ${what} (tag ${tag.toString(16).toUpperCase()})`);
  }
  return v;
}
