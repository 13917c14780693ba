/**
 * The test simulators' virtual modem (test/sim/modem/virtual-modem.ts): its pure AT line reader
 * and parser, and the modem answering 3GPP TS 27.007 commands in-process (no pty) with the
 * virtual IoT SAFE applet as its SIM. Expected answers come from TS 27.007 (+CSIM/+CCHO/+CGLA
 * formats, CME error numbers), ISO 7816-4 (61xx / GET RESPONSE) and node:crypto (signatures,
 * ECDH), never from the code under test.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { openVirtualIotSafe, type VirtualIotSafe } from '../sim/cards/iotsafe-applet.js';
import { AtLineReader, parseAtLine, VirtualModem } from '../sim/modem/virtual-modem.js';

const AID = 'A0000005590010';

describe('AtLineReader', () => {
  it('ends lines at \\r, \\r\\n (even split across chunks) and a lone \\n', () => {
    const r = new AtLineReader();
    expect(r.push('AT\rATI')).toEqual([{ line: 'AT', terminator: '\r', overflow: false }]);
    expect(r.push('\r')).toEqual([{ line: 'ATI', terminator: '\r', overflow: false }]);
    // the \n of a \r\n arriving later is only echoed, it is not an empty command line
    expect(r.push('\nAT+CGMI\n')).toEqual([
      { line: '', terminator: '\n', overflow: false },
      { line: 'AT+CGMI', terminator: '\n', overflow: false },
    ]);
  });

  it('flags a line longer than the limit', () => {
    const r = new AtLineReader(8);
    expect(r.push('AT+CSIM=1234\rAT\r')).toEqual([
      { line: 'AT+CSIM=', terminator: '\r', overflow: true },
      { line: 'AT', terminator: '\r', overflow: false },
    ]);
  });
});

describe('parseAtLine', () => {
  it.each<[string, ReturnType<typeof parseAtLine>]>([
    ['AT', []],
    ['at', []],
    ['ATE0', [{ kind: 'basic', name: 'E', value: '0' }]],
    [
      'ATE0V1',
      [
        { kind: 'basic', name: 'E', value: '0' },
        { kind: 'basic', name: 'V', value: '1' },
      ],
    ],
    ['AT&F', [{ kind: 'basic', name: '&F', value: '' }]],
    ['AT+CMEE?', [{ kind: 'extended', name: '+CMEE', form: 'read', args: [] }]],
    ['AT+CSIM=?', [{ kind: 'extended', name: '+CSIM', form: 'test', args: [] }]],
    ['AT+CGMI', [{ kind: 'extended', name: '+CGMI', form: 'exec', args: [] }]],
    [
      'at+csim=10,"0070000001"',
      [
        {
          kind: 'extended',
          name: '+CSIM',
          form: 'set',
          args: [
            { text: '10', quoted: false },
            { text: '0070000001', quoted: true },
          ],
        },
      ],
    ],
    // wolfSSL's IoT SAFE port writes a space after '='
    [
      'AT+CSIM= 10,"0070000001"',
      [
        {
          kind: 'extended',
          name: '+CSIM',
          form: 'set',
          args: [
            { text: '10', quoted: false },
            { text: '0070000001', quoted: true },
          ],
        },
      ],
    ],
    [
      'AT+CMEE=1;+CGMM',
      [
        { kind: 'extended', name: '+CMEE', form: 'set', args: [{ text: '1', quoted: false }] },
        { kind: 'extended', name: '+CGMM', form: 'exec', args: [] },
      ],
    ],
    ['AT+CCHO="A0;00"', [{ kind: 'extended', name: '+CCHO', form: 'set', args: [{ text: 'A0;00', quoted: true }] }]],
    ['AT+CSIM=10,"0070', 'syntax'],
    ['AT+CSIM=1"0"', 'syntax'],
    ['AT+CSIM!', 'syntax'],
    ['HELLO', null],
    ['', null],
  ])('%j', (line, expected) => {
    expect(parseAtLine(line)).toEqual(expected);
  });
});

describe('VirtualModem with the virtual IoT SAFE applet as SIM', () => {
  const dirs: string[] = [];
  let applet: VirtualIotSafe;
  let modem: VirtualModem;
  let written = '';

  beforeEach(() => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'seal-vmodem-'));
    dirs.push(dir);
    applet = openVirtualIotSafe(path.join(dir, 'iotsafe'));
    written = '';
    modem = new VirtualModem(applet.frontEnd('modem', { t0: true }), (t) => {
      written += t;
    });
  });

  afterAll(() => {
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  /** Everything the modem writes for `input`. */
  async function send(input: string): Promise<string> {
    written = '';
    await modem.feed(input);
    return written;
  }

  /** The quoted hex of a `+CSIM:` / `+CGLA:` answer, after checking that its length field matches. */
  async function apdu(cmd: 'CSIM' | 'CGLA', hex: string, session?: number): Promise<string> {
    const prefix = cmd === 'CGLA' ? `AT+CGLA=${session},` : 'AT+CSIM=';
    const out = await send(`${prefix}${hex.length},"${hex}"\r`);
    const m = new RegExp(`\\r\\n\\+${cmd}: (\\d+),"([0-9A-F]*)"\\r\\n\\r\\nOK\\r\\n$`).exec(out);
    expect(m, out).not.toBeNull();
    expect(Number(m![1])).toBe(m![2]!.length);
    return m![2]!;
  }

  async function noEcho(): Promise<void> {
    expect(await send('ATE0\r')).toBe('ATE0\r\r\nOK\r\n'); // the ATE0 line itself is still echoed
  }

  async function openIotSafe(): Promise<number> {
    const out = await send(`AT+CCHO="${AID}"\r`);
    const m = /^\r\n\+CCHO: (\d+)\r\n\r\nOK\r\n$/.exec(out);
    expect(m, out).not.toBeNull();
    return Number(m![1]);
  }

  function publicKeyFromReadPublicKey(hex: string): crypto.KeyObject {
    // 34 45 49 43 86 41 04‖X‖Y 90 00 (IOTSAFE.md, READ PUBLIC KEY)
    expect(hex.slice(0, 12)).toBe('344549438641');
    expect(hex.slice(-4)).toBe('9000');
    const point = Buffer.from(hex.slice(12, -4), 'hex');
    expect(point.length).toBe(65);
    return crypto.createPublicKey({
      key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33).toString('base64url') },
      format: 'jwk',
    });
  }

  it('echoes commands by default and answers in verbose format', async () => {
    expect(await send('AT\r')).toBe('AT\r\r\nOK\r\n');
    await noEcho();
    expect(await send('AT\r')).toBe('\r\nOK\r\n');
    expect(await send('AT\r\n')).toBe('\r\nOK\r\n'); // \r\n is one line end
  });

  it('identifies itself as the virtual modem', async () => {
    await noEcho();
    expect(await send('AT+CGMM\r')).toBe('\r\nseal-bridge virtual modem\r\n\r\nOK\r\n');
    expect(await send('AT+CGMI\r')).toBe('\r\nseal-bridge\r\n\r\nOK\r\n');
    expect(await send('ATI\r')).toContain('seal-bridge virtual modem');
    expect(await send('AT+CSIM=?\r')).toBe('\r\nOK\r\n');
    const clac = await send('AT+CLAC\r');
    for (const c of ['AT+CSIM', 'AT+CCHO', 'AT+CGLA', 'AT+CCHC']) expect(clac).toContain(`\r\n${c}\r\n`);
  });

  it('answers ERROR to unknown commands and ignores noise', async () => {
    await noEcho();
    expect(await send('AT+FOO\r')).toBe('\r\nERROR\r\n');
    expect(await send('hello\r')).toBe('');
  });

  it('validates AT+CSIM and reports CME errors as AT+CMEE asks', async () => {
    await noEcho();
    // TS 27.007 8.17: <length> counts the hex characters of <command>
    expect(await send('AT+CSIM=12,"0070000001"\r')).toBe('\r\n+CME ERROR: 50\r\n');
    expect(await send('AT+CSIM=10,"00700000ZZ"\r')).toBe('\r\n+CME ERROR: 50\r\n');
    expect(await send('AT+CSIM=6,"007000"\r')).toBe('\r\n+CME ERROR: 50\r\n');
    expect(await send('AT+CMEE=2\r')).toBe('\r\nOK\r\n');
    expect(await send('AT+CSIM=12,"0070000001"\r')).toBe('\r\n+CME ERROR: incorrect parameters\r\n');
    expect(await send('AT+CMEE=0\r')).toBe('\r\nOK\r\n');
    expect(await send('AT+CSIM=12,"0070000001"\r')).toBe('\r\nERROR\r\n');
  });

  it('forwards APDUs through AT+CSIM and resolves 61xx itself', async () => {
    await noEcho();
    expect(await apdu('CSIM', '0070000001')).toBe('019000');
    // SELECT on channel 1: a T=0 SIM answers 61xx; the modem fetches the FCI (6F … 84 <AID>)
    const fci = await apdu('CSIM', `01A4040007${AID}00`);
    expect(fci.endsWith('9000')).toBe(true);
    expect(fci).toContain(`8407${AID}`);
    expect(await apdu('CSIM', '00708001')).toBe('9000');
  });

  it('hands 61xx to the host with the getResponse quirk', async () => {
    await noEcho();
    modem.setQuirks({ getResponse: true });
    expect(await apdu('CSIM', '0070000001')).toBe('019000');
    const first = await apdu('CSIM', `01A4040007${AID}`);
    expect(first).toMatch(/^61[0-9A-F]{2}$/);
    const rest = await apdu('CSIM', `01C00000${first.slice(2)}`);
    expect(rest).toContain(`8407${AID}`);
    expect(rest.endsWith('9000')).toBe(true);
  });

  it('signs through AT+CCHO / AT+CGLA; node:crypto verifies the signature over the message', async () => {
    await noEcho();
    const session = await openIotSafe();
    const message = Buffer.from('virtual modem, real signature');
    const hash = crypto.createHash('sha256').update(message).digest('hex').toUpperCase();
    // COMPUTE SIGNATURE INIT: key 02, mode 03 (pad and sign), SHA-256, ECDSA
    expect(await apdu('CGLA', '812A00010D840102A1010391020001920104', session)).toBe('9000');
    const sig = await apdu('CGLA', `812B8001229E20${hash}00`, session);
    expect(sig.slice(0, 4)).toBe('3340'); // raw r‖s, one-byte length
    expect(sig.slice(-4)).toBe('9000');
    const key = publicKeyFromReadPublicKey(await apdu('CGLA', '81CD00000385010200', session));
    const raw = Buffer.from(sig.slice(4, -4), 'hex');
    expect(crypto.verify('sha256', message, { key, dsaEncoding: 'ieee-p1363' }, raw)).toBe(true);
    expect(crypto.verify('sha256', Buffer.from('another message'), { key, dsaEncoding: 'ieee-p1363' }, raw)).toBe(false);
    // the applet's own VERIFY: 9000 for this signature, 6D01 for a changed one
    expect(await apdu('CGLA', '812C00020D850102A1010391020001920104', session)).toBe('9000');
    expect(await apdu('CGLA', `812D8002649E20${hash}3340${raw.toString('hex')}`, session)).toBe('9000');
    raw[10]! ^= 0x01;
    expect(await apdu('CGLA', '812C00020D850102A1010391020001920104', session)).toBe('9000');
    expect(await apdu('CGLA', `812D8002649E20${hash}3340${raw.toString('hex')}`, session)).toBe('6D01');
    expect(await send(`AT+CCHC=${session}\r`)).toBe('\r\nOK\r\n');
    expect(await send(`AT+CGLA=${session},10,"81CB000000"\r`)).toBe('\r\n+CME ERROR: 21\r\n');
  });

  it('answers DER signatures with a two-byte tag 33 length when the applet quirks say so', async () => {
    await noEcho();
    applet.setQuirks({ signatureDer: true, tag33Length: 2 });
    const session = await openIotSafe();
    const message = Buffer.from('DER please');
    const hash = crypto.createHash('sha256').update(message).digest('hex');
    expect(await apdu('CGLA', '812A00010D840102A1010391020001920104', session)).toBe('9000');
    const sig = await apdu('CGLA', `812B8001229E20${hash}00`, session);
    expect(sig.slice(0, 2)).toBe('33');
    const len = parseInt(sig.slice(2, 6), 16);
    const der = Buffer.from(sig.slice(6, -4), 'hex');
    expect(der.length).toBe(len);
    const key = publicKeyFromReadPublicKey(await apdu('CGLA', '81CD00000385010200', session));
    expect(crypto.verify('sha256', message, key, der)).toBe(true); // node's default ECDSA encoding is DER
  });

  it('generates a key and agrees a secret that node:crypto computes too', async () => {
    await noEcho();
    const session = await openIotSafe();
    // GENERATE KEY PAIR in private key 01 → 84 01 01 85 01 01 34 45 49 43 86 41 04‖X‖Y
    const gen = await apdu('CGLA', '81B9000003840101', session);
    expect(gen.slice(0, 12)).toBe('840101850101');
    const cardKey = publicKeyFromReadPublicKey(gen.slice(12));
    const peer = crypto.generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const jwk = peer.publicKey.export({ format: 'jwk' });
    const point = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]).toString('hex');
    // COMPUTE DH before a peer key was put: conditions not satisfied
    expect(await apdu('CGLA', '8146000006840101850105', session)).toBe('6985');
    expect(await apdu('CGLA', '8124000203850105', session)).toBe('9000');
    expect(await apdu('CGLA', `81D8800247344549438641${point}`, session)).toBe('9000');
    expect(await apdu('CGLA', '8124010200', session)).toBe('9000');
    const dh = await apdu('CGLA', '8146000006840101850105', session);
    expect(dh.slice(-4)).toBe('9000');
    expect(Buffer.from(dh.slice(0, -4), 'hex')).toEqual(crypto.diffieHellman({ privateKey: peer.privateKey, publicKey: cardKey }));
  });

  it('refuses SELECT through AT+CSIM with cmeOnSelect, while AT+CCHO still works', async () => {
    await noEcho();
    modem.setQuirks({ cmeOnSelect: true });
    expect(await apdu('CSIM', '0070000001')).toBe('019000');
    expect(await send(`AT+CSIM=24,"01A4040007${AID}"\r`)).toBe('\r\n+CME ERROR: 3\r\n');
    await openIotSafe();
  });

  it('answers AT+CCHO with the bare session id with cchoBare', async () => {
    await noEcho();
    modem.setQuirks({ cchoBare: true });
    expect(await send(`AT+CCHO="${AID}"\r`)).toMatch(/^\r\n\d+\r\n\r\nOK\r\n$/);
    expect(await send('AT+CCHO="A000000308"\r')).toBe('\r\n+CME ERROR: 50\r\n'); // no such applet
  });

  it('puts stale unsolicited lines around answers with staleLines', async () => {
    await noEcho();
    modem.setQuirks({ staleLines: true });
    const out = await send('AT+CGMM\r');
    const lines = out.split('\r\n').filter((l) => l !== '');
    expect(lines).toContain('seal-bridge virtual modem');
    expect(lines).toContain('OK');
    expect(lines.length).toBe(4); // one unsolicited line before the answer, one after
    for (const l of [lines[0], lines[3]]) expect(['+CREG: 1', 'RING', '^RSSI: 20']).toContain(l);
  });

  it('keeps echoing after ATE0 with the echo quirk', async () => {
    modem.setQuirks({ echo: true });
    await send('ATE0\r');
    expect(await send('AT\r')).toBe('AT\r\r\nOK\r\n');
  });

  it('answers nothing when silent and ERROR to everything in error mode', async () => {
    modem.mode = 'silent';
    expect(await send('AT\r')).toBe('');
    modem.mode = 'error';
    expect(await send('AT\r')).toBe('AT\r\r\nERROR\r\n');
    modem.mode = 'normal';
    expect(await send('AT\r')).toBe('AT\r\r\nOK\r\n');
  });

  it('reports a removed SIM with CME error 10', async () => {
    await noEcho();
    modem.setSimInserted(false);
    expect(await send('AT+CSIM=10,"0070000001"\r')).toBe('\r\n+CME ERROR: 10\r\n');
    expect(await send('AT+CPIN?\r')).toBe('\r\n+CME ERROR: 10\r\n');
    modem.setSimInserted(true);
    expect(await send('AT+CPIN?\r')).toBe('\r\n+CPIN: READY\r\n\r\nOK\r\n');
  });
});
