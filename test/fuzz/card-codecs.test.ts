/**
 * Fuzz: what a card or a modem sends back, read by the PC/SC and AT codecs (BER-TLV, command and
 * response APDUs, ATR historical bytes, AT lines and +CSIM/+CCHO/+CME answers) and by the PIV and
 * IoT SAFE response readers. Inputs are mutations of real encodings (spec layouts, answers the
 * virtual cards give) plus random and oversized bytes. test/unit/ already throws random short
 * bytes at parseBerTlv and random lines at the AT collector; these go deeper (valid structures
 * changed a little) and wider (the APDU parser, ATRs, the applet response readers).
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { constants, createPublicKey, generateKeyPairSync, privateDecrypt, publicEncrypt } from 'node:crypto';
import { SealError, ERROR_CODES } from '../../src/core/errors.js';
import { berTlv, encodeBerTlv, parseBerTlv } from '../../src/backends/pcsc/tlv.js';
import { atrSupportsExtendedLength, commandApdu, parseCommandApdu, splitResponse, statusError } from '../../src/backends/pcsc/apdu.js';
import { AtLineReader, AtResponseCollector, MAX_AT_LINE, cmeError, identityText, parseCchoResponse, parseSimResponse } from '../../src/backends/pcsc/at.js';
import { parseAppInfo, parseObjectList, pointFrom, signatureFrom } from '../../src/backends/pcsc/iotsafe.js';
import { PIV_KEY_TYPES, PIV_SLOTS, oaepDecode, parseSlot, spkiFromPivPublicKey } from '../../src/backends/pcsc/piv.js';
import { parseManagementKey } from '../../src/backends/pcsc/index.js';
import { bytes, fuzz, mutatedOrRandom, sealOnly, timeoutFor } from './support.js';

const h = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const ec = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
const point = Buffer.from(ec.publicKey.export({ format: 'jwk' }).x!, 'base64url');
const uncompressed = Buffer.concat([Buffer.from([4]), point, Buffer.from(ec.publicKey.export({ format: 'jwk' }).y!, 'base64url')]);

// ---- BER-TLV -----------------------------------------------------------------------------------

const TLV_SEEDS = [
  berTlv(0x7c, encodeBerTlv(0x82, Buffer.alloc(0)), encodeBerTlv(0x81, Buffer.alloc(32, 0xab))),
  berTlv(0x7f49, encodeBerTlv(0x86, uncompressed)),
  berTlv(0x7f49, encodeBerTlv(0x81, Buffer.alloc(256, 0xc3)), encodeBerTlv(0x82, h('010001'))),
  berTlv(0x53, encodeBerTlv(0x70, Buffer.alloc(300, 1)), encodeBerTlv(0x71, Buffer.from([0])), encodeBerTlv(0xfe, Buffer.alloc(0))),
  Buffer.concat([h('5c035fc105'), h('0000ff'), encodeBerTlv(0x5fc105, Buffer.alloc(3))]),
  encodeBerTlv(0x53, Buffer.alloc(70_000, 7)),
];

describe('fuzz: BER-TLV (ISO 7816-4 5.2)', () => {
  it(
    'parseBerTlv: DEVICE_ERROR or objects whose values lie inside the input and re-encode to the bytes they came from',
    () => {
      fuzz('parseBerTlv', mutatedOrRandom(TLV_SEEDS), (buf) => {
        const list = sealOnly(() => parseBerTlv(buf), ['DEVICE_ERROR']);
        if (!list) return;
        let total = 0;
        for (const t of list) {
          expect(t.value.buffer).toBe(buf.buffer);
          expect(t.value.byteOffset - buf.byteOffset + t.value.length).toBeLessThanOrEqual(buf.length);
          total += t.value.length;
          // an object read from minimal-length encodings writes back to the same bytes
          const enc = sealOnly(() => encodeBerTlv(t.tag, t.value), ['INVALID_ARGUMENT']);
          if (enc) {
            const back = parseBerTlv(enc);
            expect(back.length).toBe(1);
            expect(back[0]!.tag).toBe(t.tag);
            expect(back[0]!.value.equals(t.value)).toBe(true);
          }
        }
        expect(total).toBeLessThanOrEqual(buf.length);
      });
    },
    timeoutFor(1),
  );
});

// ---- APDUs -------------------------------------------------------------------------------------

const APDU_SEEDS = [
  h('00a4040005a000000308'),
  h('00cb3fff055c035fc10500'),
  commandApdu(0x00, 0x87, 0x11, 0x9a, Buffer.alloc(300, 0x5a), 0x10000),
  commandApdu(0x81, 0x2a, 0x00, 0x00, Buffer.alloc(16), 256),
  commandApdu(0x00, 0xc0, 0x00, 0x00, undefined, 0x1000),
  h('00b00000'),
];

describe('fuzz: APDUs (ISO 7816-4 5.1)', () => {
  it(
    'parseCommandApdu: INVALID_ARGUMENT or the parts, which commandApdu writes back into an APDU with the same parts',
    () => {
      fuzz('parseCommandApdu', mutatedOrRandom(APDU_SEEDS, 400), (apdu) => {
        const p = sealOnly(() => parseCommandApdu(apdu), ['INVALID_ARGUMENT']);
        if (!p) return;
        expect(apdu.length).toBeGreaterThanOrEqual(4);
        const again = parseCommandApdu(commandApdu(p.cla, p.ins, p.p1, p.p2, p.data, p.le));
        expect({ ...again, extended: undefined }).toEqual({ ...p, extended: undefined });
      });
    },
    timeoutFor(1),
  );

  it('splitResponse: DEVICE_ERROR below two bytes, else data ‖ SW1 SW2 that reassemble to the input', () => {
    fuzz('splitResponse', bytes(300), (raw) => {
      const r = sealOnly(() => splitResponse(raw), ['DEVICE_ERROR']);
      if (!r) return expect(raw.length).toBeLessThan(2);
      const sw = Buffer.alloc(2);
      sw.writeUInt16BE(r.sw);
      expect(Buffer.concat([r.data, sw]).equals(raw)).toBe(true);
    });
  });

  it('statusError: every status word maps to a known code with backendCode SW_xxxx', () => {
    fuzz('statusError', fc.integer({ min: -1, max: 0x1ffff }), (sw) => {
      const e = statusError(sw, 'GET DATA');
      expect(e).toBeInstanceOf(SealError);
      expect(ERROR_CODES).toContain(e.code);
      expect(e.backendCode).toMatch(/^SW_[0-9A-F]{4}$/);
    });
  });

  it('atrSupportsExtendedLength: a boolean for any ATR, never an exception', () => {
    const atrs = [h('3bf81300008131fe15597562696b657934d4'), h('3bfd1300008131fe158073c021c057597562694b657940'), h('3b8c80018073c021c0579043'), h('3b00')];
    fuzz('atrSupportsExtendedLength', mutatedOrRandom(atrs, 40), (atr) => {
      expect(typeof atrSupportsExtendedLength(atr)).toBe('boolean');
    });
  });
});

// ---- AT (3GPP TS 27.007) -----------------------------------------------------------------------

const atLines = fc.oneof(
  fc.constantFrom('OK', 'ERROR', 'RING', '+CREG: 1', '+CME ERROR: 10', '+CME ERROR: SIM busy', '+CMS ERROR: 500', 'NO CARRIER', '+CCHO: 7', '7', 'AT+CSIM=4,"0000"', '+CSIM: 4,"9000"', '+CGLA: 4,9000'),
  fc
    .tuple(fc.constantFrom('+CSIM:', '+CGLA:', '+CCHO:', '+CME ERROR:', ''), fc.string({ unit: fc.constantFrom('0', '9', 'A', 'f', ',', '"', ' ', '-', 'x'), maxLength: 30 }))
    .map(([a, b]) => a + b),
  fc.string({ unit: 'binary', maxLength: 60 }),
);

describe('fuzz: AT answers', () => {
  it(
    'line reader and collectors: lines without control characters; +CSIM/+CGLA data that matches its declared length; SealError otherwise',
    () => {
      const stream = fc.tuple(fc.array(atLines, { maxLength: 12 }), fc.constantFrom('\r\n', '\r', '\n', '\n\r'), fc.integer({ min: 1, max: 64 }));
      fuzz('AT line reader + collectors + parseSimResponse/parseCchoResponse', stream, ([lines, eol, chunk]) => {
        const raw = Buffer.from(lines.join(eol) + eol, 'latin1');
        const reader = new AtLineReader();
        const got: string[] = [];
        for (let i = 0; i < raw.length; i += chunk) for (const l of sealOnly(() => reader.push(raw.subarray(i, i + chunk)), ['DEVICE_ERROR']) ?? []) got.push(l);
        for (const l of got) expect(l).not.toMatch(/[\x00-\x08\x0a-\x1f\x7f]/);
        for (const command of ['AT+CSIM=10,"00A4040000"', 'AT+CGLA=1,10,"00A4040000"', 'AT+CCHO="A0000005590010"', 'ATI']) {
          const c = new AtResponseCollector(command);
          let o = c.push('');
          for (const l of got) o = c.push(l);
          if (!o.done) continue;
          if (!o.ok) {
            expect(o.error).toBeInstanceOf(SealError);
            expect(o.error.message).not.toMatch(/[^\x20-\x7e]/);
            continue;
          }
          if (command.startsWith('AT+CSIM') || command.startsWith('AT+CGLA')) {
            const prefix = command.startsWith('AT+CSIM') ? '+CSIM' : '+CGLA';
            const r = sealOnly(() => parseSimResponse(o.lines, prefix), ['DEVICE_ERROR']);
            if (r) {
              expect(r.length).toBeGreaterThanOrEqual(2);
              const line = [...o.lines].reverse().find((l) => l.toUpperCase().startsWith(`${prefix}:`))!;
              expect(Number(/:\s*(\d+)/.exec(line)![1])).toBe(r.length * 2);
            }
          } else if (command.startsWith('AT+CCHO')) {
            const id = sealOnly(() => parseCchoResponse(o.lines), ['DEVICE_ERROR']);
            if (id !== undefined) expect(Number.isInteger(id) && id >= 0 && id <= 0xffffffff).toBe(true);
          } else {
            const text = identityText(o.lines);
            expect(text.length).toBeLessThanOrEqual(200);
            expect(text).not.toMatch(/[^\x20-\x7e]/);
          }
        }
      });
    },
    timeoutFor(2),
  );

  it('an endless line is DEVICE_ERROR, however it arrives, and the reader recovers', () => {
    fuzz('AtLineReader (oversized lines)', fc.tuple(fc.integer({ min: MAX_AT_LINE + 1, max: MAX_AT_LINE + 5000 }), fc.integer({ min: 1000, max: 70_000 })), ([n, chunk]) => {
      const r = new AtLineReader();
      const big = Buffer.alloc(n, 0x41);
      let refused = false;
      for (let i = 0; i < n; i += chunk) {
        try {
          r.push(big.subarray(i, i + chunk));
        } catch (e) {
          expect(e).toBeInstanceOf(SealError);
          refused = true;
        }
      }
      expect(refused).toBe(true);
      expect(r.push('\r\nOK\r\n')).toEqual(['OK']);
    }, { runs: 40 });
  });

  it('cmeError: a SealError whose message carries only printable ASCII and is bounded', () => {
    fuzz('cmeError', fc.string({ unit: 'binary', maxLength: 500 }).map((s) => `+CME ERROR: ${s}`), (line) => {
      const e = cmeError(line);
      expect(e).toBeInstanceOf(SealError);
      expect(e.message).not.toMatch(/[^\x20-\x7e]/);
      expect(e.message.length).toBeLessThan(200);
    });
  });
});

// ---- applet response readers -------------------------------------------------------------------

const IOTSAFE_SEEDS = [
  berTlv(0xc1, encodeBerTlv(0x84, h('01')), encodeBerTlv(0x74, Buffer.from('client-key')), encodeBerTlv(0x4b, h('13')), encodeBerTlv(0x4e, h('01')), encodeBerTlv(0x84, h('02')), encodeBerTlv(0x74, Buffer.from('peer'))),
  Buffer.concat([berTlv(0xc2, encodeBerTlv(0x85, h('10')), encodeBerTlv(0x75, Buffer.from('pub'))), berTlv(0xc4, encodeBerTlv(0x83, h('20')), encodeBerTlv(0x73, Buffer.from('file')), encodeBerTlv(0x20, h('0400')))]),
  Buffer.concat([encodeBerTlv(0x10, h('0102')), encodeBerTlv(0x11, h('aabb')), encodeBerTlv(0x90, h('ffff')), encodeBerTlv(0xb7, h('04'))]),
  berTlv(0x34, berTlv(0x49, encodeBerTlv(0x86, uncompressed))),
  Buffer.concat([h('3340'), Buffer.alloc(64, 9)]),
  Buffer.concat([h('330040'), Buffer.alloc(64, 9)]),
  encodeBerTlv(0x33, h('3006020101020101')),
];

describe('fuzz: IoT SAFE and PIV response readers', () => {
  it(
    'parseObjectList, parseAppInfo, pointFrom, signatureFrom: a SealError or well-formed results',
    () => {
      fuzz('IoT SAFE readers (parseObjectList, parseAppInfo, pointFrom, signatureFrom)', mutatedOrRandom(IOTSAFE_SEEDS), (data) => {
        const objects = sealOnly(() => parseObjectList(data), ['DEVICE_ERROR']);
        for (const o of objects ?? []) {
          expect(['private', 'public', 'secret', 'file']).toContain(o.kind);
          expect(Buffer.isBuffer(o.id)).toBe(true);
        }
        sealOnly(() => parseAppInfo(data), ['DEVICE_ERROR']);
        const tlvs = sealOnly(() => parseBerTlv(data), ['DEVICE_ERROR']);
        if (tlvs) {
          const p = sealOnly(() => pointFrom(tlvs, 'READ PUBLIC KEY'), ['DEVICE_ERROR']);
          if (p) expect(p.length === 65 && p[0] === 4).toBe(true);
        }
        const sig = sealOnly(() => signatureFrom(data, 32), ['DEVICE_ERROR']);
        if (sig) expect(sig.length).toBe(64);
      });
    },
    timeoutFor(1),
  );

  it(
    'spkiFromPivPublicKey: a SealError or an SPKI node:crypto reads with the point or modulus the card sent',
    () => {
      const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ format: 'jwk' });
      const seeds = [
        berTlv(0x7f49, encodeBerTlv(0x86, uncompressed)).subarray(3),
        encodeBerTlv(0x86, uncompressed),
        Buffer.concat([encodeBerTlv(0x81, Buffer.from(rsa.n!, 'base64url')), encodeBerTlv(0x82, Buffer.from(rsa.e!, 'base64url'))]),
      ];
      fuzz('spkiFromPivPublicKey', fc.tuple(mutatedOrRandom(seeds), fc.constantFrom(...PIV_KEY_TYPES)), ([data, type]) => {
        const spki = sealOnly(() => spkiFromPivPublicKey(type, data), ['DEVICE_ERROR', 'INVALID_ARGUMENT', 'NOT_SUPPORTED']);
        if (!spki) return;
        // the oracle: node:crypto reads the SPKI, and it holds what the card's TLV said
        const jwk = createPublicKey({ key: spki, format: 'der', type: 'spki' }).export({ format: 'jwk' });
        const tlv = parseBerTlv(data);
        if (type.kind === 'ec') {
          const p = tlv.find((t) => t.tag === 0x86)!.value;
          expect(Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]).equals(p)).toBe(true);
        } else {
          const n = tlv.find((t) => t.tag === 0x81)!.value;
          expect(BigInt('0x' + Buffer.from(jwk.n!, 'base64url').toString('hex'))).toBe(BigInt('0x' + (n.toString('hex') || '0')));
        }
      });
    },
    timeoutFor(1),
  );

  it(
    'oaepDecode: DECRYPTION_FAILED for anything but a real OAEP block, whose message it returns',
    () => {
      const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
      // a real EME-OAEP block: RSA-decrypt without padding what node encrypted with OAEP
      const msg = Buffer.from('seal-bridge');
      const em = privateDecrypt({ key: privateKey, padding: constants.RSA_NO_PADDING }, publicEncrypt({ key: publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, msg));
      expect(oaepDecode('SHA-256', em).equals(msg)).toBe(true);
      fuzz('oaepDecode', mutatedOrRandom([em], 300), (block) => {
        const out = sealOnly(() => oaepDecode('SHA-256', block), ['DECRYPTION_FAILED']);
        // any change to the block changes the unmasked seed and DB: only the real block decodes
        if (out) expect(block.equals(em) && out.equals(msg)).toBe(true);
      });
    },
    timeoutFor(2),
  );

  it('parseSlot and parseManagementKey: undefined / SECRET_SOURCE, or a PIV slot and a 16/24/32-byte key', () => {
    fuzz('parseSlot + parseManagementKey', fc.oneof(fc.string({ unit: 'binary', maxLength: 80 }), fc.constantFrom('9a', 'SLOT-9C', '0x82', 'retired-20', ' signature ', '0102030405060708:0102030405060708:0102030405060708')), (text) => {
      const slot = parseSlot(text);
      if (slot !== undefined) expect(PIV_SLOTS).toContain(slot);
      const key = sealOnly(() => parseManagementKey(text), ['SECRET_SOURCE']);
      if (key) expect([16, 24, 32]).toContain(key.length);
    });
  });
});
