/**
 * The virtual PIV card's own BER-TLV codec (ISO/IEC 7816-4 clause 5.2), kept apart from the
 * product's src/backends/pcsc/tlv.ts on purpose: the simulator must not share the bugs of the
 * code it tests. Tags are the raw tag bytes read as an integer (0x7C, 0x7F49, 0x5FC105); lengths
 * are the short form or `81 xx` / `82 xxxx` / `83 xxxxxx`. Command data is untrusted: parsing
 * never throws and answers `undefined` for anything malformed. Test code only.
 */

export interface Tlv {
  tag: number;
  value: Buffer;
}

/** One level of BER-TLV objects, or `undefined` when the encoding is malformed or truncated. */
export function parseTlvs(buf: Buffer): Tlv[] | undefined {
  const out: Tlv[] = [];
  let i = 0;
  while (i < buf.length) {
    let tag = buf[i]!;
    i += 1;
    if ((tag & 0x1f) === 0x1f) {
      // subsequent tag bytes: b8 set on all but the last; at most 3 bytes in all
      for (let n = 1; ; n++) {
        if (i >= buf.length || n > 2) return undefined;
        const b = buf[i]!;
        i += 1;
        tag = tag * 256 + b;
        if ((b & 0x80) === 0) break;
      }
    }
    if (i >= buf.length) return undefined;
    let len = buf[i]!;
    i += 1;
    if (len > 0x80) {
      const n = len - 0x80;
      if (n > 3 || i + n > buf.length) return undefined;
      len = 0;
      for (let k = 0; k < n; k++) len = len * 256 + buf[i + k]!;
      i += n;
    } else if (len === 0x80) {
      return undefined; // indefinite length is not BER-TLV as ISO 7816-4 uses it
    }
    if (i + len > buf.length) return undefined;
    out.push({ tag, value: buf.subarray(i, i + len) });
    i += len;
  }
  return out;
}

/** The first object with `tag` in a parsed list. */
export function findTag(tlvs: Tlv[], tag: number): Buffer | undefined {
  return tlvs.find((t) => t.tag === tag)?.value;
}

function tagBytes(tag: number): Buffer {
  if (tag <= 0xff) return Buffer.from([tag]);
  if (tag <= 0xffff) return Buffer.from([tag >> 8, tag & 0xff]);
  return Buffer.from([(tag >> 16) & 0xff, (tag >> 8) & 0xff, tag & 0xff]);
}

function lengthBytes(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  if (n <= 0xff) return Buffer.from([0x81, n]);
  if (n <= 0xffff) return Buffer.from([0x82, n >> 8, n & 0xff]);
  return Buffer.from([0x83, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
}

/** Encodes one object whose value is the concatenation of `parts`. */
export function tlv(tag: number, ...parts: Buffer[]): Buffer {
  const value = Buffer.concat(parts);
  return Buffer.concat([tagBytes(tag), lengthBytes(value.length), value]);
}
