/**
 * The TPM backend's pure code: wire encoding of public areas and attestation structures, TSS2
 * PEM key files (checked with openssl asn1parse), the protection level from a TPM's identity, and
 * hostile input (random and truncated bytes give DEVICE_ERROR, never another exception).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { SealError } from '../../src/index.js';
import {
  ALG,
  CURVE,
  OBJ,
  decodeAttest,
  decodePublic,
  decodeSignature,
  encodePcrSelection,
  encodePublic,
  encodeDerivedTemplate,
  objectName,
  pcrPolicyDigest,
  type PublicArea,
} from '../../src/backends/tpm2/marshal.js';
import { decodeKeyFile, encodeKeyFile } from '../../src/backends/tpm2/keyfile.js';
import { tpmProtection } from '../../src/backends/tpm2/index.js';

const ecc: PublicArea = {
  type: 'ecc', nameAlg: ALG.SHA256, attributes: OBJ.fixedTPM | OBJ.fixedParent | OBJ.sign, authPolicy: Buffer.alloc(0),
  symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.ECDSA, hash: ALG.SHA256 }, curve: CURVE['P-256'], kdf: { alg: ALG.NULL },
  x: randomBytes(32), y: randomBytes(32),
};
const areas: PublicArea[] = [
  ecc,
  { type: 'rsa', nameAlg: ALG.SHA256, attributes: OBJ.decrypt, authPolicy: randomBytes(32), symmetric: { alg: ALG.AES, keyBits: 128, mode: ALG.CFB }, scheme: { alg: ALG.NULL }, keyBits: 2048, exponent: 0, modulus: randomBytes(256) },
  { type: 'keyedhash', nameAlg: ALG.SHA256, attributes: OBJ.restricted | OBJ.decrypt, authPolicy: Buffer.alloc(0), scheme: { alg: ALG.XOR, hash: ALG.SHA256, kdf: ALG.KDF1_SP800_108 }, unique: randomBytes(32) },
  { type: 'symcipher', nameAlg: ALG.SHA256, attributes: OBJ.decrypt | OBJ.sign, authPolicy: Buffer.alloc(0), symmetric: { alg: ALG.AES, keyBits: 128, mode: ALG.NULL }, unique: randomBytes(32) },
];

describe('TPM wire encoding', () => {
  it('encodes and decodes each public area type to the same structure', () => {
    for (const a of areas) {
      const { area, bytes } = decodePublic(encodePublic(a));
      expect(area).toEqual(a);
      // the Name is nameAlg ‖ SHA-256(TPMT_PUBLIC) (TPM 2.0 Part 1, 16 Names)
      expect(objectName(bytes).equals(Buffer.concat([Buffer.from([0x00, 0x0b]), createHash('sha256').update(bytes).digest()]))).toBe(true);
    }
  });

  it('lays out an ECC public area as TPM 2.0 Part 2 says (type, nameAlg, attributes, policy, parameters, unique)', () => {
    const b = encodePublic(ecc);
    expect(b.readUInt16BE(0)).toBe(b.length - 2); // TPM2B size
    expect(b.readUInt16BE(2)).toBe(0x0023); // TPM_ALG_ECC
    expect(b.readUInt16BE(4)).toBe(0x000b); // TPM_ALG_SHA256
    expect(b.readUInt32BE(6)).toBe(0x00040012); // fixedTPM | fixedParent | sign
    expect(b.readUInt16BE(10)).toBe(0); // empty authPolicy
    expect(b.subarray(12, 22).toString('hex')).toBe('0010' + '0018000b' + '0003' + '0010'); // sym NULL, ECDSA/SHA256, P-256, kdf NULL
    expect(b.readUInt16BE(22)).toBe(32);
  });

  it('a derived-object template carries TPMS_DERIVE (label, context) in place of unique', () => {
    const t = encodeDerivedTemplate({ ...ecc, x: Buffer.alloc(0), y: Buffer.alloc(0) }, Buffer.from('label'), Buffer.from('ctx'));
    expect(t.subarray(t.length - 12).toString('hex')).toBe('0005' + Buffer.from('label').toString('hex') + '0003' + Buffer.from('ctx').toString('hex'));
    expect(() => encodeDerivedTemplate(ecc, Buffer.alloc(33), Buffer.alloc(0))).toThrow(SealError);
  });

  it('computes the PolicyPCR digest of the TPM 2.0 Part 3 formula', () => {
    const sel = encodePcrSelection(ALG.SHA256, [0, 16]);
    expect(sel.toString('hex')).toBe('00000001' + '000b' + '03' + '010001');
    const values = [randomBytes(32), randomBytes(32)];
    const expected = createHash('sha256')
      .update(Buffer.alloc(32))
      .update(Buffer.from('0000017f', 'hex'))
      .update(sel)
      .update(createHash('sha256').update(Buffer.concat(values)).digest())
      .digest();
    expect(pcrPolicyDigest(ALG.SHA256, sel, values).equals(expected)).toBe(true);
  });

  it('refuses random and truncated input with DEVICE_ERROR only (never hangs, never another exception)', () => {
    const parsers = [decodePublic, decodeSignature, decodeAttest];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.integer({ min: 0, max: 2 }), (bytes, which) => {
        try {
          parsers[which]!(Buffer.from(bytes));
        } catch (e) {
          expect(e).toBeInstanceOf(SealError);
        }
      }),
      { numRuns: 500 },
    );
    const good = encodePublic(ecc);
    for (let n = 0; n < good.length; n++) expect(() => decodePublic(good.subarray(0, n))).toThrow(SealError);
  });
});

describe('TSS2 PEM key files', () => {
  it('round-trips and is the ASN.1 openssl reads: OID 2.23.133.10.1.3, emptyAuth, parent, two octet strings', () => {
    const k = { emptyAuth: true, parent: 0x81000001, public: encodePublic(ecc), private: randomBytes(126) };
    const pem = encodeKeyFile(k);
    expect(pem.startsWith('-----BEGIN TSS2 PRIVATE KEY-----\n')).toBe(true);
    expect(decodeKeyFile(pem)).toEqual(k);
    const dir = mkdtempSync(join(tmpdir(), 'seal-tss2-'));
    writeFileSync(join(dir, 'k.pem'), pem);
    const r = spawnSync('openssl', ['asn1parse', '-in', join(dir, 'k.pem')], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/OBJECT\s+:2\.23\.133\.10\.1\.3/);
    expect(r.stdout).toMatch(/BOOLEAN\s+:255/);
    expect(r.stdout).toMatch(/INTEGER\s+:81000001/);
    expect((r.stdout.match(/OCTET STRING/g) ?? []).length).toBe(2);
    expect(() => decodeKeyFile('-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n')).toThrow(SealError);
  });
});

describe('TPM protection level', () => {
  it('derives the level from the TPM identity; an override warns', () => {
    expect(tpmProtection('swtpm:host=127.0.0.1,port=1', 'IBM', 'SWTPM').level).toBe(1);
    expect(tpmProtection('device:/dev/tpmrm0', 'IBM', 'SW   TPM').level).toBe(1);
    expect(tpmProtection('device:/dev/tpmrm0', 'INTC', '').level).toBe(2);
    expect(tpmProtection('device:/dev/tpmrm0', 'IFX', 'SLB9670').level).toBe(3);
    expect(tpmProtection('device:/dev/tpmrm0', 'STM', '').level).toBe(3);
    expect(tpmProtection('device:/dev/tpmrm0', 'ZZZ', '').level).toBe(2);
    const warn = vi.spyOn(process, 'emitWarning').mockImplementation(() => undefined);
    try {
      expect(tpmProtection('swtpm:host=127.0.0.1,port=1', 'IBM', 'SWTPM', '3').level).toBe(3);
      expect(warn).toHaveBeenCalledTimes(1);
      expect(String(warn.mock.calls[0]![0])).toMatch(/protection level of the TPM set to 3 by configuration/);
    } finally {
      warn.mockRestore();
    }
    expect(() => tpmProtection('device:/dev/tpmrm0', 'IFX', '', '7')).toThrow(SealError);
  });
});
