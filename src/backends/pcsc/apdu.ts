/**
 * Command APDUs (ISO/IEC 7816-4 clause 5.1, cases 1–4 in short and extended form), command
 * chaining, status word translation, and the T=0 style response handling (`61xx` GET RESPONSE,
 * `6Cxx` resend with the right Le) that both transports run below the driver.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { SealError, type ErrorCode } from '../../core/errors.js';
import type { ResponseApdu } from './transport.js';

/** Something that sends one APDU and returns the complete response. */
export interface ApduSender {
  transmit(apdu: Buffer): Promise<ResponseApdu>;
  /**
   * True when the reader and the card accept extended-length APDUs. `transmitChained` then sends
   * one extended command instead of a chain. Absent means "not known": chain.
   */
  readonly extendedLength?: boolean;
}

/** Short-form maximum command data length (Lc = 1..255). */
export const SHORT_MAX_DATA = 255;
/** Short-form maximum response length (Le = 00 means 256). */
export const SHORT_MAX_LE = 256;

function checkByte(v: number, name: string): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xff) throw new SealError('INVALID_ARGUMENT', `APDU ${name} must be a byte, got ${String(v)}`);
}

/**
 * Builds a command APDU. `le` is Ne, the number of response bytes expected (1..65536; 0 is read
 * as 256, the short-form maximum); omit it when no response data is expected.
 * Short form when data ≤ 255 bytes and Ne ≤ 256 (Le 256 → `00`), extended form otherwise
 * (Lc `00 xx xx`; Le `xx xx`, or `00 xx xx` without data; 65536 → `0000`).
 */
export function commandApdu(cla: number, ins: number, p1: number, p2: number, data?: Buffer, le?: number): Buffer {
  checkByte(cla, 'CLA');
  checkByte(ins, 'INS');
  checkByte(p1, 'P1');
  checkByte(p2, 'P2');
  const nc = data?.length ?? 0;
  if (nc > 0xffff) throw new SealError('DATA_TOO_LARGE', `APDU command data of ${nc} bytes exceeds 65535`);
  let ne = le;
  if (ne !== undefined) {
    if (!Number.isInteger(ne) || ne < 0 || ne > 0x10000) throw new SealError('INVALID_ARGUMENT', `APDU Le must be 0..65536, got ${String(ne)}`);
    if (ne === 0) ne = SHORT_MAX_LE;
  }
  const header = [cla, ins, p1, p2];
  const extended = nc > SHORT_MAX_DATA || (ne !== undefined && ne > SHORT_MAX_LE);
  const parts: Buffer[] = [Buffer.from(header)];
  if (!extended) {
    if (nc > 0) parts.push(Buffer.from([nc]), data!);
    if (ne !== undefined) parts.push(Buffer.from([ne === SHORT_MAX_LE ? 0 : ne]));
    return Buffer.concat(parts);
  }
  if (nc > 0) parts.push(Buffer.from([0x00, nc >> 8, nc & 0xff]), data!);
  if (ne !== undefined) {
    const v = ne === 0x10000 ? 0 : ne;
    // Case 2E has the leading 00 before Le; in case 4E the 00 of Lc already marks extended form.
    if (nc === 0) parts.push(Buffer.from([0x00]));
    parts.push(Buffer.from([v >> 8, v & 0xff]));
  }
  return Buffer.concat(parts);
}

/** The parts of a command APDU, as `commandApdu` takes them. */
export interface ParsedCommand {
  cla: number;
  ins: number;
  p1: number;
  p2: number;
  data?: Buffer;
  le?: number;
  extended: boolean;
}

/**
 * Splits a command APDU back into its parts (ISO 7816-4 5.1 decoding rules). Throws
 * INVALID_ARGUMENT on an APDU that matches none of the cases.
 */
export function parseCommandApdu(apdu: Buffer): ParsedCommand {
  const bad = (): SealError => new SealError('INVALID_ARGUMENT', `malformed command APDU of ${apdu.length} bytes`);
  if (apdu.length < 4) throw bad();
  const [cla, ins, p1, p2] = [apdu[0]!, apdu[1]!, apdu[2]!, apdu[3]!];
  const base = { cla, ins, p1, p2 };
  const body = apdu.subarray(4);
  if (body.length === 0) return { ...base, extended: false };
  if (body.length === 1) return { ...base, le: body[0] === 0 ? 256 : body[0]!, extended: false };
  const b0 = body[0]!;
  if (b0 !== 0) {
    // Short case 3 or 4.
    if (body.length === 1 + b0) return { ...base, data: body.subarray(1), extended: false };
    if (body.length === 2 + b0) {
      const l = body[1 + b0]!;
      return { ...base, data: body.subarray(1, 1 + b0), le: l === 0 ? 256 : l, extended: false };
    }
    throw bad();
  }
  // Extended form: body starts with 00.
  if (body.length === 3) {
    const l = body.readUInt16BE(1);
    return { ...base, le: l === 0 ? 0x10000 : l, extended: true };
  }
  if (body.length < 3) throw bad();
  const nc = body.readUInt16BE(1);
  if (nc === 0) throw bad();
  if (body.length === 3 + nc) return { ...base, data: body.subarray(3), extended: true };
  if (body.length === 5 + nc) {
    const l = body.readUInt16BE(3 + nc);
    return { ...base, data: body.subarray(3, 3 + nc), le: l === 0 ? 0x10000 : l, extended: true };
  }
  throw bad();
}

/**
 * ISO 7816-4 command chaining (5.1.1.1): the data split into `chunk`-byte pieces, CLA with b5
 * (0x10) set on every command but the last, Le only on the last.
 */
export function commandChain(cla: number, ins: number, p1: number, p2: number, data: Buffer, le?: number, chunk = SHORT_MAX_DATA): Buffer[] {
  if (!Number.isInteger(chunk) || chunk < 1 || chunk > SHORT_MAX_DATA) throw new SealError('INVALID_ARGUMENT', `chain chunk must be 1..255, got ${chunk}`);
  if (data.length <= chunk) return [commandApdu(cla, ins, p1, p2, data, le)];
  const out: Buffer[] = [];
  for (let off = 0; off < data.length; off += chunk) {
    const piece = data.subarray(off, off + chunk);
    const last = off + chunk >= data.length;
    out.push(last ? commandApdu(cla, ins, p1, p2, piece, le) : commandApdu(cla | 0x10, ins, p1, p2, piece));
  }
  return out;
}

/**
 * Sends `data` with one command: a single extended APDU when the sender says it supports them,
 * else a command chain. An intermediate status other than 9000 ends the chain and is returned, so
 * the caller's `expectOk` reports it.
 */
export async function transmitChained(ch: ApduSender, cla: number, ins: number, p1: number, p2: number, data: Buffer, le?: number): Promise<ResponseApdu> {
  if (ch.extendedLength === true && data.length > SHORT_MAX_DATA) {
    return ch.transmit(commandApdu(cla, ins, p1, p2, data, le));
  }
  const apdus = commandChain(cla, ins, p1, p2, data, le);
  let r: ResponseApdu | undefined;
  for (const [i, apdu] of apdus.entries()) {
    r = await ch.transmit(apdu);
    if (i < apdus.length - 1 && r.sw !== 0x9000) return r;
  }
  return r!;
}

/** 0x6982 → '6982' (upper-case hex, 4 digits). */
export function swHex(sw: number): string {
  return (sw & 0xffff).toString(16).toUpperCase().padStart(4, '0');
}

const SW_TABLE: ReadonlyMap<number, readonly [ErrorCode, string]> = new Map<number, readonly [ErrorCode, string]>([
  [0x6982, ['NOT_LOGGED_IN', 'security status not satisfied']],
  [0x6983, ['PIN_LOCKED', 'authentication method blocked']],
  [0x6984, ['USAGE_NOT_PERMITTED', 'reference data not usable']],
  [0x6985, ['USAGE_NOT_PERMITTED', 'conditions of use not satisfied']],
  [0x6986, ['USAGE_NOT_PERMITTED', 'command not allowed']],
  [0x6A82, ['OBJECT_NOT_FOUND', 'file or application not found']],
  [0x6A83, ['OBJECT_NOT_FOUND', 'record not found']],
  [0x6A88, ['OBJECT_NOT_FOUND', 'referenced data not found']],
  [0x6A80, ['INVALID_ARGUMENT', 'incorrect parameters in the command data']],
  [0x6700, ['INVALID_ARGUMENT', 'wrong length']],
  [0x6A86, ['INVALID_ARGUMENT', 'incorrect parameters P1-P2']],
  [0x6B00, ['INVALID_ARGUMENT', 'wrong parameters P1-P2']],
  [0x6A84, ['DATA_TOO_LARGE', 'not enough memory space']],
  [0x6A89, ['KEY_EXISTS', 'file already exists']],
  [0x6D00, ['NOT_SUPPORTED', 'instruction not supported']],
  [0x6E00, ['NOT_SUPPORTED', 'class not supported']],
  [0x6A81, ['NOT_SUPPORTED', 'function not supported']],
  [0x6881, ['NOT_SUPPORTED', 'logical channel not supported']],
  [0x6882, ['NOT_SUPPORTED', 'secure messaging not supported']],
  [0x6884, ['NOT_SUPPORTED', 'command chaining not supported']],
  [0x6F00, ['DEVICE_ERROR', 'no precise diagnosis']],
  [0x6400, ['DEVICE_ERROR', 'execution error']],
  [0x6581, ['DEVICE_ERROR', 'memory failure']],
]);

/**
 * The SealError for a status word other than 9000: `what` names the operation (never data).
 * `63Cx` is PIN_INCORRECT with `triesLeft` x; unknown words are DEVICE_ERROR. The status rides
 * along as backendCode `SW_6982` and backendStatus 0x6982.
 */
export function statusError(sw: number, what: string): SealError {
  const hex = swHex(sw);
  const opts = { backendCode: `SW_${hex}`, backendStatus: sw & 0xffff };
  if ((sw & 0xfff0) === 0x63c0) {
    const tries = sw & 0x0f;
    return new SealError('PIN_INCORRECT', `${what}: verification failed, ${tries} tries left (SW ${hex})`, { ...opts, triesLeft: tries });
  }
  const known = SW_TABLE.get(sw & 0xffff);
  if (known) return new SealError(known[0], `${what}: ${known[1]} (SW ${hex})`, opts);
  return new SealError('DEVICE_ERROR', `${what}: the card answered SW ${hex}`, opts);
}

/** `r.data` when the status is 9000, else the mapped SealError. */
export function expectOk(r: ResponseApdu, what: string): Buffer {
  if (r.sw !== 0x9000) throw statusError(r.sw, what);
  return r.data;
}

/** Splits raw card bytes (data ‖ SW1 SW2) into a ResponseApdu. */
export function splitResponse(raw: Buffer): ResponseApdu {
  if (raw.length < 2) throw new SealError('DEVICE_ERROR', `the card's response has ${raw.length} bytes, less than a status word`);
  return { data: raw.subarray(0, raw.length - 2), sw: raw.readUInt16BE(raw.length - 2) };
}

/**
 * The class byte for GET RESPONSE answering a command sent with `cla`: the interindustry class
 * with the same logical channel (first interindustry `0x00`–`0x03` for channels 0–3, further
 * interindustry `0x40`–`0x4F` for 4–19), without chaining or secure messaging bits. Proprietary
 * classes (`0x8X`, `0xCX`, e.g. IoT SAFE's `0x81`) follow the same channel bit layout.
 */
export function getResponseCla(cla: number): number {
  return (cla & 0x40) !== 0 ? 0x40 | (cla & 0x0f) : cla & 0x03;
}

/** Bound on the commands one logical exchange may take (GET RESPONSEs and resends together). */
export const MAX_RESPONSE_ROUNDS = 300;
/** Bound on the data one exchange may accumulate. */
export const MAX_RESPONSE_BYTES = 0x10000 * 4;

/**
 * Sends `apdu` through `send` (which returns data ‖ SW1 SW2) and resolves the T=0 style
 * status words: `61xx` → GET RESPONSE (`<cla> C0 00 00 xx`, the data of each part concatenated),
 * `6Cxx` → the same command again with Le = xx. Bounded: a card that keeps answering `61xx` or
 * `6Cxx` gives DEVICE_ERROR after MAX_RESPONSE_ROUNDS commands.
 */
export async function withIsoResponseHandling(send: (apdu: Buffer) => Promise<Buffer>, apdu: Buffer): Promise<ResponseApdu> {
  const parts: Buffer[] = [];
  let total = 0;
  let command = apdu;
  let lastWrongLe = -1;
  for (let round = 0; round < MAX_RESPONSE_ROUNDS; round++) {
    const r = splitResponse(await send(command));
    const sw1 = r.sw >> 8;
    const xx = r.sw & 0xff;
    if (sw1 === 0x6c) {
      // Wrong Le: resend the same command with Le = xx (a second 6Cxx with the same xx is a loop).
      if (xx === lastWrongLe) break;
      lastWrongLe = xx;
      command = withLe(command, xx === 0 ? SHORT_MAX_LE : xx);
      continue;
    }
    if (r.data.length > 0) {
      parts.push(r.data);
      total += r.data.length;
      if (total > MAX_RESPONSE_BYTES) {
        throw new SealError('DEVICE_ERROR', `the card's response exceeds ${MAX_RESPONSE_BYTES} bytes`, { backendCode: `SW_${swHex(r.sw)}`, backendStatus: r.sw });
      }
    }
    if (sw1 === 0x61) {
      command = Buffer.from([getResponseCla(command[0]!), 0xc0, 0x00, 0x00, xx]);
      lastWrongLe = -1;
      continue;
    }
    return { data: parts.length === 1 ? parts[0]! : Buffer.concat(parts, total), sw: r.sw };
  }
  throw new SealError('DEVICE_ERROR', `the card kept asking for GET RESPONSE or a new Le (more than ${MAX_RESPONSE_ROUNDS} rounds)`, { backendCode: 'SW_LOOP' });
}

/** `command` with its Le set to `ne` (the original may have had no Le). */
function withLe(command: Buffer, ne: number): Buffer {
  let p: ParsedCommand;
  try {
    p = parseCommandApdu(command);
  } catch (e) {
    throw new SealError('DEVICE_ERROR', 'the card asked to resend a command that is not a well-formed APDU', { cause: e });
  }
  return commandApdu(p.cla, p.ins, p.p1, p.p2, p.data, ne);
}

/**
 * The class byte `cla` (written for the basic channel) moved to logical channel `channel`
 * (ISO 7816-4 5.4.1): channels 0–3 in b2b1 of the first interindustry form (`0x00`–`0x03`,
 * proprietary `0x80`–`0x83`), channels 4–19 in b4..b1 of the further interindustry form
 * (`0x40`–`0x4F`, proprietary `0xC0`–`0xCF`). The chaining bit (0x10) and b8 are kept.
 */
export function claWithChannel(cla: number, channel: number): number {
  checkByte(cla, 'CLA');
  if (!Number.isInteger(channel) || channel < 0 || channel > 19) throw new SealError('INVALID_ARGUMENT', `logical channel must be 0..19, got ${String(channel)}`);
  if (channel <= 3) return (cla & 0x9c) | channel;
  return (cla & 0x90) | 0x40 | (channel - 4);
}

/** `apdu` with its class byte moved to `channel` (a copy; the caller's buffer is untouched). */
export function onChannel(apdu: Buffer, channel: number): Buffer {
  if (apdu.length < 4) throw new SealError('INVALID_ARGUMENT', `malformed command APDU of ${apdu.length} bytes`);
  if (channel === 0) return apdu;
  const copy = Buffer.from(apdu);
  copy[0] = claWithChannel(copy[0]!, channel);
  return copy;
}

/**
 * Whether the ATR's historical bytes announce extended Lc/Le (ISO 7816-4 8.1.1.2.7: compact-TLV
 * "card capabilities" tag 7, third software function table byte, b7). False when the ATR says
 * nothing or cannot be read.
 */
export function atrSupportsExtendedLength(atr: Buffer): boolean {
  if (atr.length < 2) return false;
  const t0 = atr[1]!;
  const k = t0 & 0x0f;
  let y = t0 >> 4;
  let i = 2;
  for (;;) {
    if (y & 1) i++;
    if (y & 2) i++;
    if (y & 4) i++;
    if (!(y & 8)) break;
    if (i >= atr.length) return false;
    y = atr[i]! >> 4;
    i++;
  }
  const hist = atr.subarray(i, i + k);
  if (hist.length !== k || k === 0) return false;
  // Category 0x80: compact-TLV objects follow; 0x00: the same with a 3-byte status at the end.
  let objects: Buffer;
  if (hist[0] === 0x80) objects = hist.subarray(1);
  else if (hist[0] === 0x00 && hist.length >= 4) objects = hist.subarray(1, hist.length - 3);
  else return false;
  for (let j = 0; j < objects.length; ) {
    const tag = objects[j]! >> 4;
    const len = objects[j]! & 0x0f;
    const value = objects.subarray(j + 1, j + 1 + len);
    if (value.length !== len) return false;
    if (tag === 0x7 && len >= 3) return (value[2]! & 0x40) !== 0;
    j += 1 + len;
  }
  return false;
}

/** Runs async functions one at a time, in call order. Not reentrant: never nest `run`. */
export class SerialQueue {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const previous = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await previous;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * A reentrant lock for `ApduTransport.exclusive`: callers queue up, and code running inside the
 * holder's `fn` (its async continuations) passes straight through, so nested `exclusive` calls
 * and the transport's own `transmit` inside `fn` do not deadlock. The pass is bound to the
 * holder's run: a callback scheduled inside `fn` that runs after it ended queues like anyone.
 */
export class ExclusiveLock {
  private readonly queue = new SerialQueue();
  private readonly holder = new AsyncLocalStorage<{ active: boolean }>();

  /** True when the current async context runs inside this lock's holder. */
  held(): boolean {
    return this.holder.getStore()?.active === true;
  }

  run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.held()) return fn();
    return this.queue.run(async () => {
      const token = { active: true };
      try {
        return await this.holder.run(token, fn);
      } finally {
        token.active = false;
      }
    });
  }
}
