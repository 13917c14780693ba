/**
 * Fuzz: TPM 2.0 structures read from the TPM, from the key store and from devices under
 * attestation — the wire decoders (src/backends/tpm2/marshal.ts), TSS2 PEM key files (keyfile.ts),
 * the key-store reader over a directory of garbage (keystore.ts), and the server-side verifiers
 * verifyQuote / verifyCertify (server.ts) over mutated attestations, signatures, nonces and
 * public areas. Inputs are mutations of valid structures built here from TPM 2.0 Part 2 layouts;
 * signatures come from node:crypto, which plays the attestation key. test/unit/tpm2-codec.test.ts
 * throws short random bytes at three decoders; these start from valid structures and cover the rest.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createHash, generateKeyPairSync, sign } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { SealError } from '../../src/core/errors.js';
import {
  ALG,
  AES128_CFB,
  CURVE,
  OBJ,
  ST_ATTEST_CERTIFY,
  ST_ATTEST_QUOTE,
  TPM_GENERATED,
  Reader,
  Writer,
  decodeAttest,
  decodeCommands,
  decodeDigestList,
  decodeHandles,
  decodePcrSelection,
  decodeProperties,
  decodePublic,
  decodeSignature,
  encodePcrSelection,
  encodePublic,
  encodePublicArea,
  objectName,
  type PublicArea,
} from '../../src/backends/tpm2/marshal.js';
import { decodeKeyFile, encodeKeyFile } from '../../src/backends/tpm2/keyfile.js';
import { KeyStore } from '../../src/backends/tpm2/keystore.js';
import { verifyCertify, verifyQuote } from '../../src/backends/tpm2/server.js';
import { derToP1363 } from '../../src/core/encoding.js';
import { FUZZ_RUNS, fuzz, mutated, mutatedOrRandom, sealOnly, timeoutFor } from './support.js';

const ak = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
const akJwk = ak.publicKey.export({ format: 'jwk' });
const coord = (s: string | undefined): Buffer => Buffer.from(s ?? '', 'base64url');

const eccKey: PublicArea = {
  type: 'ecc',
  nameAlg: ALG.SHA256,
  attributes: OBJ.fixedTPM | OBJ.fixedParent | OBJ.sensitiveDataOrigin | OBJ.userWithAuth | OBJ.noDA | OBJ.sign,
  authPolicy: Buffer.alloc(0),
  symmetric: { alg: ALG.NULL },
  scheme: { alg: ALG.ECDSA, hash: ALG.SHA256 },
  curve: CURVE['P-256'],
  kdf: { alg: ALG.NULL },
  x: coord(akJwk.x),
  y: coord(akJwk.y),
};
const rsaKey: PublicArea = { type: 'rsa', nameAlg: ALG.SHA256, attributes: OBJ.decrypt | OBJ.userWithAuth, authPolicy: Buffer.alloc(32, 3), symmetric: AES128_CFB, scheme: { alg: ALG.NULL }, keyBits: 2048, exponent: 0, modulus: Buffer.alloc(256, 0xc5) };
const hmacKey: PublicArea = { type: 'keyedhash', nameAlg: ALG.SHA256, attributes: OBJ.sign | OBJ.userWithAuth, authPolicy: Buffer.alloc(0), scheme: { alg: ALG.HMAC, hash: ALG.SHA256 }, unique: Buffer.alloc(32, 1) };
const derivationParent: PublicArea = { type: 'keyedhash', nameAlg: ALG.SHA256, attributes: OBJ.restricted | OBJ.decrypt, authPolicy: Buffer.alloc(0), scheme: { alg: ALG.XOR, hash: ALG.SHA256, kdf: ALG.KDF1_SP800_108 }, unique: Buffer.alloc(32, 2) };
const symKey: PublicArea = { type: 'symcipher', nameAlg: ALG.SHA256, attributes: OBJ.decrypt | OBJ.sign, authPolicy: Buffer.alloc(0), symmetric: AES128_CFB, unique: Buffer.alloc(32, 4) };
const PUBLIC_SEEDS = [eccKey, rsaKey, hmacKey, derivationParent, symKey].map(encodePublic);

/** TPMS_ATTEST as TPM 2.0 Part 2 lays it out (10.12.12), for a quote or a certification. */
function attest(kind: 'quote' | 'certify', nonce: Buffer, extra: { certifiedName?: Buffer; pcrDigest?: Buffer } = {}): Buffer {
  const w = new Writer().u32(TPM_GENERATED).u16(kind === 'quote' ? ST_ATTEST_QUOTE : ST_ATTEST_CERTIFY).tpm2b(Buffer.concat([Buffer.from([0, 0x0b]), Buffer.alloc(32, 0xaa)])).tpm2b(nonce);
  w.bytes(Buffer.from('0000000000001234', 'hex')).u32(7).u32(1).u8(1).bytes(Buffer.from('0001000200030004', 'hex'));
  if (kind === 'quote') w.bytes(encodePcrSelection(ALG.SHA256, [0, 7])).tpm2b(extra.pcrDigest ?? createHash('sha256').update(Buffer.alloc(64)).digest());
  else w.tpm2b(extra.certifiedName ?? Buffer.alloc(34)).tpm2b(Buffer.alloc(34, 1));
  return w.out();
}

/** TPMT_SIGNATURE (ECDSA, SHA-256) by the attestation key over `data`, as a TPM returns it. */
function akSign(data: Buffer): Buffer {
  const rs = derToP1363(sign('sha256', data, { key: ak.privateKey, dsaEncoding: 'der' }), 32);
  return new Writer().u16(ALG.ECDSA).u16(ALG.SHA256).tpm2b(rs.subarray(0, 32)).tpm2b(rs.subarray(32)).out();
}

const NONCE = Buffer.alloc(16, 0x4e);
const ATTEST_SEEDS = [attest('quote', NONCE), attest('certify', NONCE, { certifiedName: objectName(encodePublicArea(eccKey)) })];
const SIGNATURE_SEEDS = [akSign(ATTEST_SEEDS[0]!), new Writer().u16(ALG.RSASSA).u16(ALG.SHA256).tpm2b(Buffer.alloc(256, 1)).out(), new Writer().u16(ALG.HMAC).u16(ALG.SHA256).bytes(Buffer.alloc(32, 2)).out()];

describe('fuzz: TPM 2.0 wire decoders', () => {
  it(
    'decodePublic: DEVICE_ERROR/NOT_SUPPORTED, or an area that encodePublic writes back to the same bytes',
    () => {
      fuzz('decodePublic', mutatedOrRandom(PUBLIC_SEEDS), (buf) => {
        const p = sealOnly(() => decodePublic(buf), ['DEVICE_ERROR']);
        if (!p) return;
        expect(encodePublic(p.area).equals(buf)).toBe(true);
        const name = sealOnly(() => objectName(p.bytes), ['NOT_SUPPORTED']);
        if (name) expect(name.readUInt16BE(0)).toBe(p.area.nameAlg);
      });
    },
    timeoutFor(1),
  );

  it(
    'decodeSignature and decodeAttest: a SealError, or fields that lie inside the input',
    () => {
      fuzz('decodeSignature + decodeAttest', mutatedOrRandom([...SIGNATURE_SEEDS, ...ATTEST_SEEDS]), (buf) => {
        const sig = sealOnly(() => decodeSignature(buf), ['DEVICE_ERROR', 'NOT_SUPPORTED']);
        if (sig?.alg === 'ecdsa') expect(sig.r.length + sig.s.length + 8).toBe(buf.length);
        const a = sealOnly(() => decodeAttest(buf), ['DEVICE_ERROR']);
        if (a) {
          expect(a.type === ST_ATTEST_QUOTE ? a.quote : a.certify).toBeDefined();
          expect(a.extraData.length + a.qualifiedSigner.length).toBeLessThan(buf.length);
        }
      });
    },
    timeoutFor(1),
  );

  it(
    'capability, digest-list and PCR-selection decoders: DEVICE_ERROR or values read from the input, however large the counts claim to be',
    () => {
      const seeds = [
        new Writer().u32(6).u32(2).u32(0x100).u32(0x322e3000).u32(0x105).u32(0x49424d00).out(),
        new Writer().u32(2).u32(3).u32(0x131).u32(0x153).u32(0x17e).out(),
        new Writer().u32(1).u32(2).u32(0x80000000).u32(0x81000001).out(),
        new Writer().u32(2).tpm2b(Buffer.alloc(32, 1)).tpm2b(Buffer.alloc(32, 2)).out(),
        encodePcrSelection(ALG.SHA256, [0, 1, 7, 23]),
      ];
      fuzz('decodeProperties/Commands/Handles/DigestList/PcrSelection', mutatedOrRandom(seeds), (buf) => {
        const props = sealOnly(() => decodeProperties(buf), ['DEVICE_ERROR']);
        if (props) expect(props.size * 8).toBeLessThanOrEqual(buf.length);
        const cmds = sealOnly(() => decodeCommands(buf), ['DEVICE_ERROR']);
        if (cmds) expect(cmds.size * 4).toBeLessThanOrEqual(buf.length);
        const handles = sealOnly(() => decodeHandles(buf), ['DEVICE_ERROR']);
        if (handles) expect(handles.length * 4).toBeLessThanOrEqual(buf.length);
        const digests = sealOnly(() => decodeDigestList(buf), ['DEVICE_ERROR']);
        if (digests) expect(digests.reduce((n, d) => n + 2 + d.length, 4)).toBe(buf.length);
        const sel = sealOnly(() => decodePcrSelection(new Reader(buf)), ['DEVICE_ERROR']);
        if (sel) for (const s of sel) for (const p of s.pcrs) expect(p).toBeLessThan(256 * 8);
      });
    },
    timeoutFor(1),
  );
});

describe('fuzz: TSS2 PEM key files', () => {
  const good = encodeKeyFile({ emptyAuth: true, parent: 0x40000001, public: PUBLIC_SEEDS[0]!, private: Buffer.alloc(126, 9) });
  const derOf = (file: string): Buffer => Buffer.from(file.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
  const der = derOf(good);
  // the same without emptyAuth (other tools leave it out), and with a persistent parent handle
  const tlv = (tag: number, content: Buffer): Buffer => {
    const n = content.length;
    const len = n < 0x80 ? Buffer.from([n]) : n < 0x100 ? Buffer.from([0x81, n]) : Buffer.from([0x82, n >> 8, n & 0xff]);
    return Buffer.concat([Buffer.from([tag]), len, content]);
  };
  const withoutAuth = tlv(0x30, Buffer.concat([Buffer.from('06066781050a0103', 'hex'), tlv(0x02, Buffer.from('40000001', 'hex')), tlv(0x04, PUBLIC_SEEDS[0]!), tlv(0x04, Buffer.alloc(126, 9))]));
  const persistent = derOf(encodeKeyFile({ emptyAuth: false, parent: 0x81000001, public: PUBLIC_SEEDS[1]!, private: Buffer.alloc(0) }));
  const pem = (d: Buffer): string => `-----BEGIN TSS2 PRIVATE KEY-----\n${d.toString('base64').replace(/(.{64})/g, '$1\n')}\n-----END TSS2 PRIVATE KEY-----\n`;

  it(
    'decodeKeyFile: a SealError, or the parent and the two blobs the file holds',
    () => {
      const text = fc.oneof(
        { weight: 6, arbitrary: mutated([der, withoutAuth, persistent]).map(pem) },
        { weight: 1, arbitrary: fc.string({ maxLength: 300 }) },
        { weight: 1, arbitrary: fc.string({ unit: fc.constantFrom('A', '/', '+', '=', '\n', '-'), maxLength: 400 }).map((s) => `-----BEGIN TSS2 PRIVATE KEY-----${s}-----END TSS2 PRIVATE KEY-----`) },
      );
      // emptyAuth as a primitive [0] (80 01 FF) instead of [0] EXPLICIT BOOLEAN (A0 03 01 01 FF)
      const at = der.indexOf(Buffer.from('a0030101ff', 'hex'));
      const primitiveAuth = Buffer.concat([Buffer.from([0x30, 0x81, der[2]! - 2]), der.subarray(3, at), Buffer.from('8001ff', 'hex'), der.subarray(at + 5)]);
      fuzz('decodeKeyFile', text, (file) => {
        const k = sealOnly(() => decodeKeyFile(file), ['INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (!k) return;
        expect(Number.isSafeInteger(k.parent) && k.parent >= 0).toBe(true);
        expect(Buffer.isBuffer(k.public) && Buffer.isBuffer(k.private)).toBe(true);
      }, { examples: [good, pem(withoutAuth), pem(persistent), pem(primitiveAuth)] });
    },
    timeoutFor(2),
  );
});

describe('fuzz: the TPM key store reader over garbage files', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'seal-fuzz-keystore-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const goodMeta = { version: 1, id: 'aa', label: 'k', kind: 'private', usages: ['sign'], origin: 'generated-inside', created: '2026-01-01T00:00:00.000Z', parent: 0x40000001 };
  const value = fc.oneof(
    fc.constantFrom(null, true, 0, 1, -1, 1e308, '', 'x', [], {}, [1, 2], { version: 1 }),
    fc.string({ maxLength: 20 }),
    fc.integer(),
  );
  const metaText = fc.oneof(
    // records that keep the expected shape but change or drop one field or another
    fc.tuple(fc.subarray(Object.keys(goodMeta)), fc.dictionary(fc.constantFrom(...Object.keys(goodMeta)), value, { maxKeys: 3 })).map(([keep, over]) =>
      JSON.stringify({ ...Object.fromEntries(keep.map((k) => [k, goodMeta[k as keyof typeof goodMeta]])), ...over, version: 1, id: 'ab' }),
    ),
    fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)),
    fc.string({ maxLength: 60 }),
    fc.uint8Array({ maxLength: 60 }).map((a) => Buffer.from(a).toString('latin1')),
  );
  const entry = fc.record({
    name: fc.oneof(fc.constantFrom('srk.json', 'aa.json', 'ab.json', '00.json', 'zz.json', 'x.json.tmp', 'aa.pem', '.json'), fc.string({ unit: fc.constantFrom(...'0123456789abcdefG'), minLength: 2, maxLength: 8 }).map((s) => `${s}.json`)),
    kind: fc.constantFrom('file', 'file', 'file', 'dir', 'symlink-loop', 'dangling'),
    text: metaText,
  });

  it(
    'list() and check() answer (or throw a SealError) for any directory content; every listed record has version 1 and a hex id',
    () => {
      let round = 0;
      fuzz('KeyStore.list/check', fc.array(entry, { minLength: 1, maxLength: 6 }), (entries) => {
        const d = path.join(dir, String(round++));
        mkdirSync(d);
        for (const e of entries) {
          const p = path.join(d, e.name);
          try {
            if (e.kind === 'file') writeFileSync(p, e.text, { mode: 0o600 });
            else if (e.kind === 'dir') mkdirSync(p);
            else if (e.kind === 'symlink-loop') symlinkSync(p, p);
            else symlinkSync(path.join(d, 'nowhere'), p);
          } catch {
            // the same name twice: keep the first
          }
        }
        const store = new KeyStore(d);
        const listed = sealOnly(() => store.list());
        for (const m of listed ?? []) {
          expect(m.version).toBe(1);
          expect(m.id).toMatch(/^[0-9a-f]{2,64}$/);
        }
        for (const problem of store.check()) expect(typeof problem).toBe('string');
        for (const m of listed ?? []) sealOnly(() => store.blobs(m.id));
        rmSync(d, { recursive: true, force: true });
      }, { examples: [[{ name: 'aa.json', kind: 'file', text: '{"version":1,"id":"aa"}' }, { name: 'ab.json', kind: 'file', text: '{"version":1,"id":"ab"}' }]] });
    },
    timeoutFor(3),
  );
});

describe('fuzz: attestation verifiers', () => {
  const quote = { attest: ATTEST_SEEDS[0]!, signature: SIGNATURE_SEEDS[0]! };
  const certified = encodePublic(eccKey);
  const certify = { attest: ATTEST_SEEDS[1]!, signature: akSign(ATTEST_SEEDS[1]!) };
  const akSpki = ak.publicKey.export({ type: 'spki', format: 'der' });

  it('the unmutated quote and certification verify (the oracle below is sound)', () => {
    expect(verifyQuote(akSpki, quote, NONCE).attest.quote?.pcrDigest.length).toBe(32);
    expect(verifyCertify(akSpki, certify, NONCE, certified).spki).toBeDefined();
  });

  it(
    'verifyQuote over mutated signatures and nonces: never accepted unless the signature still carries the same r and s',
    () => {
      const original = decodeSignature(quote.signature);
      const num = (b: Buffer): bigint => BigInt('0x' + (b.toString('hex') || '0'));
      // a TPM2B carries r and s as written: garbage in front of the real value must not pass
      if (original.alg !== 'ecdsa') throw new Error('seed is not ECDSA');
      const padded = (r: Buffer, s: Buffer): Buffer => new Writer().u16(ALG.ECDSA).u16(ALG.SHA256).tpm2b(r).tpm2b(s).out();
      const examples: Array<[Buffer, Buffer]> = [
        [padded(Buffer.concat([Buffer.from([0x01]), original.r]), original.s), NONCE],
        [padded(original.r, Buffer.concat([Buffer.alloc(40, 0xee), original.s])), NONCE],
      ];
      fuzz('verifyQuote (mutated signature, nonce)', fc.tuple(mutated([quote.signature]), mutated([NONCE], 2)), ([signature, nonce]) => {
        const r = sealOnly(() => verifyQuote(akSpki, { attest: quote.attest, signature }, nonce), ['USAGE_NOT_PERMITTED', 'DEVICE_ERROR', 'NOT_SUPPORTED', 'INVALID_ARGUMENT']);
        if (!r) return;
        expect(nonce.equals(NONCE)).toBe(true);
        const got = decodeSignature(signature);
        if (got.alg !== 'ecdsa' || original.alg !== 'ecdsa') return expect.fail('a non-ECDSA signature verified');
        expect([num(got.r), num(got.s)], 'a signature with other r/s values was accepted').toEqual([num(original.r), num(original.s)]);
      }, { examples });
    },
    timeoutFor(2),
  );

  it(
    'verifyQuote over mutated attestations signed by the key (a device that lies): a SealError, or a parsed quote carrying the nonce',
    () => {
      fuzz('verifyQuote (signed mutated attest)', mutatedOrRandom(ATTEST_SEEDS, 300), (a) => {
        const r = sealOnly(() => verifyQuote(akSpki, { attest: a, signature: akSign(a) }, NONCE, { pcrs: [0, 7], values: [Buffer.alloc(32), Buffer.alloc(32)] }), ['USAGE_NOT_PERMITTED', 'DEVICE_ERROR', 'NOT_SUPPORTED', 'INVALID_ARGUMENT']);
        if (!r) return;
        expect(r.attest.extraData.equals(NONCE)).toBe(true);
        expect(r.attest.quote?.pcrDigest.equals(createHash('sha256').update(Buffer.alloc(64)).digest())).toBe(true);
      });
    },
    timeoutFor(2),
  );

  it(
    'verifyCertify over mutated public areas whose Name the key signed: a SealError, or the SPKI of the certified key',
    () => {
      fuzz('verifyCertify (signed, mutated certified public)', mutatedOrRandom(PUBLIC_SEEDS, 300), (pub) => {
        let name: Buffer | undefined;
        try {
          name = objectName(decodePublic(pub).bytes);
        } catch {
          name = createHash('sha256').update(pub).digest();
        }
        const a = attest('certify', NONCE, { certifiedName: name });
        const r = sealOnly(() => verifyCertify(akSpki, { attest: a, signature: akSign(a) }, NONCE, pub), ['USAGE_NOT_PERMITTED', 'DEVICE_ERROR', 'NOT_SUPPORTED', 'INVALID_ARGUMENT']);
        if (!r) return;
        expect(r.attest.certify?.name.equals(name)).toBe(true);
      });
    },
    timeoutFor(2),
  );

  it('verifyQuote with an attestation key of another type than ECDSA P-256: a SealError', () => {
    const others = ['ed25519', 'x25519', 'rsa', 'secp384r1'].map((t) =>
      t === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey : t === 'secp384r1' ? generateKeyPairSync('ec', { namedCurve: t }).publicKey : generateKeyPairSync(t as 'ed25519').publicKey,
    );
    fuzz('verifyQuote (other key types)', fc.constantFrom(...others), (key) => {
      expect(() => verifyQuote(key, quote, NONCE)).toThrow(SealError);
    }, { runs: Math.min(FUZZ_RUNS, 30) });
  });
});
