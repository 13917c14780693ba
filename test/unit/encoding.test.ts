/**
 * ECDSA signature encodings (IEEE P1363 r‖s ⇄ DER Ecdsa-Sig-Value, RFC 3279 §2.2.3) checked
 * against node:crypto, which signs in both encodings and verifies in both; PEM armour against
 * node:crypto's own PEM export.
 */
import { describe, expect, it } from 'vitest';
import { createPublicKey, generateKeyPairSync, randomBytes, sign, verify } from 'node:crypto';
import { AsnConvert } from '@peculiar/asn1-schema';
import { ECDSASigValue } from '@peculiar/asn1-ecc';
import { derToP1363, p1363ToDer, SealError, toPem } from '../../src/index.js';

const CURVES = [
  { name: 'P-256', node: 'prime256v1', hash: 'sha256', n: 32 },
  { name: 'P-384', node: 'secp384r1', hash: 'sha384', n: 48 },
] as const;

function expectInvalidArgument(fn: () => unknown): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(SealError);
  expect((caught as SealError).code).toBe('INVALID_ARGUMENT');
}

describe.each(CURVES)('ECDSA $name signatures', ({ node, hash, n }) => {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: node });
  const ROUNDS = 2000;

  it(`DER from node:crypto → derToP1363 verifies as ieee-p1363, and converts back to the same DER (${ROUNDS} signatures)`, () => {
    let leadingZero = 0;
    for (let i = 0; i < ROUNDS; i++) {
      const data = randomBytes(24);
      const der = sign(hash, data, { key: privateKey, dsaEncoding: 'der' });
      const p1363 = derToP1363(der, n);
      expect(p1363.length).toBe(2 * n);
      expect(verify(hash, data, { key: publicKey, dsaEncoding: 'ieee-p1363' }, p1363)).toBe(true);
      // DER is canonical: the conversion back is byte-identical to what node produced
      expect(p1363ToDer(p1363).equals(der)).toBe(true);
      if (p1363[0] === 0 || p1363[n] === 0) leadingZero++;
    }
    // r or s shorter than the curve (a leading zero byte) happens ~1/128 of the time: covered
    expect(leadingZero).toBeGreaterThan(0);
  });

  it(`ieee-p1363 from node:crypto → p1363ToDer verifies as DER, and converts back (${ROUNDS} signatures)`, () => {
    let highBit = 0;
    for (let i = 0; i < ROUNDS; i++) {
      const data = randomBytes(24);
      const p1363 = sign(hash, data, { key: privateKey, dsaEncoding: 'ieee-p1363' });
      const der = p1363ToDer(p1363);
      expect(der[0]).toBe(0x30);
      expect(verify(hash, data, { key: publicKey, dsaEncoding: 'der' }, der)).toBe(true);
      expect(derToP1363(der, n).equals(p1363)).toBe(true);
      if ((p1363[0]! & 0x80) !== 0) highBit++;
    }
    // an r with the top bit set needs a 0x00 prefix in DER (INTEGER is signed): covered
    expect(highBit).toBeGreaterThan(0);
  });

  it('a signature that does not verify stays one that does not verify after conversion', () => {
    const data = randomBytes(24);
    const der = sign(hash, data, { key: privateKey, dsaEncoding: 'der' });
    const p1363 = derToP1363(der, n);
    p1363[p1363.length - 1]! ^= 1;
    expect(verify(hash, data, { key: publicKey, dsaEncoding: 'der' }, p1363ToDer(p1363))).toBe(false);
  });
});

describe('hand-made edge values (RFC 3279 / X.690 DER INTEGER rules)', () => {
  it('r with top bit set gets a 0x00 prefix; s with leading zero bytes is shortened', () => {
    const r = Buffer.alloc(32, 0xff);
    const s = Buffer.concat([Buffer.alloc(3), Buffer.alloc(29, 0x11)]);
    const der = p1363ToDer(Buffer.concat([r, s]));
    // SEQUENCE { INTEGER 00 ff…ff (33 bytes), INTEGER 11…11 (29 bytes) }
    const expected = Buffer.concat([Buffer.from([0x30, 2 + 33 + 2 + 29, 0x02, 33, 0x00]), r, Buffer.from([0x02, 29]), Buffer.alloc(29, 0x11)]);
    expect(der.toString('hex')).toBe(expected.toString('hex'));
    expect(derToP1363(der, 32).equals(Buffer.concat([r, s]))).toBe(true);
  });

  it('small values (r = 1, s = 0x80) encode minimally', () => {
    const sig = Buffer.concat([Buffer.alloc(31), Buffer.from([1]), Buffer.alloc(31), Buffer.from([0x80])]);
    expect(p1363ToDer(sig).toString('hex')).toBe('3007020101020200' + '80');
    expect(derToP1363(Buffer.from('3007020101020200' + '80', 'hex'), 32).equals(sig)).toBe(true);
  });
});

describe('malformed input → INVALID_ARGUMENT', () => {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'secp384r1' });
  const der384 = sign('sha384', Buffer.from('x'), { key: privateKey, dsaEncoding: 'der' });

  it.each([
    ['empty', Buffer.alloc(0)],
    ['random bytes', Buffer.from('deadbeefcafebabe0102030405', 'hex')],
    ['wrong outer tag (SET)', Buffer.from('3106020101020101', 'hex')],
    ['truncated', der384.subarray(0, der384.length - 5)],
    ['length longer than the data', Buffer.from('3050020101020101', 'hex')],
    ['only one INTEGER', Buffer.from('3003020101', 'hex')],
    ['OCTET STRING instead of INTEGER', Buffer.from('3006040101040101', 'hex')],
  ])('derToP1363: %s', (_name, bytes) => {
    expectInvalidArgument(() => derToP1363(bytes, 32));
  });

  it('derToP1363: a P-384 signature does not fit P-256 coordinates', () => {
    let big = der384;
    // make sure r really needs more than 32 bytes (retry the rare short ones)
    for (let i = 0; derToP1363(big, 48).subarray(0, 16).equals(Buffer.alloc(16)) && i < 10; i++) {
      big = sign('sha384', randomBytes(8), { key: privateKey, dsaEncoding: 'der' });
    }
    expectInvalidArgument(() => derToP1363(big, 32));
  });

  describe('BER that is not DER (OpenSSL refuses each of these as a signature)', () => {
    const keys = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const data = Buffer.from('malleability');
    // a signature whose r has no sign byte, so that a non-minimal form can be made by adding one
    let der = sign('sha256', data, { key: keys.privateKey, dsaEncoding: 'der' });
    while (der[3] !== 32) der = sign('sha256', data, { key: keys.privateKey, dsaEncoding: 'der' });
    const r = der.subarray(4, 36);
    const rest = der.subarray(36);
    const variants: Array<[string, Buffer]> = [
      ['trailing byte after the SEQUENCE', Buffer.concat([der, Buffer.from([0x00])])],
      ['long-form length for a short SEQUENCE', Buffer.concat([Buffer.from([0x30, 0x81, der[1]!]), der.subarray(2)])],
      ['non-minimal INTEGER (extra leading 0x00)', Buffer.concat([Buffer.from([0x30, der[1]! + 1, 0x02, 33, 0x00]), r, rest])],
      ['negative INTEGER (top bit set, no 0x00)', Buffer.from('3006020181020101', 'hex')],
    ];

    it.each(variants)('derToP1363 refuses: %s', (_name, bytes) => {
      // the oracle: OpenSSL (node:crypto) does not accept this encoding
      expect(verify('sha256', data, { key: keys.publicKey, dsaEncoding: 'der' }, bytes)).toBe(false);
      expectInvalidArgument(() => derToP1363(bytes, 32));
    });
  });

  it.each([
    ['empty', Buffer.alloc(0)],
    ['odd length', Buffer.alloc(63, 1)],
  ])('p1363ToDer: %s', (_name, bytes) => {
    expectInvalidArgument(() => p1363ToDer(bytes));
  });
});

describe('PEM armour', () => {
  it.each([
    ['EC P-256', () => generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).publicKey],
    ['RSA-2048', () => generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey],
    ['Ed25519', () => generateKeyPairSync('ed25519').publicKey],
  ])('toPem(SPKI DER) equals node:crypto PEM export for %s', (_name, make) => {
    const key = make();
    const der = key.export({ type: 'spki', format: 'der' });
    const pem = toPem(der);
    expect(pem).toBe(key.export({ type: 'spki', format: 'pem' }));
    expect(createPublicKey(pem).export({ type: 'spki', format: 'der' }).equals(der)).toBe(true);
  });
});

describe('p1363ToDer against the ASN.1 library', () => {
  it('matches @peculiar/asn1-ecc for random, zero-led, top-bit and all-zero values of every curve size (P-521 needs a long-form length)', () => {
    const der = (sig: Buffer): Buffer => {
      const n = sig.length / 2;
      const int = (b: Buffer): ArrayBuffer => {
        let i = 0;
        while (i < b.length - 1 && b[i] === 0) i++;
        const v = b[i]! & 0x80 ? Buffer.concat([Buffer.from([0]), b.subarray(i)]) : Buffer.from(b.subarray(i));
        return v.buffer.slice(v.byteOffset, v.byteOffset + v.length) as ArrayBuffer;
      };
      return Buffer.from(AsnConvert.serialize(new ECDSASigValue({ r: int(sig.subarray(0, n)), s: int(sig.subarray(n)) })));
    };
    let longForm = 0;
    for (const n of [32, 48, 66]) {
      for (let i = 0; i < 500; i++) {
        const sig = randomBytes(2 * n);
        if (i % 5 === 1) sig.fill(0, 0, 1 + (i % 7)); // leading zeros in r
        if (i % 5 === 2) sig[n] = 0x80 | sig[n]!; // s with the top bit set
        if (i % 50 === 3) sig.fill(0); // r = s = 0
        const mine = p1363ToDer(sig);
        expect(mine.toString('hex')).toBe(der(sig).toString('hex'));
        if (mine[1] === 0x81) longForm++;
      }
    }
    expect(longForm).toBeGreaterThan(0);
  });
});

describe('derToP1363 against the ASN.1 library', () => {
  /** The reading of @peculiar/asn1-ecc plus the canonical-form checks: the reference. */
  function reference(der: Buffer, n: number): Buffer | 'refused' {
    let v: ECDSASigValue;
    try {
      v = AsnConvert.parse(der, ECDSASigValue);
    } catch {
      return 'refused';
    }
    const canonical = (x: ArrayBuffer): boolean => {
      const b = Buffer.from(x);
      return b.length > 0 && (b[0]! & 0x80) === 0 && !(b.length > 1 && b[0] === 0 && (b[1]! & 0x80) === 0);
    };
    if (!canonical(v.r) || !canonical(v.s) || !Buffer.from(AsnConvert.serialize(v)).equals(der)) return 'refused';
    const fix = (x: ArrayBuffer): Buffer | undefined => {
      let b = Buffer.from(x);
      while (b.length > n && b[0] === 0) b = b.subarray(1);
      return b.length > n ? undefined : Buffer.concat([Buffer.alloc(n - b.length), b]);
    };
    const r = fix(v.r);
    const s = fix(v.s);
    return r && s ? Buffer.concat([r, s]) : 'refused';
  }
  const mine = (der: Buffer, n: number): Buffer | 'refused' => {
    try {
      return derToP1363(der, n);
    } catch (e) {
      expect(e).toBeInstanceOf(SealError);
      return 'refused';
    }
  };

  it('agrees on 6,000 valid signatures and single-byte mutations of them (accepted or refused, and the same r‖s)', () => {
    const stats = { accepted: 0, refused: 0 };
    for (const [curve, n, hash] of [['prime256v1', 32, 'sha256'], ['secp384r1', 48, 'sha384'], ['secp521r1', 66, 'sha512']] as const) {
      const { privateKey } = generateKeyPairSync('ec', { namedCurve: curve });
      for (let i = 0; i < 1000; i++) {
        const der = sign(hash, randomBytes(8), { key: privateKey, dsaEncoding: 'der' });
        const mutated = Buffer.from(der);
        const at = i % der.length;
        mutated[at] = (i % 3 === 0 ? mutated[at]! ^ (1 << (i % 8)) : i % 3 === 1 ? 0x00 : 0x80) & 0xff;
        for (const input of [der, mutated]) {
          const want = reference(input, n);
          const got = mine(input, n);
          if (want === 'refused') expect(got, input.toString('hex')).toBe('refused');
          else expect(got === 'refused' ? got : got.toString('hex'), input.toString('hex')).toBe(want.toString('hex'));
          stats[want === 'refused' ? 'refused' : 'accepted']++;
        }
      }
    }
    expect(stats.accepted).toBeGreaterThan(3000);
    expect(stats.refused).toBeGreaterThan(100);
  });
});
