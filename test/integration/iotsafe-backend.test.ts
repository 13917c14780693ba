/**
 * The GSMA IoT SAFE driver through both transports against the simulator's virtual applet: a
 * PC/SC reader (`pcsc:`, pcscd + vpcd) and the virtual modem on a pty (`at:`, AT+CSIM / CCHO /
 * CGLA), one applet state behind both. Nothing of the hardware layer is mocked; card removal,
 * modem modes and applet quirks are switched through the card host's control socket.
 *
 * Expected values come from node:crypto (signature checks, ECDH), openssl (signature checks over
 * files) and the certificate the applet carries (parsed by node:crypto), never from the driver.
 * Containers used: `client-key` (regenerated), `ecdh-key` (volatile, regenerated), `device-key`
 * (read only), `peer-key` (written by key agreement).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { X509Certificate, createHash, createPublicKey, diffieHellman, generateKeyPairSync, sign as nodeSign, verify as nodeVerify } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireEnv } from '../helpers/env.js';
import { expectSealError as sealError } from '../helpers/errors.js';
import { insertCard, removeCard, resetCardSimulators, setIotSafeQuirks, setModemMode, setModemQuirks } from '../helpers/cards.js';
import { openEnvironment, SealError, SealUri, type KeyHandle, type SecureEnvironment } from '../../src/index.js';
import { IotSafeApplet, parseObjectList, signatureFrom } from '../../src/backends/pcsc/iotsafe.js';
import { openPcscTransport } from '../../src/backends/pcsc/pcsc-transport.js';
import type { ApduTransport, CardChannel } from '../../src/backends/pcsc/transport.js';

const reader = (): string => requireEnv('SEAL_IOTSAFE_READER');
const port = (): string => requireEnv('SEAL_MODEM_PORT');
const pcscUri = (query = ''): string => `pcsc:reader=${encodeURIComponent(reader())};applet=iotsafe${query ? `?${query}` : ''}`;
const atUri = (query = 'timeout-ms=2000'): string => `at:port=${port()};applet=iotsafe${query ? `?${query}` : ''}`;


const spki = (k: KeyHandle) => createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' });
const data = Buffer.from('seal-bridge IoT SAFE backend test');

function opensslVerify(dir: string, name: string, pem: string, sig: Buffer): string {
  writeFileSync(join(dir, `${name}.data`), data);
  writeFileSync(join(dir, `${name}.sig`), sig);
  writeFileSync(join(dir, `${name}.pem`), pem);
  const r = spawnSync('openssl', ['dgst', '-sha256', '-verify', join(dir, `${name}.pem`), '-signature', join(dir, `${name}.sig`), join(dir, `${name}.data`)], { encoding: 'utf8' });
  return `${r.stdout}${r.stderr}`;
}

describe('pcsc: and at: IoT SAFE backend on the virtual applet', () => {
  let pcsc: SecureEnvironment;
  let work: string;

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), 'seal-iotsafe-'));
    await resetCardSimulators();
    pcsc = await openEnvironment(pcscUri());
  });

  afterEach(async () => {
    await resetCardSimulators();
  });

  afterAll(async () => {
    await pcsc?.close();
    rmSync(work, { recursive: true, force: true });
  });

  it('reports a virtual card honestly; capabilities follow the applet objects', async () => {
    expect(pcsc.info.protectionLevel).toBe(1);
    expect(pcsc.info.protectionReason).toContain('virtual reader (vsmartcard)');
    expect(SealUri.parse(pcsc.uri).get('applet')).toBe('iotsafe');
    const rows = pcsc.capabilities.map((c) => `${c.algorithm}|${c.operation}|${c.result}`);
    expect(rows).toEqual(expect.arrayContaining(['ECDSA P-256|generate|key-inside', 'ECDSA P-256|sign|output', 'ECDH P-256|agree|secret-leaves', 'ECDH P-256|generate|key-inside']));
    expect(pcsc.capabilities.some((c) => c.algorithm.startsWith('RSA') || c.operation === 'decrypt' || c.operation === 'unwrap')).toBe(false);
  });

  it('generates into client-key through PC/SC, signs through PC/SC and through the modem; openssl verifies both against one public key', async () => {
    const key = await pcsc.generateKey({ label: 'client-key', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
    expect(key.provenance.origin).toBe('generated-inside');
    const u = SealUri.parse(key.uri);
    expect(u.get('object')).toBe('client-key');
    expect(u.get('reader')).toBe(reader());
    const viaPcsc = await key.sign(data);
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, viaPcsc)).toBe(true);
    expect(opensslVerify(work, 'pcsc', key.publicKeyPem(), viaPcsc)).toContain('Verified OK');

    const modem = await openEnvironment(atUri());
    try {
      expect(modem.info.protectionLevel).toBe(1);
      expect(modem.info.protectionReason).toContain('virtual modem');
      const same = await modem.getKey('client-key');
      expect(same.publicKey!.equals(key.publicKey!)).toBe(true);
      expect(SealUri.parse(same.uri).get('port')).toBe(port());
      const viaModem = await same.sign(data);
      expect(opensslVerify(work, 'modem', key.publicKeyPem(), viaModem)).toContain('Verified OK');
      const p1363 = await same.sign(data, { format: 'p1363' });
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'ieee-p1363' }, p1363)).toBe(true);
      // re-opened by its URI in the modem environment
      expect((await modem.getKey(same.uri)).publicKey!.equals(key.publicKey!)).toBe(true);
    } finally {
      await modem.close();
    }
  });

  it('sharedSecret equals node:crypto ECDH, through PC/SC and through the modem; an ECDH-only container cannot sign', async () => {
    const ecdh = await pcsc.generateKey({ label: 'ecdh-key', algorithm: { name: 'ECDH', namedCurve: 'P-256' }, usages: ['deriveKey'] });
    const client = await pcsc.getKey('client-key');
    for (const key of [ecdh, client]) {
      const peer = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
      const expected = diffieHellman({ privateKey: peer.privateKey, publicKey: spki(key) });
      expect((await key.sharedSecret(peer.publicKey.export({ type: 'spki', format: 'der' }), 'secret-leaves-module')).equals(expected)).toBe(true);
    }
    await sealError(ecdh.sign(data), 'USAGE_NOT_PERMITTED');
    await sealError(ecdh.agree(Buffer.alloc(65, 4), { algorithm: { name: 'AES', length: 256 }, usages: ['encrypt'] }), 'NOT_SUPPORTED');
    const modem = await openEnvironment(atUri());
    try {
      const viaModem = await modem.getKey('client-key');
      const peer = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
      const expected = diffieHellman({ privateKey: peer.privateKey, publicKey: spki(client) });
      expect((await viaModem.sharedSecret(peer.publicKey.export({ type: 'spki', format: 'der' }), 'secret-leaves-module')).equals(expected)).toBe(true);
    } finally {
      await modem.close();
    }
  });

  it('reads files as data objects: device-cert is the certificate of device-key', async () => {
    const listed = await pcsc.listData();
    expect(listed.map((d) => d.label).sort()).toEqual(['device-cert', 'device-info']);
    const der = await pcsc.readData('device-cert');
    expect(der.length).toBeGreaterThan(256);
    expect(listed.find((d) => d.label === 'device-cert')!.size).toBe(der.length);
    const cert = new X509Certificate(der);
    const deviceKey = await pcsc.getKey('device-key');
    expect(cert.publicKey.export({ type: 'spki', format: 'der' }).equals(deviceKey.publicKey!)).toBe(true);
    // the certificate's own signature was made by device-key: a second check of the key read back
    expect(cert.verify(spki(deviceKey))).toBe(true);
    expect(nodeVerify('sha256', data, { key: spki(deviceKey), dsaEncoding: 'der' }, await deviceKey.sign(data))).toBe(true);
    await sealError(pcsc.readData('no-such-file'), 'OBJECT_NOT_FOUND');
    await sealError(pcsc.writeData('device-info', Buffer.from('x')), 'NOT_SUPPORTED');
    await sealError(pcsc.deleteData('device-info'), 'NOT_SUPPORTED');
  });

  it('works with every applet variant: DER signatures, two-byte tag 33, 61xx, 6Cxx, little-endian file sizes, class byte 0x0N', async () => {
    await setIotSafeQuirks({ signatureDer: true, tag33Length: 2, getResponse: true, t0WrongLe: true, fileSizeLittleEndian: true });
    for (const uri of [pcscUri(), pcscUri('cla=00'), atUri()]) {
      const env = await openEnvironment(uri);
      try {
        const key = await env.getKey('device-key');
        const sig = await key.sign(data);
        expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, sig), uri).toBe(true);
        const cert = new X509Certificate(await env.readData('device-cert'));
        expect(cert.publicKey.export({ type: 'spki', format: 'der' }).equals(key.publicKey!)).toBe(true);
        expect((await env.random(300)).length).toBe(300);
      } finally {
        await env.close();
      }
    }
  });

  it('works behind modem quirks: echo, stale lines, 61xx left to the host, CME on SELECT, bare CCHO answers', async () => {
    await setModemQuirks({ echo: true, staleLines: true, getResponse: true, cmeOnSelect: true, cchoBare: true });
    await setIotSafeQuirks({ getResponse: true });
    const env = await openEnvironment(atUri());
    try {
      const key = await env.getKey('device-key');
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
  });

  it('refuses what IoT SAFE cannot do: new containers, keygen where the container forbids it, other algorithms', async () => {
    await sealError(pcsc.generateKey({ label: 'brand-new', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'NOT_SUPPORTED');
    await sealError(pcsc.generateKey({ label: 'device-key', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'USAGE_NOT_PERMITTED');
    await sealError(pcsc.generateKey({ label: 'ecdh-key', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] }), 'USAGE_NOT_PERMITTED');
    await sealError(pcsc.generateKey({ label: 'client-key', algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['sign'] }), 'NOT_SUPPORTED');
    await sealError(pcsc.importPublicKey({ label: 'x', spki: (await pcsc.getKey('device-key')).publicKey! }), 'NOT_SUPPORTED');
    await sealError((await pcsc.getKey('device-key')).destroy(), 'NOT_SUPPORTED');
    await sealError(openEnvironment(`${pcscUri()}?pin-source=env:X`), 'INVALID_URI');
  });

  it('signatures from PC/SC and the modem at the same time all verify; the applet refuses every extraction route', async () => {
    const modem = await openEnvironment(atUri());
    try {
      const viaPcsc = await pcsc.getKey('device-key');
      const viaModem = await modem.getKey('device-key');
      const messages = Array.from({ length: 12 }, (_, i) => Buffer.from(`message ${i}`));
      const sigs = await Promise.all(messages.map((m, i) => (i % 2 ? viaModem : viaPcsc).sign(m)));
      sigs.forEach((sig, i) => expect(nodeVerify('sha256', messages[i]!, { key: spki(viaPcsc), dsaEncoding: 'der' }, sig), `signature ${i}`).toBe(true));
      const attempts = await pcsc.probeExtraction(viaPcsc);
      expect(attempts.length).toBeGreaterThan(0);
      for (const a of attempts) expect(a.refused, a.route).toBe(true);
    } finally {
      await modem.close();
    }
  });

  it('random bytes from the applet', async () => {
    const a = await pcsc.random(32);
    expect(a.length).toBe(32);
    expect(a.equals(await pcsc.random(32))).toBe(false);
    expect((await pcsc.random(4096)).length).toBe(4096);
  });

  it('a card removed mid-session: DEVICE_UNAVAILABLE, then the next call after insertion works', async () => {
    const key = await pcsc.getKey('device-key');
    await key.sign(data);
    await removeCard('iotsafe');
    try {
      await sealError(key.sign(data), 'DEVICE_UNAVAILABLE');
    } finally {
      await insertCard('iotsafe');
    }
    expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
  });

  it('a SIM gone from the modem: DEVICE_UNAVAILABLE, then the channel is opened again when it is back', async () => {
    const env = await openEnvironment(atUri());
    try {
      const key = await env.getKey('device-key');
      await key.sign(data);
      await removeCard('modem-sim');
      try {
        await sealError(key.sign(data), 'DEVICE_UNAVAILABLE');
      } finally {
        await insertCard('modem-sim');
      }
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
  });

  it('a silent modem: TIMEOUT within timeout-ms, at open and mid-session; it works again once the modem answers', async () => {
    await setModemMode('silent');
    const opening = Date.now();
    await sealError(openEnvironment(atUri('timeout-ms=1000')), 'TIMEOUT');
    expect(Date.now() - opening).toBeLessThan(10_000);
    await setModemMode('normal');
    const env = await openEnvironment(atUri('timeout-ms=1500'));
    try {
      const key = await env.getKey('device-key');
      await setModemMode('silent');
      const started = Date.now();
      await sealError(key.sign(data), 'TIMEOUT');
      expect(Date.now() - started).toBeLessThan(10_000);
      await setModemMode('normal');
      expect(nodeVerify('sha256', data, { key: spki(key), dsaEncoding: 'der' }, await key.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
  });
});

/**
 * An applet that takes only the class byte `0x0N` (as the Orange library sends it) cannot be
 * made from the virtual one, which takes both: a thin filter over the real PC/SC transport
 * answers `6E00` to every `0x8N` command in its place. The driver must try `0x8N` once, then
 * keep `0x0N`.
 */
describe('IoT SAFE driver: class byte fallback', () => {
  it('falls back once from 0x8N to 0x0N on 6E00 and keeps it', async () => {
    const transport = await openPcscTransport({ reader: reader(), disposition: 'leave' });
    const classes: number[] = [];
    const filter = (ch: CardChannel): CardChannel => ({
      number: ch.number,
      transmit: async (apdu) => {
        classes.push(apdu[0]!);
        if ((apdu[0]! & 0x80) !== 0) return { data: Buffer.alloc(0), sw: 0x6e00 };
        return ch.transmit(apdu);
      },
      close: () => ch.close(),
    });
    const filtered: ApduTransport & { readonly generation: number } = {
      get info() { return transport.info; },
      get generation() { return transport.generation; },
      transmit: (a) => transport.transmit(a),
      select: async (aid, o) => {
        const r = await transport.select(aid, o);
        return { ...r, channel: filter(r.channel) };
      },
      exclusive: (fn) => transport.exclusive(fn),
      close: () => transport.close(),
    };
    const applet = new IotSafeApplet(filtered);
    try {
      const objects = await applet.listObjects();
      const device = objects.find((o) => o.kind === 'private' && o.label === 'device-key');
      const devicePublic = objects.find((o) => o.kind === 'public' && o.label === 'device-key');
      expect(device && devicePublic).toBeTruthy();
      const point = await applet.readPublicKey(devicePublic!.id);
      const digest = createHash('sha256').update(data).digest();
      const sig = await applet.sign(device!.id, 0x0001, 0x04, digest, 32);
      const pub = createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: point!.subarray(1, 33).toString('base64url'), y: point!.subarray(33).toString('base64url') }, format: 'jwk' });
      expect(nodeVerify('sha256', data, { key: pub, dsaEncoding: 'ieee-p1363' }, sig)).toBe(true);
      expect(classes.filter((c) => (c & 0x80) !== 0)).toHaveLength(1);
      expect(applet.cla).toBe(0x00);
    } finally {
      await applet.close();
      await transport.close();
    }
  });
});

/**
 * Encodings the virtual applet does not produce, built byte by byte from IOTSAFE.md: several
 * objects in one wrapper, an object list in pages, signatures in each framing.
 */
describe('IoT SAFE encodings the simulator does not produce', () => {
  const tlv = (tag: number, value: Buffer | number[]): Buffer => {
    const v = Buffer.isBuffer(value) ? value : Buffer.from(value);
    return Buffer.concat([Buffer.from([tag, v.length]), v]);
  };

  it('splits a wrapper that holds several private keys into one object each', () => {
    const inner = Buffer.concat([
      tlv(0x74, Buffer.from('key-a')), tlv(0x84, [0x01]), tlv(0x4a, [0x01]), tlv(0x4b, [0x13]), tlv(0x61, [0x03]),
      tlv(0x74, Buffer.from('key-b')), tlv(0x84, [0x02]), tlv(0x4a, [0x00]), tlv(0x4b, [0x14]), tlv(0x61, [0x06]),
    ]);
    const list = Buffer.concat([tlv(0xc1, inner), tlv(0xc3, Buffer.concat([tlv(0x73, Buffer.from('f')), tlv(0x83, [0x07]), tlv(0x20, [0x01, 0x02])]))]);
    const objects = parseObjectList(list);
    expect(objects.map((o) => [o.kind, o.label, o.id.toString('hex'), o.state, o.keyType, o.functions])).toEqual([
      ['private', 'key-a', '01', 1, 0x13, 0x03],
      ['private', 'key-b', '02', 0, 0x14, 0x06],
      ['file', 'f', '07', undefined, undefined, undefined],
    ]);
  });

  it('reads signatures framed with one- or two-byte lengths, raw or DER, into the same r‖s', () => {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const raw = nodeSign('sha256', data, { key: privateKey, dsaEncoding: 'ieee-p1363' });
    const der = nodeSign('sha256', data, { key: privateKey, dsaEncoding: 'der' });
    const two = (body: Buffer): Buffer => Buffer.concat([Buffer.from([0x33, body.length >> 8, body.length & 0xff]), body]);
    for (const framed of [tlv(0x33, raw), two(raw), tlv(0x33, der), two(der)]) {
      const sig = signatureFrom(framed, 32);
      expect(sig.length).toBe(64);
      expect(nodeVerify('sha256', data, { key: publicKey, dsaEncoding: 'ieee-p1363' }, sig)).toBe(true);
    }
    expect(() => signatureFrom(tlv(0x34, raw), 32)).toThrow(SealError);
  });
});
