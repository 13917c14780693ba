/**
 * Command APDU encoding against the cases of ISO/IEC 7816-4 clause 5.1 (short and extended
 * forms), command chaining (5.1.1.1), logical channel class bytes (5.4.1), the status word
 * translation, and the 61xx / 6Cxx handling against scripted card functions (pure code: the
 * "card" is a list of canned answers). Expected bytes are written out from the standard.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SealError } from '../../src/core/errors.js';
import {
  ExclusiveLock,
  MAX_RESPONSE_ROUNDS,
  SerialQueue,
  atrSupportsExtendedLength,
  claWithChannel,
  commandApdu,
  commandChain,
  expectOk,
  getResponseCla,
  parseCommandApdu,
  statusError,
  swHex,
  transmitChained,
  withIsoResponseHandling,
} from '../../src/backends/pcsc/apdu.js';
import type { ResponseApdu } from '../../src/backends/pcsc/transport.js';

const h = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const hex = (b: Buffer): string => b.toString('hex').toUpperCase();
const PIV_AID = h('A0 00 00 03 08');

describe('commandApdu: ISO 7816-4 cases', () => {
  it('case 1: header only', () => {
    expect(hex(commandApdu(0x00, 0x70, 0x80, 0x01))).toBe('00708001');
  });
  it('case 2S: Le one byte, 256 → 00', () => {
    expect(hex(commandApdu(0x00, 0xb0, 0x00, 0x00, undefined, 0x10))).toBe('00B0000010');
    expect(hex(commandApdu(0x00, 0xb0, 0x00, 0x00, undefined, 256))).toBe('00B0000000');
    expect(hex(commandApdu(0x00, 0xb0, 0x00, 0x00, undefined, 0))).toBe('00B0000000');
  });
  it('case 3S: Lc and data', () => {
    expect(hex(commandApdu(0x00, 0xa4, 0x04, 0x00, PIV_AID))).toBe('00A4040005A000000308');
  });
  it('case 4S: Lc, data, Le', () => {
    expect(hex(commandApdu(0x00, 0xa4, 0x04, 0x00, PIV_AID, 256))).toBe('00A4040005A00000030800');
    expect(hex(commandApdu(0x00, 0xcb, 0x3f, 0xff, h('5C035FC105'), 0x20))).toBe('00CB3FFF055C035FC10520');
  });
  it('case 2E: 00 then two-byte Le, 65536 → 0000', () => {
    expect(hex(commandApdu(0x00, 0xb0, 0x00, 0x00, undefined, 257))).toBe('00B00000000101');
    expect(hex(commandApdu(0x00, 0xb0, 0x00, 0x00, undefined, 65536))).toBe('00B00000000000');
  });
  it('case 3E: 00 then two-byte Lc when data exceeds 255 bytes', () => {
    const data = Buffer.alloc(256, 0x5a);
    const apdu = commandApdu(0x00, 0xdb, 0x3f, 0xff, data);
    expect(hex(apdu.subarray(0, 7))).toBe('00DB3FFF000100');
    expect(apdu.length).toBe(7 + 256);
  });
  it('case 4E: two-byte Lc, data, two-byte Le (no second 00)', () => {
    const data = Buffer.alloc(256, 1);
    const apdu = commandApdu(0x00, 0x87, 0x07, 0x9a, data, 65536);
    expect(hex(apdu.subarray(0, 7))).toBe('0087079A000100');
    expect(hex(apdu.subarray(7 + 256))).toBe('0000');
    // short data but Le > 256 also forces the extended form
    expect(hex(commandApdu(0x00, 0xcb, 0x3f, 0xff, h('5C035FC105'), 300))).toBe('00CB3FFF0000055C035FC105012C');
  });
  it('rejects out-of-range fields', () => {
    expect(() => commandApdu(0x100, 0, 0, 0)).toThrow(SealError);
    expect(() => commandApdu(0, 0, -1, 0)).toThrow(SealError);
    expect(() => commandApdu(0, 0, 0, 0, undefined, 65537)).toThrow(SealError);
    try {
      commandApdu(0, 0xdb, 0, 0, Buffer.alloc(65536));
      throw new Error('no error');
    } catch (e) {
      expect((e as SealError).code).toBe('DATA_TOO_LARGE');
    }
  });
  it('parseCommandApdu reads back what commandApdu wrote, for every case', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 255 }),
        fc.integer({ min: 0, max: 255 }),
        fc.uint8Array({ maxLength: 400 }),
        fc.option(fc.integer({ min: 1, max: 65536 }), { nil: undefined }),
        (cla, ins, data, le) => {
          const apdu = commandApdu(cla, ins, 1, 2, Buffer.from(data), le);
          const p = parseCommandApdu(apdu);
          expect([p.cla, p.ins, p.p1, p.p2]).toEqual([cla, ins, 1, 2]);
          expect(hex(p.data ?? Buffer.alloc(0))).toBe(hex(Buffer.from(data)));
          expect(p.le).toBe(le);
          expect(p.extended).toBe(data.length > 255 || (le ?? 0) > 256);
        },
      ),
      { numRuns: 300 },
    );
  });
  it('parseCommandApdu refuses APDUs that match no case', () => {
    for (const s of ['00A404', '00A4040005A0', '00A4040000000500', '00A404000001', '00A4040000000000']) expect(() => parseCommandApdu(h(s))).toThrow(SealError);
  });
});

describe('command chaining', () => {
  it('splits into 255-byte pieces, CLA b5 set on all but the last, Le only on the last', () => {
    const data = Buffer.from(Array.from({ length: 600 }, (_, i) => i & 0xff));
    const chain = commandChain(0x00, 0xdb, 0x3f, 0xff, data, 256);
    expect(chain).toHaveLength(3);
    expect(hex(chain[0]!.subarray(0, 5))).toBe('10DB3FFFFF');
    expect(chain[0]!.length).toBe(5 + 255);
    expect(hex(chain[1]!.subarray(0, 5))).toBe('10DB3FFFFF');
    expect(hex(chain[2]!.subarray(0, 5))).toBe('00DB3FFF5A'); // 600 - 510 = 90 = 0x5A
    expect(chain[2]!.length).toBe(5 + 90 + 1);
    expect(chain[2]![chain[2]!.length - 1]).toBe(0x00);
    const rejoined = Buffer.concat(chain.map((a) => parseCommandApdu(a).data!));
    expect(rejoined).toEqual(data);
  });
  it('keeps a short command whole', () => {
    expect(commandChain(0x00, 0x87, 0x11, 0x9a, Buffer.alloc(10), 256)).toEqual([commandApdu(0x00, 0x87, 0x11, 0x9a, Buffer.alloc(10), 256)]);
  });
  it('transmitChained sends the chain and returns the last answer', async () => {
    const sent: Buffer[] = [];
    const ch = {
      async transmit(a: Buffer): Promise<ResponseApdu> {
        sent.push(a);
        return { data: sent.length === 3 ? h('AA') : Buffer.alloc(0), sw: 0x9000 };
      },
    };
    const r = await transmitChained(ch, 0x00, 0xdb, 0x3f, 0xff, Buffer.alloc(600));
    expect(sent.map((a) => a[0])).toEqual([0x10, 0x10, 0x00]);
    expect(r).toEqual({ data: h('AA'), sw: 0x9000 });
  });
  it('transmitChained stops at an intermediate error', async () => {
    const sent: Buffer[] = [];
    const ch = {
      async transmit(a: Buffer): Promise<ResponseApdu> {
        sent.push(a);
        return { data: Buffer.alloc(0), sw: 0x6a80 };
      },
    };
    const r = await transmitChained(ch, 0x00, 0xdb, 0x3f, 0xff, Buffer.alloc(600));
    expect(sent).toHaveLength(1);
    expect(r.sw).toBe(0x6a80);
  });
  it('transmitChained sends one extended APDU when the channel supports them', async () => {
    const sent: Buffer[] = [];
    const ch = {
      extendedLength: true,
      async transmit(a: Buffer): Promise<ResponseApdu> {
        sent.push(a);
        return { data: Buffer.alloc(0), sw: 0x9000 };
      },
    };
    await transmitChained(ch, 0x00, 0xdb, 0x3f, 0xff, Buffer.alloc(600));
    expect(sent).toHaveLength(1);
    expect(hex(sent[0]!.subarray(0, 7))).toBe('00DB3FFF000258');
  });
});

describe('status words', () => {
  it('swHex writes four upper-case digits', () => {
    expect(swHex(0x6982)).toBe('6982');
    expect(swHex(0x6a82)).toBe('6A82');
    expect(swHex(0x9000)).toBe('9000');
    expect(swHex(0x0001)).toBe('0001');
  });

  const table: Array<[number, string]> = [
    [0x6982, 'NOT_LOGGED_IN'],
    [0x6983, 'PIN_LOCKED'],
    [0x6a82, 'OBJECT_NOT_FOUND'],
    [0x6a88, 'OBJECT_NOT_FOUND'],
    [0x6a80, 'INVALID_ARGUMENT'],
    [0x6700, 'INVALID_ARGUMENT'],
    [0x6a86, 'INVALID_ARGUMENT'],
    [0x6d00, 'NOT_SUPPORTED'],
    [0x6e00, 'NOT_SUPPORTED'],
    [0x6a81, 'NOT_SUPPORTED'],
    [0x6985, 'USAGE_NOT_PERMITTED'],
    [0x6f00, 'DEVICE_ERROR'],
    [0x6400, 'DEVICE_ERROR'],
    [0x6999, 'DEVICE_ERROR'],
  ];
  for (const [sw, code] of table) {
    it(`${swHex(sw)} → ${code}, backendCode SW_${swHex(sw)}`, () => {
      const e = statusError(sw, 'GENERAL AUTHENTICATE');
      expect(e).toBeInstanceOf(SealError);
      expect(e.code).toBe(code);
      expect(e.backendCode).toBe(`SW_${swHex(sw)}`);
      expect(e.backendStatus).toBe(sw);
      expect(e.message).toContain('GENERAL AUTHENTICATE');
    });
  }
  it('6982 says security status not satisfied, 6985 conditions of use', () => {
    expect(statusError(0x6982, 'x').message).toContain('security status not satisfied');
    expect(statusError(0x6985, 'x').message).toContain('conditions of use');
  });
  it('63Cx → PIN_INCORRECT with x tries left', () => {
    for (const x of [0, 1, 2, 15]) {
      const e = statusError(0x63c0 | x, 'VERIFY');
      expect(e.code).toBe('PIN_INCORRECT');
      expect(e.triesLeft).toBe(x);
      expect(e.backendCode).toBe(`SW_63C${x.toString(16).toUpperCase()}`);
    }
  });
  it('expectOk returns the data on 9000 and throws the mapped error otherwise', () => {
    expect(expectOk({ data: h('0102'), sw: 0x9000 }, 'x')).toEqual(h('0102'));
    expect(() => expectOk({ data: Buffer.alloc(0), sw: 0x6a82 }, 'x')).toThrow(expect.objectContaining({ code: 'OBJECT_NOT_FOUND' }));
  });
});

describe('logical channel class bytes (ISO 7816-4 5.4.1)', () => {
  it('moves a basic-channel CLA to channels 0–19', () => {
    expect(claWithChannel(0x00, 0)).toBe(0x00);
    expect(claWithChannel(0x00, 1)).toBe(0x01);
    expect(claWithChannel(0x00, 3)).toBe(0x03);
    expect(claWithChannel(0x80, 1)).toBe(0x81); // IoT SAFE style proprietary class
    expect(claWithChannel(0x10, 2)).toBe(0x12); // chaining bit kept
    expect(claWithChannel(0x00, 4)).toBe(0x40);
    expect(claWithChannel(0x00, 19)).toBe(0x4f);
    expect(claWithChannel(0x80, 5)).toBe(0xc1);
    expect(claWithChannel(0x10, 4)).toBe(0x50);
    expect(() => claWithChannel(0x00, 20)).toThrow(SealError);
  });
  it('GET RESPONSE uses the interindustry class of the same channel', () => {
    expect(getResponseCla(0x00)).toBe(0x00);
    expect(getResponseCla(0x81)).toBe(0x01);
    expect(getResponseCla(0x13)).toBe(0x03); // chaining bit dropped
    expect(getResponseCla(0x0e)).toBe(0x02); // SM bits dropped
    expect(getResponseCla(0x45)).toBe(0x45);
    expect(getResponseCla(0xc2)).toBe(0x42);
  });
});

describe('ATR card capabilities', () => {
  it('YubiKey 5 and NEO ATRs announce extended Lc/Le (compact-TLV 73 C0 21 C0: b7 of the third byte)', () => {
    expect(atrSupportsExtendedLength(h('3BFD1300008131FE158073C021C057597562694B657940'))).toBe(true);
    expect(atrSupportsExtendedLength(h('3B8D80018073C021C057597562694B657940'))).toBe(true);
  });
  it('an ATR whose third capability byte lacks b7, or without compact-TLV history, does not', () => {
    expect(atrSupportsExtendedLength(h('3BFD1300008131FE158073C0218057597562694B657940'))).toBe(false);
    expect(atrSupportsExtendedLength(h('3BF81300008131FE15597562696B657934D4'))).toBe(false);
    expect(atrSupportsExtendedLength(h('3B'))).toBe(false);
    expect(atrSupportsExtendedLength(h('3BFF'))).toBe(false);
  });
});

/** A scripted card: each call returns the next canned answer; records the commands. */
function scripted(answers: Array<string | ((apdu: Buffer) => string)>): { send: (a: Buffer) => Promise<Buffer>; sent: string[] } {
  const sent: string[] = [];
  let i = 0;
  return {
    sent,
    send: async (a: Buffer) => {
      sent.push(hex(a));
      const next = answers[Math.min(i++, answers.length - 1)]!;
      return h(typeof next === 'string' ? next : next(a));
    },
  };
}

describe('withIsoResponseHandling', () => {
  it('a plain answer passes through', async () => {
    const card = scripted(['01029000']);
    expect(await withIsoResponseHandling(card.send, h('00CA000000'))).toEqual({ data: h('0102'), sw: 0x9000 });
    expect(card.sent).toEqual(['00CA000000']);
  });

  it('61xx: GET RESPONSE until the data is complete, parts concatenated', async () => {
    const p1 = 'AA'.repeat(100);
    const p2 = 'BB'.repeat(256);
    const p3 = 'CC'.repeat(0x2c);
    const card = scripted([`${p1}6100`, `${p2}612C`, `${p3}9000`]);
    const r = await withIsoResponseHandling(card.send, h('00CB3FFF055C035FC10500'));
    expect(card.sent).toEqual(['00CB3FFF055C035FC10500', '00C0000000', '00C000002C']);
    expect(r.sw).toBe(0x9000);
    expect(hex(r.data)).toBe(p1 + p2 + p3);
  });

  it('61xx on a logical channel with a proprietary class: GET RESPONSE as <ch> C0 00 00 xx', async () => {
    const card = scripted(['6110', `${'11'.repeat(16)}9000`]);
    const r = await withIsoResponseHandling(card.send, h('81CD0000038501 01'));
    expect(card.sent[1]).toBe('01C0000010');
    expect(r.data.length).toBe(16);
  });

  it('6Cxx: the same command again with Le = xx (case 2, case 1 and case 3 commands)', async () => {
    let card = scripted(['6C10', `${'22'.repeat(16)}9000`]);
    let r = await withIsoResponseHandling(card.send, h('00CA010000'));
    expect(card.sent).toEqual(['00CA010000', '00CA010010']);
    expect(r.data.length).toBe(16);

    card = scripted(['6C08', `${'33'.repeat(8)}9000`]);
    r = await withIsoResponseHandling(card.send, h('00840000'));
    expect(card.sent).toEqual(['00840000', '0084000008']);

    card = scripted(['6C00', '9000']);
    await withIsoResponseHandling(card.send, h('00CB3FFF03 5C0141'));
    expect(card.sent[1]).toBe('00CB3FFF035C014100');
  });

  it('6Cxx then 61xx', async () => {
    const card = scripted(['6C20', `${'44'.repeat(10)}6105`, `${'55'.repeat(5)}9000`]);
    const r = await withIsoResponseHandling(card.send, h('00CA000000'));
    expect(card.sent).toEqual(['00CA000000', '00CA000020', '00C0000005']);
    expect(hex(r.data)).toBe('44'.repeat(10) + '55'.repeat(5));
  });

  it('an error status after GET RESPONSE is returned with the data so far', async () => {
    const card = scripted(['AA6102', '6F00']);
    const r = await withIsoResponseHandling(card.send, h('00CA000000'));
    expect(r).toEqual({ data: h('AA'), sw: 0x6f00 });
  });

  it('a card that answers 61xx forever: bounded, DEVICE_ERROR', async () => {
    const card = scripted(['6100']);
    await expect(withIsoResponseHandling(card.send, h('00CA000000'))).rejects.toMatchObject({ code: 'DEVICE_ERROR' });
    expect(card.sent.length).toBeLessThanOrEqual(MAX_RESPONSE_ROUNDS);
  });

  it('a card that answers 61xx with data forever: stopped by the size bound too', async () => {
    const card = scripted([`${'00'.repeat(256)}6100`]);
    await expect(withIsoResponseHandling(card.send, h('00CA000000'))).rejects.toBeInstanceOf(SealError);
    expect(card.sent.length).toBeLessThanOrEqual(MAX_RESPONSE_ROUNDS);
  });

  it('a card that answers the same 6Cxx again stops at once; alternating 6Cxx is bounded', async () => {
    let card = scripted(['6C10']);
    await expect(withIsoResponseHandling(card.send, h('00CA000000'))).rejects.toMatchObject({ code: 'DEVICE_ERROR' });
    expect(card.sent.length).toBe(2);
    card = scripted([(a) => (a[4] === 0x10 ? '6C20' : '6C10')]);
    await expect(withIsoResponseHandling(card.send, h('00CA000000'))).rejects.toMatchObject({ code: 'DEVICE_ERROR' });
    expect(card.sent.length).toBeLessThanOrEqual(MAX_RESPONSE_ROUNDS);
  });

  it('an answer shorter than a status word is DEVICE_ERROR', async () => {
    await expect(withIsoResponseHandling(scripted(['90']).send, h('00CA000000'))).rejects.toMatchObject({ code: 'DEVICE_ERROR' });
    await expect(withIsoResponseHandling(scripted(['']).send, h('00CA000000'))).rejects.toMatchObject({ code: 'DEVICE_ERROR' });
  });

  it('errors of the send function pass through unchanged', async () => {
    const err = new SealError('DEVICE_UNAVAILABLE', 'card removed');
    await expect(withIsoResponseHandling(() => Promise.reject(err), h('00CA000000'))).rejects.toBe(err);
  });

  it('any card behaviour ends in a ResponseApdu or a SealError, within the bound', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.uint8Array({ maxLength: 300 }), { minLength: 1, maxLength: 20 }), fc.uint8Array({ minLength: 4, maxLength: 40 }), async (answers, cmd) => {
        let calls = 0;
        const send = async (): Promise<Buffer> => Buffer.from(answers[Math.min(calls++, answers.length - 1)]!);
        try {
          const r = await withIsoResponseHandling(send, Buffer.from(cmd));
          expect(typeof r.sw).toBe('number');
          expect(r.sw >> 8).not.toBe(0x61);
        } catch (e) {
          expect(e).toBeInstanceOf(SealError);
        }
        expect(calls).toBeLessThanOrEqual(MAX_RESPONSE_ROUNDS);
      }),
      { numRuns: 300 },
    );
  });
});

describe('SerialQueue and ExclusiveLock', () => {
  const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 1));

  it('SerialQueue runs one at a time in call order, and survives a failing job', async () => {
    const q = new SerialQueue();
    const log: string[] = [];
    const job = (name: string, fail = false) => async () => {
      log.push(`${name}+`);
      await tick();
      log.push(`${name}-`);
      if (fail) throw new Error(name);
      return name;
    };
    const results = await Promise.allSettled([q.run(job('a')), q.run(job('b', true)), q.run(job('c'))]);
    expect(log).toEqual(['a+', 'a-', 'b+', 'b-', 'c+', 'c-']);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
  });

  it('ExclusiveLock lets nested calls through and keeps others out until the holder ends', async () => {
    const lock = new ExclusiveLock();
    const log: string[] = [];
    const outer = lock.run(async () => {
      log.push('outer+');
      await tick();
      const inner = await lock.run(async () => {
        log.push('inner');
        return 1;
      });
      await tick();
      log.push('outer-');
      return inner;
    });
    const other = lock.run(async () => {
      log.push('other');
      return 2;
    });
    expect(await Promise.all([outer, other])).toEqual([1, 2]);
    expect(log).toEqual(['outer+', 'inner', 'outer-', 'other']);
  });

  it('a callback scheduled by a holder that runs after the holder ended queues like anyone', async () => {
    const lock = new ExclusiveLock();
    let late: Promise<string> | undefined;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    await lock.run(async () => {
      late = new Promise<string>((resolve) => setTimeout(() => resolve(lock.run(async () => 'late')), 5));
    });
    const blocker = lock.run(async () => {
      await gate;
      return 'blocker';
    });
    const order: string[] = [];
    void late!.then((v) => order.push(v));
    void blocker.then((v) => order.push(v));
    await new Promise((r) => setTimeout(r, 20));
    expect(order).toEqual([]); // 'late' waits for the blocker
    release();
    await Promise.all([late, blocker]);
    expect(order).toEqual(['blocker', 'late']);
  });
});
