/**
 * Cards on the simulators: seal-bridge ECDSA P-256 sign against raw loops of the same APDUs.
 * - PIV (virtual PIV card on vpcd): a raw PC/SC loop on the project's pcsc-lite shim, SELECT and
 *   VERIFY once, then one GENERAL AUTHENTICATE per signature (what seal-bridge sends per sign
 *   too, inside a PC/SC transaction).
 * - IoT SAFE (virtual applet on vpcd): MANAGE CHANNEL and SELECT once, then COMPUTE SIGNATURE
 *   INIT and UPDATE per signature.
 * - IoT SAFE behind the virtual modem: AT+CCHO once, then the same two commands as AT+CGLA lines
 *   written to the serial port. The port opens once at a time, so each round opens its side anew
 *   (outside the timed part).
 * The simulators come from `scripts/sim start` (SEAL_PIV_URI, SEAL_IOTSAFE_URI, SEAL_MODEM_URI,
 * PCSCLITE_CSOCK_NAME); a case without its URI is left out. Keys are generated into the
 * containers the environments name (`containerFor`), so a card that is not a software one is
 * refused. The anchors open the reader the environment uses, on a PC/SC context of their own.
 */
import { createHash, verify as nodeVerify } from 'node:crypto';
import { openEnvironment, SealUri } from '../src/index.js';
import type { KeyHandle, SecureEnvironment } from '../src/index.js';
import type { IotSafeKey, PivKey } from '../src/backends/pcsc/index.js';
import { resolvePin } from '../src/core/secrets.js';
import { findTag, parseBerTlv } from '../src/backends/pcsc/tlv.js';
import { sequential, takeTurns, type Measurement, type Row } from './lib.js';
import { RawModem, RawPcsc, claOnChannel, shortApdu } from './cards/raw.js';

const P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const message = Buffer.from('benchmark message');
const digest = createHash('sha256').update(message).digest();

const PIV_AID = Buffer.from('A000000308', 'hex');
const IOTSAFE_AID = Buffer.from('A0000005590010', 'hex');

/** `sequential` of an anchor whose failures are counted by the anchor itself. */
async function counted(seconds: number, raw: { failures: number }, op: () => Promise<unknown>): Promise<Measurement> {
  const before = raw.failures;
  const m = await sequential(seconds, op);
  return { ...m, failures: raw.failures - before };
}

/** The two rows of a PC/SC case: against the raw loop (the target), and against the same loop with a transaction per signature. */
function transactionRows(what: string, m: { seal: Measurement; anchorResult: Measurement; inTransaction: Measurement }, text: { anchor: string; inTransaction: string; note: string }): Row[] {
  return [
    { case: what, seal: m.seal, anchor: text.anchor, anchorResult: m.anchorResult, ratio: m.seal.opsPerSecond / m.anchorResult.opsPerSecond, target: 0.9, note: text.note },
    { case: `${what} vs the raw loop with a transaction per signature`, seal: m.seal, anchor: text.inTransaction, anchorResult: m.inTransaction, ratio: m.seal.opsPerSecond / m.inTransaction.opsPerSecond },
  ];
}

/** A software card or SIM only: generating a key replaces what the container held. */
function requireSimulated(env: SecureEnvironment): void {
  if (env.info.protectionLevel > 1) throw new Error(`cards bench: '${env.info.label}' is not a simulator (protection level ${env.info.protectionLevel}); the benchmark replaces keys and runs on software cards only`);
}

async function generate(env: SecureEnvironment): Promise<KeyHandle> {
  const label = await env.containerFor!(P256, ['sign']);
  return env.generateKey({ label, algorithm: P256, usages: ['sign', 'verify'], replace: true });
}

function verifies(key: KeyHandle, signature: Buffer, dsaEncoding: 'der' | 'ieee-p1363'): boolean {
  return nodeVerify('sha256', message, { key: key.publicKey!, format: 'der', type: 'spki', dsaEncoding }, signature);
}

// ---- PIV ---------------------------------------------------------------------------------------------

async function pivCase(uri: string, seconds: number): Promise<Row[]> {
  const env = await openEnvironment(uri);
  let raw: RawPcsc | undefined;
  try {
    requireSimulated(env);
    const key = (await generate(env)) as PivKey;
    raw = await RawPcsc.open(SealUri.parse(env.uri).get('reader')!);
    const card = raw;
    // SELECT (Le 256) and VERIFY PIN (key reference 80, PIN padded with FF to 8 bytes), once
    if ((await card.transmit(shortApdu(0x00, 0xa4, 0x04, 0x00, PIV_AID, 256))).sw !== 0x9000) throw new Error('PIV anchor: SELECT failed');
    const pin = Buffer.from(await resolvePin(SealUri.parse(uri), 'the PIV card', { interactive: false }), 'utf8');
    const block = Buffer.alloc(8, 0xff);
    pin.copy(block);
    const verifyApdu = shortApdu(0x00, 0x20, 0x00, 0x80, block);
    const verified = await card.transmit(verifyApdu);
    for (const b of [pin, block, verifyApdu]) b.fill(0);
    if (verified.sw !== 0x9000) throw new Error(`PIV anchor: VERIFY answered ${verified.sw.toString(16)}`);
    // GENERAL AUTHENTICATE: algorithm 11 (P-256), the key's slot, 7C { 82 (empty) 81 digest }, Le 256
    const template = Buffer.concat([Buffer.from([0x7c, 2 + 2 + digest.length, 0x82, 0x00, 0x81, digest.length]), digest]);
    const sign = shortApdu(0x00, 0x87, 0x11, key.slot.ref, template, 256);
    const first = await card.expect9000(sign);
    const outer = findTag(parseBerTlv(first.data), 0x7c);
    const der = outer ? findTag(parseBerTlv(outer), 0x82) : undefined;
    if (first.sw !== 0x9000 || !der || !verifies(key, Buffer.from(der), 'der')) throw new Error('PIV anchor: the GENERAL AUTHENTICATE signature does not verify');
    // seal-bridge's first sign verifies its PIN (once per card session): outside the measurement
    await key.sign(message);

    const { anchorResult, inTransaction, seal } = await takeTurns(seconds, {
      anchorResult: (s) => counted(s, card, () => card.expect9000(sign)),
      // what seal-bridge's transport adds per operation: SCardBeginTransaction / SCardEndTransaction
      inTransaction: (s) => counted(s, card, () => card.inTransaction(() => card.expect9000(sign))),
      seal: (s) => sequential(s, () => key.sign(message)),
    });
    return transactionRows('PIV ECDSA P-256 sign (virtual card, PC/SC)', { seal, anchorResult, inTransaction }, {
      anchor: 'raw PC/SC transmit loop (SELECT + VERIFY once, GENERAL AUTHENTICATE per signature)',
      inTransaction: 'raw PC/SC loop, each GENERAL AUTHENTICATE inside SCardBeginTransaction / SCardEndTransaction',
      note: 'per signature seal-bridge sends the same one APDU, inside a PC/SC transaction',
    });
  } finally {
    await raw?.close();
    await env.close();
  }
}

// ---- IoT SAFE ------------------------------------------------------------------------------------------

/** COMPUTE SIGNATURE INIT (mode 03, SHA-256, ECDSA, session 1) and UPDATE (`9E` digest) with `cla`. */
function iotSafeSignApdus(cla: number, keyId: Buffer): [Buffer, Buffer] {
  const init = Buffer.concat([Buffer.from([0x84, keyId.length]), keyId, Buffer.from([0xa1, 0x01, 0x03, 0x91, 0x02, 0x00, 0x01, 0x92, 0x01, 0x04])]);
  const update = Buffer.concat([Buffer.from([0x9e, digest.length]), digest]);
  return [shortApdu(cla, 0x2a, 0x00, 0x01, init), shortApdu(cla, 0x2b, 0x80, 0x01, update, 256)];
}

/** The r‖s inside tag 33 (one- or two-byte length); undefined when the answer holds none. */
function iotSafeSignature(data: Buffer): Buffer | undefined {
  if (data[0] !== 0x33) return undefined;
  const body = data[1] === 0x00 ? data.subarray(3) : data.subarray(2);
  return body.length === 64 ? Buffer.from(body) : undefined;
}

async function iotSafeCase(uri: string, seconds: number): Promise<Row[]> {
  const env = await openEnvironment(uri);
  let raw: RawPcsc | undefined;
  let channel = 0;
  try {
    requireSimulated(env);
    const key = (await generate(env)) as IotSafeKey;
    raw = await RawPcsc.open(SealUri.parse(env.uri).get('reader')!);
    const card = raw;
    // MANAGE CHANNEL open, then SELECT on the new channel, once
    const opened = await card.transmit(shortApdu(0x00, 0x70, 0x00, 0x00, undefined, 1));
    if (opened.sw !== 0x9000 || opened.data.length !== 1) throw new Error('IoT SAFE anchor: MANAGE CHANNEL failed');
    channel = opened.data[0]!;
    if ((await card.transmit(shortApdu(claOnChannel(0x00, channel), 0xa4, 0x04, 0x00, IOTSAFE_AID, 256))).sw !== 0x9000) throw new Error('IoT SAFE anchor: SELECT failed');
    // the class byte seal-bridge settles on with this applet: proprietary, 0x80 on the channel
    const [init, update] = iotSafeSignApdus(claOnChannel(0x80, channel), key.object.id);
    const signOnce = async (): Promise<Buffer> => {
      await card.expect9000(init);
      return (await card.expect9000(update)).data;
    };
    const sig = iotSafeSignature(await signOnce());
    if (card.failures > 0 || !sig || !verifies(key, sig, 'ieee-p1363')) throw new Error('IoT SAFE anchor: the COMPUTE SIGNATURE signature does not verify');
    await key.sign(message); // warm: the class byte settled

    const { anchorResult, inTransaction, seal } = await takeTurns(seconds, {
      anchorResult: (s) => counted(s, card, signOnce),
      inTransaction: (s) => counted(s, card, () => card.inTransaction(signOnce)),
      seal: (s) => sequential(s, () => key.sign(message)),
    });
    return transactionRows('IoT SAFE ECDSA P-256 sign (virtual applet, PC/SC)', { seal, anchorResult, inTransaction }, {
      anchor: 'raw PC/SC transmit loop (MANAGE CHANNEL + SELECT once, COMPUTE SIGNATURE INIT + UPDATE per signature)',
      inTransaction: 'raw PC/SC loop, INIT + UPDATE inside SCardBeginTransaction / SCardEndTransaction',
      note: 'per signature seal-bridge sends the same two APDUs, inside a PC/SC transaction',
    });
  } finally {
    if (raw && channel !== 0) await raw.transmit(shortApdu(0x00, 0x70, 0x80, channel)).catch(() => undefined);
    await raw?.close();
    await env.close();
  }
}

/** Over the modem: AT+CCHO once, INIT and UPDATE as AT+CGLA per signature, as seal-bridge does on a modem with CCHO. */
async function modemCase(uri: string, seconds: number): Promise<Row> {
  const parsed = SealUri.parse(uri);
  const port = parsed.get('port')!;
  const baud = Number(parsed.query('baud') ?? 115200);
  // the key, generated once; each round of seal-bridge's side opens its own environment, since
  // the port opens once at a time
  let label: string;
  let keyId: Buffer;
  let publicKey: KeyHandle;
  {
    const env = await openEnvironment(uri);
    try {
      requireSimulated(env);
      const key = (await generate(env)) as IotSafeKey;
      [label, keyId, publicKey] = [key.label, key.object.id, key];
    } finally {
      await env.close();
    }
  }
  const sealRound = async (s: number): Promise<Measurement> => {
    const env = await openEnvironment(uri);
    try {
      const key = await env.getKey(label, 'private');
      await key.sign(message);
      return await sequential(s, () => key.sign(message));
    } finally {
      await env.close();
    }
  };
  const anchorRound = async (s: number): Promise<Measurement> => {
    const modem = await RawModem.open(port, baud);
    let session: number | undefined;
    try {
      await modem.command('ATE0');
      const opened = (await modem.command(`AT+CCHO="${IOTSAFE_AID.toString('hex').toUpperCase()}"`)).map((l) => /^(?:\+CCHO:\s*)?(\d+)$/.exec(l)).find((m) => m !== null);
      if (!opened) throw new Error('modem anchor: AT+CCHO gave no session');
      session = Number(opened[1]);
      const sid = session;
      // seal-bridge takes the session id for the channel number (ids outside 1..19: channel bits
      // left to the modem); the modem sets the channel bits of the CLA either way
      const [init, update] = iotSafeSignApdus(claOnChannel(0x80, sid >= 1 && sid <= 19 ? sid : 0), keyId);
      const signOnce = async (): Promise<Buffer> => {
        await modem.cgla(sid, init);
        return (await modem.cgla(sid, update)).data;
      };
      const sig = iotSafeSignature(await signOnce());
      if (modem.failures > 0 || !sig || !verifies(publicKey, sig, 'ieee-p1363')) throw new Error('modem anchor: the COMPUTE SIGNATURE signature does not verify');
      return await counted(s, modem, signOnce);
    } finally {
      if (session !== undefined) await modem.command(`AT+CCHC=${session}`).catch(() => undefined);
      await modem.close();
    }
  };
  const { anchorResult, seal } = await takeTurns(seconds, { anchorResult: anchorRound, seal: sealRound });
  return {
    case: 'IoT SAFE ECDSA P-256 sign (virtual modem, AT+CGLA)',
    seal,
    anchor: 'raw AT+CGLA lines on the serial port (AT+CCHO once, INIT + UPDATE per signature)',
    anchorResult,
    ratio: seal.opsPerSecond / anchorResult.opsPerSecond,
    target: 0.9,
  };
}

// ---- all cases -----------------------------------------------------------------------------------------

/** The cases whose simulator is there (`scripts/sim start` exports the URIs; bench/run.ts starts one). */
export async function cardCases(seconds: number): Promise<Row[]> {
  const { SEAL_PIV_URI: piv, SEAL_IOTSAFE_URI: iotSafe, SEAL_MODEM_URI: modem } = process.env;
  if (!piv && !iotSafe && !modem) throw new Error('cards bench: no card simulator: SEAL_PIV_URI, SEAL_IOTSAFE_URI and SEAL_MODEM_URI are unset (eval "$(scripts/sim start)")');
  const rows: Row[] = [];
  if (piv) rows.push(...(await pivCase(piv, seconds)));
  if (iotSafe) rows.push(...(await iotSafeCase(iotSafe, seconds)));
  if (modem) rows.push(await modemCase(modem, seconds));
  return rows;
}
