/**
 * BER-TLV codec (ISO/IEC 7816-4 clause 5.2) against byte strings written out from the
 * specifications: PIV (NIST SP 800-73-4) dynamic authentication template `7C`, public key
 * template `7F49`, GET DATA tag list `5C` with the three-byte tag `5FC105`, the data object
 * container `53` with 2- and 3-byte lengths; and malformed card answers.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SealError } from '../../src/core/errors.js';
import { berTlv, encodeBerTlv, findTag, parseBerTlv, requireTag } from '../../src/backends/pcsc/tlv.js';

const h = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

function expectDeviceError(f: () => unknown): SealError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(SealError);
    expect((e as SealError).code).toBe('DEVICE_ERROR');
    return e as SealError;
  }
  throw new Error('expected a DEVICE_ERROR');
}

describe('parseBerTlv on specification examples', () => {
  it('SP 800-73-4 GENERAL AUTHENTICATE request: 7C { 82 (empty response), 81 (challenge) }', () => {
    const challenge = Buffer.alloc(32, 0xab);
    // 7C 24 | 82 00 | 81 20 <32 bytes>   (3.2.4, "Dynamic Authentication Template")
    const bytes = Buffer.concat([h('7C 24 82 00 81 20'), challenge]);
    const outer = parseBerTlv(bytes);
    expect(outer).toHaveLength(1);
    expect(outer[0]!.tag).toBe(0x7c);
    const inner = parseBerTlv(outer[0]!.value);
    expect(inner.map((t) => t.tag)).toEqual([0x82, 0x81]);
    expect(inner[0]!.value.length).toBe(0);
    expect(inner[1]!.value).toEqual(challenge);
  });

  it('SP 800-73-4 GENERATE ASYMMETRIC KEY PAIR response for P-256: 7F49 { 86 (65-byte point) }', () => {
    const point = Buffer.concat([h('04'), Buffer.alloc(64, 0x11)]);
    const bytes = Buffer.concat([h('7F 49 43 86 41'), point]);
    const [tpl] = parseBerTlv(bytes);
    expect(tpl!.tag).toBe(0x7f49);
    const [p] = parseBerTlv(tpl!.value);
    expect(p!.tag).toBe(0x86);
    expect(p!.value).toEqual(point);
  });

  it('RSA-2048 public key template with two-byte lengths: 7F49 82 0109 { 81 82 0100 n, 82 03 010001 }', () => {
    const n = Buffer.alloc(256, 0xc5);
    const bytes = Buffer.concat([h('7F 49 82 01 09 81 82 01 00'), n, h('82 03 01 00 01')]);
    const [tpl] = parseBerTlv(bytes);
    expect(tpl!.value.length).toBe(0x109);
    const parts = parseBerTlv(tpl!.value);
    expect(findTag(parts, 0x81)).toEqual(n);
    expect(findTag(parts, 0x82)).toEqual(h('010001'));
  });

  it('GET DATA tag list 5C 03 5FC105 and a 53 container with 70 / 71 / FE', () => {
    const [list] = parseBerTlv(h('5C 03 5F C1 05'));
    expect(list!.tag).toBe(0x5c);
    expect(list!.value).toEqual(h('5FC105'));
    const cert = Buffer.alloc(300, 0x30);
    const body = Buffer.concat([h('70 82 01 2C'), cert, h('71 01 00 FE 00')]);
    const container = Buffer.concat([h('53 82'), Buffer.from([body.length >> 8, body.length & 0xff]), body]);
    const [c] = parseBerTlv(container);
    expect(c!.tag).toBe(0x53);
    const inner = parseBerTlv(c!.value);
    expect(inner.map((t) => t.tag)).toEqual([0x70, 0x71, 0xfe]);
    expect(requireTag(inner, 0x70, 'certificate')).toEqual(cert);
    expect(findTag(inner, 0x71)).toEqual(h('00'));
    expect(findTag(inner, 0xfe)?.length).toBe(0);
  });

  it('a three-byte tag as the object tag itself (5FC105 01 AB)', () => {
    expect(parseBerTlv(h('5F C1 05 01 AB'))).toEqual([{ tag: 0x5fc105, value: h('AB') }]);
  });

  it('three-byte length 83 010000 (65536 bytes)', () => {
    const value = Buffer.alloc(0x10000, 7);
    const [t] = parseBerTlv(Buffer.concat([h('53 83 01 00 00'), value]));
    expect(t!.value.length).toBe(0x10000);
  });

  it('one-byte long form 81 80 and a sequence of objects', () => {
    const v = Buffer.alloc(0x80, 1);
    const list = parseBerTlv(Buffer.concat([h('04 81 80'), v, h('05 00'), h('9F 1F 02 01 02')]));
    expect(list.map((t) => t.tag)).toEqual([0x04, 0x05, 0x9f1f]);
    expect(list[0]!.value).toEqual(v);
    expect(list[2]!.value).toEqual(h('0102'));
  });

  it('skips 00 / FF padding between objects (ISO 7816-4 5.2.2.1)', () => {
    expect(parseBerTlv(h('00 FF 7C 00 00 00 81 01 05 FF'))).toEqual([
      { tag: 0x7c, value: Buffer.alloc(0) },
      { tag: 0x81, value: h('05') },
    ]);
  });

  it('empty input is an empty list', () => {
    expect(parseBerTlv(Buffer.alloc(0))).toEqual([]);
  });
});

describe('parseBerTlv on malformed input', () => {
  const cases: Array<[string, string]> = [
    ['truncated multi-byte tag', '5F'],
    ['truncated multi-byte tag (continuation bit on the last byte)', '5F C1'],
    ['missing length', '7C'],
    ['truncated 2-byte length', '7C 82 01'],
    ['length beyond the buffer', '7C 05 01 02'],
    ['2-byte length beyond the buffer', '53 82 01 00 00'],
    ['indefinite length', '7C 80 81 01 00 00 00'],
    ['length field of 5 bytes', '7C 85 00 00 00 00 01 00'],
    ['oversized 4-byte length', '7C 84 FF FF FF FF 00'],
    ['tag longer than 4 bytes', '5F FF FF FF 01 00'],
    ['second object truncated', '81 01 00 82 02 00'],
  ];
  for (const [name, bytes] of cases) {
    it(`${name} → DEVICE_ERROR`, () => {
      const e = expectDeviceError(() => parseBerTlv(h(bytes)));
      expect(e.message).toMatch(/malformed TLV/);
    });
  }

  it('never throws anything but DEVICE_ERROR on random bytes, and values stay inside the input', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), (arr) => {
        const buf = Buffer.from(arr);
        try {
          const list = parseBerTlv(buf);
          const total = list.reduce((n, t) => n + t.value.length, 0);
          expect(total).toBeLessThanOrEqual(buf.length);
          for (const t of list) expect(t.value.buffer).toBe(buf.buffer);
        } catch (e) {
          expect(e).toBeInstanceOf(SealError);
          expect((e as SealError).code).toBe('DEVICE_ERROR');
        }
      }),
      { numRuns: 300 },
    );
  });
});

describe('encodeBerTlv / berTlv', () => {
  it('uses the shortest length form', () => {
    expect(encodeBerTlv(0x81, Buffer.alloc(0))).toEqual(h('81 00'));
    expect(encodeBerTlv(0x81, Buffer.alloc(0x7f)).subarray(0, 2)).toEqual(h('81 7F'));
    expect(encodeBerTlv(0x81, Buffer.alloc(0x80)).subarray(0, 3)).toEqual(h('81 81 80'));
    expect(encodeBerTlv(0x81, Buffer.alloc(0xff)).subarray(0, 3)).toEqual(h('81 81 FF'));
    expect(encodeBerTlv(0x81, Buffer.alloc(0x100)).subarray(0, 4)).toEqual(h('81 82 01 00'));
    expect(encodeBerTlv(0x53, Buffer.alloc(0x10000)).subarray(0, 5)).toEqual(h('53 83 01 00 00'));
  });

  it('writes multi-byte tags as their bytes', () => {
    expect(encodeBerTlv(0x5fc105, h('AB'))).toEqual(h('5F C1 05 01 AB'));
    expect(encodeBerTlv(0x7f49, h('8600'))).toEqual(h('7F 49 02 86 00'));
  });

  it('berTlv concatenates values: the PIV sign request template', () => {
    const challenge = Buffer.alloc(32, 0xab);
    const built = berTlv(0x7c, encodeBerTlv(0x82, Buffer.alloc(0)), encodeBerTlv(0x81, challenge));
    expect(built).toEqual(Buffer.concat([h('7C 24 82 00 81 20'), challenge]));
  });

  it('refuses tags that would not parse back to themselves', () => {
    for (const tag of [0, 0x1f, 0x5f81, 0x7f8080, -1, 1.5, 0x1_0000_0000]) {
      expect(() => encodeBerTlv(tag, Buffer.alloc(0))).toThrow(SealError);
    }
  });

  it('round-trips any list of objects with valid tags', () => {
    const tagArb = fc.oneof(
      fc.integer({ min: 0x01, max: 0xfe }).filter((t) => (t & 0x1f) !== 0x1f),
      fc.integer({ min: 0x1f, max: 0x7f }).map((b) => ((b & 0xe0) | 0x1f) * 256 + b),
      fc.constantFrom(0x5fc105, 0x5fc10a, 0x7f49, 0x9f1f, 0xbf0c),
    );
    fc.assert(
      fc.property(fc.array(fc.record({ tag: tagArb, value: fc.uint8Array({ maxLength: 300 }) }), { maxLength: 6 }), (objs) => {
        const bytes = Buffer.concat(objs.map((o) => encodeBerTlv(o.tag, Buffer.from(o.value))));
        const parsed = parseBerTlv(bytes);
        expect(parsed.map((t) => t.tag)).toEqual(objs.map((o) => o.tag));
        expect(parsed.map((t) => t.value.toString('hex'))).toEqual(objs.map((o) => Buffer.from(o.value).toString('hex')));
      }),
      { numRuns: 300 },
    );
  });
});

describe('findTag / requireTag', () => {
  const list = parseBerTlv(h('81 01 05 82 00 81 01 06'));
  it('finds the first object with a tag', () => {
    expect(findTag(list, 0x81)).toEqual(h('05'));
    expect(findTag(list, 0x83)).toBeUndefined();
  });
  it('requireTag names what is missing', () => {
    const e = expectDeviceError(() => requireTag(list, 0x7f49, 'the public key template'));
    expect(e.message).toContain('the public key template');
    expect(e.message).toContain('7F49');
  });
});
