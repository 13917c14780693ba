/**
 * The two APDU transports against real components: pcscd with vpcd and the project's virtual PIV
 * card and IoT SAFE SIM, and the virtual modem on a pty pair (AT+CSIM / AT+CCHO / AT+CGLA) with
 * the same IoT SAFE SIM behind it. Nothing of the hardware layer is mocked; the card host is
 * driven through test/helpers/cards.ts (removal, insertion, modem modes and quirks).
 *
 * Expected values come from the specifications (SP 800-73-4 application property template, ISO
 * 7816-4 status words, IoT SAFE GET RANDOM length) and from outside tools: OpenSC's opensc-tool
 * for the ATR and yubico-piv-tool for the attestation certificate read through 61xx chaining.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { requireEnv } from '../helpers/env.js';
import { insertCard, removeCard, setIotSafeQuirks, setModemMode, setModemQuirks } from '../helpers/cards.js';
import { SealError } from '../../src/core/errors.js';
import { commandApdu, expectOk } from '../../src/backends/pcsc/apdu.js';
import { findTag, parseBerTlv, requireTag } from '../../src/backends/pcsc/tlv.js';
import { openPcscTransport, type PcscTransport } from '../../src/backends/pcsc/pcsc-transport.js';
import { openModemTransport, type ModemTransport } from '../../src/backends/pcsc/modem-transport.js';
import type { ApduTransport, CardChannel } from '../../src/backends/pcsc/transport.js';
import { MODEM_MODEL } from '../sim/modem/virtual-modem.js';

const PIV_AID = Buffer.from('A000000308', 'hex');
const IOTSAFE_AID = Buffer.from('A0000005590010', 'hex');
const MODEM_TIMEOUT_MS = 1500;
const NO_QUIRKS = { echo: false, staleLines: false, getResponse: false, cmeOnSelect: false, cchoBare: false };

const pivReader = (): string => requireEnv('SEAL_PIV_READER');
const iotsafeReader = (): string => requireEnv('SEAL_IOTSAFE_READER');
const modemPort = (): string => requireEnv('SEAL_MODEM_PORT');

async function rejection(p: Promise<unknown>): Promise<SealError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(SealError);
    return e as SealError;
  }
  throw new Error('expected a SealError');
}

/** GET DATA of a PIV object (`00 CB 3F FF 5C 03 <tag> 00`), the 53 wrapper's content. */
async function getData(ch: CardChannel | ApduTransport, tag: number): Promise<Buffer> {
  const tagBytes = Buffer.from([tag >> 16, (tag >> 8) & 0xff, tag & 0xff]);
  const r = await ch.transmit(commandApdu(0x00, 0xcb, 0x3f, 0xff, Buffer.concat([Buffer.from([0x5c, 0x03]), tagBytes]), 256));
  return requireTag(parseBerTlv(expectOk(r, 'GET DATA')), 0x53, 'the data object');
}

/** IoT SAFE GET RANDOM (`<cla> 84 00 00 <n>`) with the proprietary class 0x80 on the channel. */
async function getRandom(ch: CardChannel, n: number): Promise<Buffer> {
  return expectOk(await ch.transmit(commandApdu(0x80, 0x84, 0x00, 0x00, undefined, n)), 'GET RANDOM');
}

describe('PC/SC transport', () => {
  let piv: PcscTransport;

  beforeAll(async () => {
    piv = await openPcscTransport({ reader: pivReader(), timeoutMs: 5000 });
  });
  afterAll(async () => {
    await piv?.close();
  });

  it('reports the reader and the ATR that OpenSC reads', () => {
    expect(piv.info.kind).toBe('pcsc');
    expect(piv.info.name).toContain(pivReader());
    const list = spawnSync('opensc-tool', ['--list-readers'], { encoding: 'utf8' });
    const line = list.stdout.split('\n').find((l) => l.includes(piv.info.name));
    expect(line).toBeDefined();
    const index = line!.trim().split(/\s+/)[0]!;
    const atr = spawnSync('opensc-tool', ['--reader', index, '--atr'], { encoding: 'utf8' });
    expect(atr.status).toBe(0);
    expect(atr.stdout.replace(/[^0-9a-fA-F]/g, '').toUpperCase()).toBe(piv.info.atr);
  });

  it('SELECT of the PIV AID answers 9000 with the application property template (tag 61)', async () => {
    const { channel, response } = await piv.select(PIV_AID);
    expect(channel.number).toBe(0);
    expect(response.sw).toBe(0x9000);
    const [apt] = parseBerTlv(response.data);
    expect(apt!.tag).toBe(0x61);
    // SP 800-73-4 Part 2, Table 3: the APT carries the AID (4F) and the authority (79)
    expect(findTag(parseBerTlv(apt!.value), 0x4f)).toBeDefined();
  });

  it('SELECT of an absent applet is OBJECT_NOT_FOUND with SW_6A82', async () => {
    const e = await rejection(piv.select(Buffer.from('A0000000FFFFFF', 'hex')));
    expect(e.code).toBe('OBJECT_NOT_FOUND');
    expect(e.backendCode).toBe('SW_6A82');
  });

  it('a response longer than 256 bytes arrives whole: the attestation certificate, as yubico-piv-tool reads it', async () => {
    const { channel } = await piv.select(PIV_AID);
    const container = await getData(channel, 0x5fff01);
    const der = requireTag(parseBerTlv(container), 0x70, 'the certificate');
    expect(der.length).toBeGreaterThan(256);
    const cert = new X509Certificate(der);
    const tool = spawnSync('yubico-piv-tool', ['--reader', piv.info.name, '--action', 'read-certificate', '--slot', 'f9', '--key-format', 'DER'], { maxBuffer: 1 << 20 });
    expect(tool.status, tool.stderr?.toString()).toBe(0);
    expect(Buffer.compare(tool.stdout, cert.raw)).toBe(0);
  });

  it('extended-length APDUs pass when the ATR announces them (YubiKey-style card, T=1)', async () => {
    expect(piv.extendedLength).toBe(true);
    const { channel } = await piv.select(PIV_AID);
    // case 4E GET DATA: the whole object in one response, the same bytes as through 61xx
    const r = await channel.transmit(commandApdu(0x00, 0xcb, 0x3f, 0xff, Buffer.from('5C035FFF01', 'hex'), 65536));
    expect(r.sw).toBe(0x9000);
    expect(r.data.length).toBeGreaterThan(256);
    const viaGetResponse = await channel.transmit(commandApdu(0x00, 0xcb, 0x3f, 0xff, Buffer.from('5C035FFF01', 'hex'), 256));
    expect(r.data).toEqual(viaGetResponse.data);
    // case 3E with 300 bytes of data reaches the card, which judges the length itself (6700)
    const v = await channel.transmit(commandApdu(0x00, 0x20, 0x00, 0x80, Buffer.alloc(300, 0x31)));
    expect(v.sw).toBe(0x6700);
  });

  it('exclusive() serialises callers and nests without deadlock', async () => {
    const { channel } = await piv.select(PIV_AID);
    const order: string[] = [];
    const a = piv.exclusive(async () => {
      order.push('a+');
      await piv.exclusive(async () => getData(channel, 0x5fc107)); // CCC, written at card creation
      await new Promise((r) => setTimeout(r, 20));
      order.push('a-');
    });
    const b = piv.exclusive(async () => {
      order.push('b');
    });
    await Promise.all([a, b]);
    expect(order).toEqual(['a+', 'a-', 'b']);
  });

  it('removal mid-session gives DEVICE_UNAVAILABLE; after insertion the next call works on a new generation', async () => {
    const { channel } = await piv.select(PIV_AID);
    const before = piv.generation;
    await removeCard('piv');
    try {
      const e = await rejection(channel.transmit(commandApdu(0x00, 0xcb, 0x3f, 0xff, Buffer.from('5C035FC107', 'hex'), 256)));
      expect(e.code).toBe('DEVICE_UNAVAILABLE');
      const again = await rejection(piv.transmit(commandApdu(0x00, 0xa4, 0x04, 0x00, PIV_AID, 256)));
      expect(again.code).toBe('DEVICE_UNAVAILABLE');
    } finally {
      await insertCard('piv');
    }
    await piv.waitForCard(10_000);
    const { response } = await piv.select(PIV_AID);
    expect(response.sw).toBe(0x9000);
    expect(piv.generation).toBeGreaterThan(before);
    // a channel from before the removal must not talk to the new session
    expect((await rejection(channel.transmit(commandApdu(0x00, 0xcb, 0x3f, 0xff, Buffer.from('5C035FC107', 'hex'), 256)))).code).toBe('SESSION_LOST');
  });

  it('IoT SAFE on a logical channel: SELECT and GET RANDOM of the requested length', async () => {
    const t = await openPcscTransport({ reader: iotsafeReader() });
    try {
      const { channel, response } = await t.select(IOTSAFE_AID, { logical: true });
      expect(response.sw).toBe(0x9000);
      expect(channel.number).toBeGreaterThanOrEqual(1);
      expect(channel.number).toBeLessThanOrEqual(19);
      const a = await getRandom(channel, 32);
      const b = await getRandom(channel, 200);
      expect(a.length).toBe(32);
      expect(b.length).toBe(200);
      expect(a.equals(b.subarray(0, 32))).toBe(false);
      await channel.close();
      expect((await rejection(channel.transmit(commandApdu(0x80, 0x84, 0x00, 0x00, undefined, 8)))).code).toBe('CLOSED');
    } finally {
      await t.close();
    }
  });

  it('IoT SAFE applet answering T=0 style (61xx, 6Cxx for a wrong Le): complete answers all the same', async () => {
    await setIotSafeQuirks({ getResponse: true, t0WrongLe: true });
    const t = await openPcscTransport({ reader: iotsafeReader() });
    try {
      const { channel } = await t.select(IOTSAFE_AID, { logical: true });
      expect((await getRandom(channel, 100)).length).toBe(100);
      // application information with Le 00 (256): the applet asks for the exact Le with 6Cxx
      const info = expectOk(await channel.transmit(commandApdu(0x80, 0xcb, 0x00, 0x00, undefined, 256)), 'GET DATA (application info)');
      expect(findTag(parseBerTlv(info), 0x10)).toBeDefined(); // tag 10: applet version
      await channel.close();
    } finally {
      await t.close();
      await setIotSafeQuirks({ getResponse: false, t0WrongLe: false });
    }
  });

  it('a named reader that does not exist lists the readers present', async () => {
    const e = await rejection(openPcscTransport({ reader: 'No Such Reader 99', timeoutMs: 2000 }));
    expect(e.code).toBe('DEVICE_UNAVAILABLE');
    expect(e.message).toContain(pivReader());
  });
});

describe('modem transport (AT+CSIM / AT+CCHO / AT+CGLA)', () => {
  let modem: ModemTransport;

  beforeAll(async () => {
    await setModemMode('normal');
    await setModemQuirks(NO_QUIRKS);
    modem = await openModemTransport({ port: modemPort(), timeoutMs: MODEM_TIMEOUT_MS });
  });
  afterEach(async () => {
    await setModemMode('normal');
    await setModemQuirks(NO_QUIRKS);
    await insertCard('modem-sim');
  });
  afterAll(async () => {
    await modem?.close();
  });

  it('probes the modem: identity text and logical channel support', () => {
    expect(modem.info).toEqual({ kind: 'at', name: modemPort() });
    expect(modem.identity).toContain(MODEM_MODEL); // what the virtual modem answers to AT+CGMM / ATI
    expect(modem.usesCcho).toBe(true);
  });

  it('IoT SAFE select on a logical channel and GET RANDOM of the requested length', async () => {
    const { channel, response } = await modem.select(IOTSAFE_AID, { logical: true });
    expect(response.sw).toBe(0x9000);
    try {
      expect((await getRandom(channel, 16)).length).toBe(16);
      expect((await getRandom(channel, 255)).length).toBe(255);
    } finally {
      await channel.close();
    }
  });

  it('SELECT of an absent applet is OBJECT_NOT_FOUND, through AT+CCHO and through AT+CSIM', async () => {
    const viaCcho = await rejection(modem.select(Buffer.from('A0000000FFFFFF', 'hex'), { logical: true }));
    expect(viaCcho.code).toBe('OBJECT_NOT_FOUND');
    const viaCsim = await rejection(modem.select(Buffer.from('A0000000FFFFFF', 'hex')));
    expect(viaCsim.code).toBe('OBJECT_NOT_FOUND');
    expect(viaCsim.backendCode).toBe('SW_6A82');
  });

  it('with echo, stale unsolicited lines and 61xx handed to the host, everything still works', async () => {
    await setModemQuirks({ echo: true, staleLines: true, getResponse: true });
    const { channel } = await modem.select(IOTSAFE_AID, { logical: true });
    try {
      expect((await getRandom(channel, 64)).length).toBe(64);
      expect((await getRandom(channel, 8)).length).toBe(8);
    } finally {
      await channel.close();
    }
    // the basic channel through AT+CSIM as well
    const basic = await modem.select(IOTSAFE_AID);
    expect(basic.response.sw).toBe(0x9000);
    expect((await getRandom(basic.channel, 40)).length).toBe(40);
  });

  it('a modem that refuses SELECT through AT+CSIM: NOT_SUPPORTED there, AT+CCHO still works', async () => {
    await setModemQuirks({ cmeOnSelect: true });
    const e = await rejection(modem.select(IOTSAFE_AID));
    expect(e.code).toBe('NOT_SUPPORTED');
    expect(e.backendCode).toBe('CME_3');
    const { channel } = await modem.select(IOTSAFE_AID, { logical: true });
    try {
      expect((await getRandom(channel, 20)).length).toBe(20);
    } finally {
      await channel.close();
    }
  });

  it('a modem answering AT+CCHO with the bare session id', async () => {
    await setModemQuirks({ cchoBare: true });
    const { channel } = await modem.select(IOTSAFE_AID, { logical: true });
    try {
      expect((await getRandom(channel, 12)).length).toBe(12);
    } finally {
      await channel.close();
    }
  });

  it('SIM removed: DEVICE_UNAVAILABLE (+CME ERROR 10); SIM back: the next select works on a new generation', async () => {
    const { channel } = await modem.select(IOTSAFE_AID, { logical: true });
    const before = modem.generation;
    await removeCard('modem-sim');
    const e = await rejection(getRandom(channel, 8));
    expect(e.code).toBe('DEVICE_UNAVAILABLE');
    expect(e.backendCode).toBe('CME_10');
    await insertCard('modem-sim');
    const again = await modem.select(IOTSAFE_AID, { logical: true });
    expect(modem.generation).toBeGreaterThan(before);
    expect((await getRandom(again.channel, 8)).length).toBe(8);
    expect((await rejection(getRandom(channel, 8))).code).toBe('SESSION_LOST');
    await again.channel.close();
    await channel.close();
  });

  it('a silent modem gives TIMEOUT within the configured timeout; the next command after it works', async () => {
    const { channel } = await modem.select(IOTSAFE_AID, { logical: true });
    await setModemMode('silent');
    const started = Date.now();
    const e = await rejection(getRandom(channel, 8));
    const elapsed = Date.now() - started;
    expect(e.code).toBe('TIMEOUT');
    expect(elapsed).toBeGreaterThanOrEqual(MODEM_TIMEOUT_MS - 50);
    expect(elapsed).toBeLessThan(MODEM_TIMEOUT_MS + 3000);
    await setModemMode('normal');
    expect((await getRandom(channel, 8)).length).toBe(8);
    await channel.close();
  });

  it('a modem answering ERROR gives DEVICE_ERROR', async () => {
    await setModemMode('error');
    const e = await rejection(modem.transmit(commandApdu(0x00, 0xa4, 0x04, 0x00, IOTSAFE_AID, 256)));
    expect(e.code).toBe('DEVICE_ERROR');
  });

  it('opening a silent modem fails with TIMEOUT', async () => {
    await modem.close();
    await setModemMode('silent');
    const e = await rejection(openModemTransport({ port: modemPort(), timeoutMs: 800 }));
    expect(e.code).toBe('TIMEOUT');
    await setModemMode('normal');
    modem = await openModemTransport({ port: modemPort(), timeoutMs: MODEM_TIMEOUT_MS });
    expect((await modem.select(IOTSAFE_AID)).response.sw).toBe(0x9000);
  });

  it('a port that does not exist is DEVICE_UNAVAILABLE', async () => {
    const e = await rejection(openModemTransport({ port: '/tmp/seal-no-such-tty', timeoutMs: 500 }));
    expect(e.code).toBe('DEVICE_UNAVAILABLE');
  });
});
