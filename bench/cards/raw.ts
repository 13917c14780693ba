/**
 * The anchors of the card benchmark: the least a program can do to get the same signatures from
 * the same card. `RawPcsc` sends APDUs through the project's pcsc-lite shim (pcsc-native.ts)
 * straight to SCardTransmit: no transport, no driver, no transaction, no GET RESPONSE handling.
 * `RawModem` writes AT command lines to the modem's serial port with the `serialport` package and
 * waits for the final result code. Each anchor counts the answers that are not `9000`.
 */
import { SCARD, loadPcscShim, type PcscContext } from '../../src/backends/pcsc/pcsc-native.js';

export interface RawResponse {
  data: Buffer;
  sw: number;
}

function split(raw: Buffer): RawResponse {
  if (raw.length < 2) throw new Error(`a response of ${raw.length} bytes has no status word`);
  return { data: raw.subarray(0, raw.length - 2), sw: raw.readUInt16BE(raw.length - 2) };
}

/** One shared connection to the card in `reader`, on a PC/SC context of its own. */
export class RawPcsc {
  /** Answers other than 9000 (the caller decides which exchanges count). */
  failures = 0;

  private constructor(
    private readonly ctx: PcscContext,
    private readonly handle: number,
    private readonly protocol: number,
  ) {}

  static async open(reader: string): Promise<RawPcsc> {
    const ctx = new (loadPcscShim().Context)();
    await ctx.open();
    try {
      const { handle, protocol } = await ctx.connect(reader, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1);
      return new RawPcsc(ctx, handle, protocol);
    } catch (e) {
      await ctx.close().catch(() => undefined);
      throw e;
    }
  }

  /** One SCardTransmit. */
  async transmit(apdu: Buffer): Promise<RawResponse> {
    return split(await this.ctx.transmit(this.handle, this.protocol, apdu));
  }

  /** One SCardTransmit whose answer must be 9000, else it counts as a failure. */
  async expect9000(apdu: Buffer): Promise<RawResponse> {
    const r = await this.transmit(apdu);
    if (r.sw !== 0x9000) this.failures++;
    return r;
  }

  /** SCardBeginTransaction / SCardEndTransaction around `fn` (for the diagnostic anchor). */
  async inTransaction<T>(fn: () => Promise<T>): Promise<T> {
    await this.ctx.beginTransaction(this.handle);
    try {
      return await fn();
    } finally {
      await this.ctx.endTransaction(this.handle, SCARD.LEAVE_CARD);
    }
  }

  /** Disconnects with a card reset, so no verified PIN outlives the benchmark. */
  async close(): Promise<void> {
    await this.ctx.disconnect(this.handle, SCARD.RESET_CARD).catch(() => undefined);
    await this.ctx.close();
  }
}

/** The APDU `CLA INS P1 P2 [Lc data] [Le]` in short form (Le 256 is written 00). */
export function shortApdu(cla: number, ins: number, p1: number, p2: number, data?: Buffer, le?: number): Buffer {
  const head = Buffer.from([cla, ins, p1, p2]);
  const body = data && data.length > 0 ? [Buffer.from([data.length]), data] : [];
  const tail = le !== undefined ? [Buffer.from([le & 0xff])] : [];
  return Buffer.concat([head, ...body, ...tail]);
}

/**
 * `cla` (written for the basic channel) on logical channel `channel` (ISO 7816-4 5.4.1): channels
 * 0–3 in b2b1, channels 4–19 in b4..b1 of the further interindustry form (b7 set).
 */
export function claOnChannel(cla: number, channel: number): number {
  return channel <= 3 ? (cla & 0x9c) | channel : (cla & 0x90) | 0x40 | (channel - 4);
}

const COMMAND_TIMEOUT_MS = 10_000;

/**
 * A modem's AT port. `command` writes one line and collects the lines up to the final result:
 * `OK` resolves, `ERROR` / `+CME ERROR` rejects. Echo (the command line itself) and empty lines
 * are skipped. One command at a time.
 */
export class RawModem {
  /** Exchanges whose answer was not 9000, or not OK. */
  failures = 0;
  private partial = '';
  private lines: string[] = [];
  private waiting: (() => void) | undefined;

  private constructor(private readonly port: import('serialport').SerialPort) {
    port.on('data', (chunk: Buffer) => {
      const pieces = (this.partial + chunk.toString('latin1')).split(/\r\n|\r|\n/);
      this.partial = pieces.pop() ?? '';
      for (const p of pieces) if (p.trim() !== '') this.lines.push(p.trim());
      this.waiting?.();
    });
    port.on('error', () => undefined);
  }

  static async open(path: string, baudRate: number): Promise<RawModem> {
    const { SerialPort } = await import('serialport');
    const port = new SerialPort({ path, baudRate, autoOpen: false });
    await new Promise<void>((resolve, reject) => port.open((err) => (err ? reject(err) : resolve())));
    return new RawModem(port);
  }

  async command(line: string): Promise<string[]> {
    this.lines = [];
    // no drain: the answer cannot arrive before the line went out
    this.port.write(`${line}\r`, 'latin1');
    const deadline = Date.now() + COMMAND_TIMEOUT_MS;
    const out: string[] = [];
    for (;;) {
      while (this.lines.length > 0) {
        const l = this.lines.shift()!;
        if (l === line) continue; // echo
        if (l === 'OK') return out;
        if (l === 'ERROR' || l.startsWith('+CME ERROR')) throw new Error(`${line.split('=')[0]}: ${l}`);
        out.push(l);
      }
      if (Date.now() > deadline) throw new Error(`${line.split('=')[0]}: no answer within ${COMMAND_TIMEOUT_MS} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, COMMAND_TIMEOUT_MS);
        this.waiting = () => {
          clearTimeout(timer);
          this.waiting = undefined;
          resolve();
        };
      });
    }
  }

  /** `AT+CGLA=<session>,<len>,"<apdu>"`: the APDU's response; a status other than 9000 counts as a failure. */
  async cgla(session: number, apdu: Buffer): Promise<RawResponse> {
    const hex = apdu.toString('hex').toUpperCase();
    let lines: string[];
    try {
      lines = await this.command(`AT+CGLA=${session},${hex.length},"${hex}"`);
    } catch (e) {
      this.failures++;
      throw e;
    }
    const m = lines.map((l) => /^\+CGLA:\s*\d+\s*,\s*"?([0-9A-Fa-f]*)"?$/.exec(l)).find((x) => x !== null);
    if (!m) {
      this.failures++;
      throw new Error('AT+CGLA: no +CGLA line in the answer');
    }
    const r = split(Buffer.from(m[1]!, 'hex'));
    if (r.sw !== 0x9000) this.failures++;
    return r;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => (this.port.isOpen ? this.port.close(() => resolve()) : resolve()));
  }
}
