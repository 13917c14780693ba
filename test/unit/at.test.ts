/**
 * The AT codec (3GPP TS 27.007 +CSIM / +CCHO / +CGLA / +CCHC, +CME ERROR codes of clause 9.2)
 * against modem transcripts of the kind real modules produce: echo left on, RING and +CREG
 * unsolicited lines in the middle of an answer, stale answers, noise bytes, truncated hex.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SealError } from '../../src/core/errors.js';
import {
  AtLineReader,
  AtResponseCollector,
  MAX_AT_LINE,
  ccho,
  cchc,
  cgla,
  cmeError,
  csim,
  identityText,
  parseCchoResponse,
  parseSimResponse,
  type AtOutcome,
} from '../../src/backends/pcsc/at.js';

const h = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

/** Feeds a raw transcript (as the modem sent it) for `command` through reader and collector. */
function run(command: string, raw: string | Buffer, chunks = 1): AtOutcome {
  const reader = new AtLineReader();
  const c = new AtResponseCollector(command);
  const bytes = typeof raw === 'string' ? Buffer.from(raw, 'latin1') : raw;
  const size = Math.ceil(bytes.length / chunks) || 1;
  let out: AtOutcome = { done: false };
  for (let i = 0; i < bytes.length; i += size) {
    for (const line of reader.push(bytes.subarray(i, i + size))) out = c.push(line);
  }
  return out;
}

function okLines(o: AtOutcome): string[] {
  if (!o.done || !o.ok) throw new Error(`not OK: ${JSON.stringify(o)}`);
  return o.lines;
}

function failure(o: AtOutcome): SealError {
  if (!o.done || o.ok) throw new Error(`not a failure: ${JSON.stringify(o)}`);
  return o.error;
}

describe('command builders', () => {
  it('AT+CSIM carries twice the APDU length and upper-case hex', () => {
    expect(csim(h('00A4040007A0000005590010'))).toBe('AT+CSIM=24,"00A4040007A0000005590010"');
    expect(csim(h('0070000001'))).toBe('AT+CSIM=10,"0070000001"');
  });
  it('AT+CCHO / AT+CGLA / AT+CCHC', () => {
    expect(ccho(h('A0000005590010'))).toBe('AT+CCHO="A0000005590010"');
    expect(cgla(1, h('8184000020'))).toBe('AT+CGLA=1,10,"8184000020"');
    expect(cchc(2)).toBe('AT+CCHC=2');
    expect(() => cgla(-1, h('00'))).toThrow(SealError);
  });
});

describe('responses from modem transcripts', () => {
  it('echo left on: the echoed command is skipped', () => {
    const o = run('AT+CSIM=10,"0070000001"', 'AT+CSIM=10,"0070000001"\r\r\n+CSIM: 6,"019000"\r\n\r\nOK\r\n');
    expect(parseSimResponse(okLines(o))).toEqual(h('019000'));
  });

  it('RING and +CREG lines interleaved with the answer', () => {
    const o = run('AT+CSIM=10,"0084000008"', '\r\nRING\r\n\r\n+CREG: 1\r\n\r\n+CSIM: 20,"01020304050607089000"\r\n\r\n+CREG: 1,"00C3","0001A2B3",7\r\n\r\nOK\r\n');
    expect(parseSimResponse(okLines(o))).toEqual(h('01020304050607089000'));
  });

  it('the same transcript split into arbitrary chunks gives the same answer', () => {
    const raw = 'AT+CSIM=10,"0084000008"\r\r\nRING\r\n+CSIM: 20,"01020304050607089000"\r\n\r\nOK\r\n';
    fc.assert(
      fc.property(fc.integer({ min: 1, max: raw.length }), (chunks) => {
        expect(parseSimResponse(okLines(run('AT+CSIM=10,"0084000008"', raw, chunks)))).toEqual(h('01020304050607089000'));
      }),
      { numRuns: 100 },
    );
  });

  it('a stale +CSIM answer before the real one: the last one counts', () => {
    const o = run('AT+CSIM=10,"0070000001"', '+CSIM: 4,"6A82"\r\n+CSIM: 6,"019000"\r\nOK\r\n');
    expect(parseSimResponse(okLines(o))).toEqual(h('019000'));
  });

  it('a +CSIM line is not taken as the answer to +CGLA', () => {
    const o = run('AT+CGLA=1,10,"0184000008"', '+CSIM: 4,"9000"\r\nOK\r\n');
    expect(() => parseSimResponse(okLines(o), '+CGLA')).toThrow(expect.objectContaining({ code: 'DEVICE_ERROR' }));
    const o2 = run('AT+CGLA=1,10,"0184000008"', '+CGLA: 8,"A1B29000"\r\nOK\r\n');
    expect(parseSimResponse(okLines(o2), '+CGLA')).toEqual(h('A1B29000'));
  });

  it('quotes left out by some modems', () => {
    expect(parseSimResponse(['+CSIM: 4,9000'])).toEqual(h('9000'));
  });

  it('noise bytes and garbage lines around the answer', () => {
    const raw = Buffer.concat([Buffer.from([0x00, 0xff, 0xfe, 0x0d, 0x0a]), Buffer.from('\x00\x00OK?garbage\xfe\r\n+CSIM: 4,"9000"\r\n\x00OK\r\n', 'latin1')]);
    expect(parseSimResponse(okLines(run('AT+CSIM=10,"00A4040000"', raw)))).toEqual(h('9000'));
  });

  it('truncated hex, odd length, no status word, non-hex → DEVICE_ERROR', () => {
    for (const line of ['+CSIM: 8,"9000"', '+CSIM: 5,"90001"', '+CSIM: 2,"90"', '+CSIM: 4,"90ZZ"', '+CSIM: ,"9000"', '+CSIM: 4,"9000', '+CSIM: 6,"9000"']) {
      expect(() => parseSimResponse([line]), line).toThrow(expect.objectContaining({ code: 'DEVICE_ERROR' }));
    }
    expect(() => parseSimResponse([])).toThrow(expect.objectContaining({ code: 'DEVICE_ERROR' }));
  });

  it('ERROR and NO CARRIER → DEVICE_ERROR', () => {
    expect(failure(run('AT+CSIM=10,"00A4040000"', '\r\nERROR\r\n')).code).toBe('DEVICE_ERROR');
    expect(failure(run('AT+CSIM=10,"00A4040000"', 'NO CARRIER\r\n')).code).toBe('DEVICE_ERROR');
  });

  it('no final result code yet: not done', () => {
    expect(run('AT+CSIM=10,"00A4040000"', '+CSIM: 4,"9000"\r\n').done).toBe(false);
    expect(run('AT+CSIM=10,"00A4040000"', '+CSIM: 4,"9000"\r\nO').done).toBe(false);
  });

  it('+CCHO: <id> or a bare <id>', () => {
    expect(parseCchoResponse(okLines(run('AT+CCHO="A0000005590010"', '\r\n+CCHO: 2\r\n\r\nOK\r\n')))).toBe(2);
    expect(parseCchoResponse(okLines(run('AT+CCHO="A0000005590010"', 'AT+CCHO="A0000005590010"\r\r\n1\r\n\r\nOK\r\n')))).toBe(1);
    expect(parseCchoResponse(okLines(run('AT+CCHO="A0000005590010"', 'RING\r\n+CREG: 1\r\n3\r\nOK\r\n')))).toBe(3);
    expect(() => parseCchoResponse(okLines(run('AT+CCHO="A0000005590010"', 'OK\r\n')))).toThrow(expect.objectContaining({ code: 'DEVICE_ERROR' }));
  });

  it('identification text (ATI, +CGMI) without echo or unsolicited lines', () => {
    const lines = okLines(run('ATI', 'ATI\r\r\nQuectel\r\nEC25\r\n+CREG: 1\r\nRevision: EC25EFAR06A06M4G\r\n\r\nOK\r\n'));
    expect(identityText(lines)).toBe('Quectel EC25 Revision: EC25EFAR06A06M4G');
    expect(identityText(okLines(run('AT+CGMI', '+CGMI: "u-blox"\r\nOK\r\n')))).toBe('u-blox');
  });
});

describe('+CME ERROR (27.007 9.2.1)', () => {
  const cases: Array<[string, string, string]> = [
    ['+CME ERROR: 10', 'DEVICE_UNAVAILABLE', 'CME_10'],
    ['+CME ERROR: 3', 'NOT_SUPPORTED', 'CME_3'],
    ['+CME ERROR: 4', 'NOT_SUPPORTED', 'CME_4'],
    ['+CME ERROR: 13', 'DEVICE_UNAVAILABLE', 'CME_13'],
    ['+CME ERROR: 100', 'DEVICE_ERROR', 'CME_100'],
    ['+CME ERROR: 777', 'DEVICE_ERROR', 'CME_777'],
    ['+CME ERROR: SIM not inserted', 'DEVICE_UNAVAILABLE', 'CME_10'],
    ['+CME ERROR: operation not allowed', 'NOT_SUPPORTED', 'CME_3'],
    ['+CME ERROR: Operation not supported', 'NOT_SUPPORTED', 'CME_4'],
    ['+CME ERROR: something odd', 'DEVICE_ERROR', 'CME_TEXT'],
  ];
  for (const [line, code, backend] of cases) {
    it(`${line} → ${code} (${backend})`, () => {
      const e = failure(run('AT+CSIM=10,"00A4040000"', `AT+CSIM=10,"00A4040000"\r\r\n${line}\r\n`));
      expect(e).toBeInstanceOf(SealError);
      expect(e.code).toBe(code);
      expect(e.backendCode).toBe(backend);
    });
  }
  it('the text of an unknown error is cleaned and bounded', () => {
    const e = cmeError(`+CME ERROR: ${'\x01x'.repeat(200)}`);
    expect(e.message.length).toBeLessThan(160);
    expect(e.message).not.toMatch(/[\x00-\x1f]/);
  });
});

describe('AtLineReader', () => {
  it('CR, LF and CRLF all end lines; empty lines vanish; control bytes are dropped', () => {
    const r = new AtLineReader();
    expect(r.push('a\rb\nc\r\n\r\n\x00d\x07\r')).toEqual(['a', 'b', 'c', 'd']);
  });
  it('keeps a partial line until its end arrives', () => {
    const r = new AtLineReader();
    expect(r.push('+CSIM: 4,"90')).toEqual([]);
    expect(r.push('00"\r\nO')).toEqual(['+CSIM: 4,"9000"']);
    expect(r.push('K\r\n')).toEqual(['OK']);
  });
  it('an endless line is DEVICE_ERROR, and the reader recovers at the next line', () => {
    const r = new AtLineReader();
    expect(() => r.push('A'.repeat(MAX_AT_LINE + 10))).toThrow(expect.objectContaining({ code: 'DEVICE_ERROR' }));
    // 'tail' ends the overlong line: it is dropped with it, and reading resumes at the next line
    expect(r.push('tail\r\nOK\r\n')).toEqual(['OK']);
  });
});

describe('robustness', () => {
  it('random modem output never throws anything but SealError, and the outcome is consistent', () => {
    const lineArb = fc.oneof(
      fc.string({ maxLength: 40 }),
      fc.constantFrom('OK', 'ERROR', 'RING', '+CREG: 1', '+CME ERROR: 10', '+CSIM: 4,"9000"', '+CSIM: 3,"900"', '+CSIM: 99999999,"00"', '+CCHO: 1', '7', 'AT+CSIM=4,"0000"'),
      fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a).toString('latin1')),
    );
    fc.assert(
      fc.property(fc.array(lineArb, { maxLength: 12 }), fc.constantFrom('\r\n', '\r', '\n'), (lines, eol) => {
        const raw = lines.join(eol) + eol;
        let o: AtOutcome = { done: false };
        try {
          o = run('AT+CSIM=10,"00A4040000"', raw);
          if (o.done && o.ok) {
            const resp = parseSimResponse(o.lines);
            expect(resp.length).toBeGreaterThanOrEqual(2);
          }
          if (o.done && !o.ok) expect(o.error).toBeInstanceOf(SealError);
          const c = run('AT+CCHO="A000000559"', raw);
          if (c.done && c.ok) expect(Number.isInteger(parseCchoResponse(c.lines))).toBe(true);
        } catch (e) {
          expect(e).toBeInstanceOf(SealError);
        }
      }),
      { numRuns: 300 },
    );
  });

  it('random bytes through the line reader: lines only, or SealError', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 10 }), (chunks) => {
        const r = new AtLineReader();
        for (const c of chunks) {
          const lines = r.push(Buffer.from(c));
          for (const l of lines) {
            expect(l.length).toBeGreaterThan(0);
            expect(l).not.toMatch(/[\r\n\x00]/);
          }
        }
      }),
      { numRuns: 300 },
    );
  });
});
