/**
 * A virtual cellular modem for the test simulators: the DCE end of a pty pair made by
 *   socat -d -d pty,raw,echo=0,link=<dce> pty,raw,echo=0,link=<dte>
 * answering 3GPP TS 27.007 AT commands the way a real module does, with a virtual SIM (a
 * VirtualCard, normally an IoT SAFE front end in T=0 style) behind AT+CSIM / AT+CCHO / AT+CGLA /
 * AT+CCHC. The product opens <dte> with the serialport package; this side opens <dce>.
 *
 * Result codes are verbose (ATV1): information text `\r\n<text>\r\n`, final results `\r\nOK\r\n`,
 * `\r\nERROR\r\n`, `\r\n+CME ERROR: <n>\r\n`. Input lines end with `\r` or `\r\n`. Echo is on by
 * default, as on real modems.
 *
 * Run-time modes: `normal`; `silent` (answers nothing, like a hung module); `error` (answers ERROR
 * to everything). Quirks seen in the field, switchable at run time (ModemQuirks): echo that stays
 * on after ATE0, stale unsolicited lines around answers, `61xx`/`6Cxx` handed to the host instead
 * of being resolved by the modem, `+CME ERROR` for SELECT through AT+CSIM, CCHO answering the bare
 * session id. `AtLineReader` and `parseAtLine` are pure and unit-tested. Test code only.
 */
import fs from 'node:fs';
import tty from 'node:tty';
import type { VirtualCard } from '../cards/card.js';

export type ModemMode = 'normal' | 'silent' | 'error';

export interface ModemQuirks {
  /** Echo stays on whatever ATE0 says (echo itself is on by default either way). */
  echo?: boolean;
  /** Unsolicited result codes (`+CREG: 1`, `RING`, `^RSSI: 20`) before and after every answer. */
  staleLines?: boolean;
  /** `61xx` and `6Cxx` from the SIM reach the host, which must send GET RESPONSE / resend itself. */
  getResponse?: boolean;
  /** SELECT (INS A4) through AT+CSIM is refused with `+CME ERROR: 3`; logical channels via AT+CCHO work. */
  cmeOnSelect?: boolean;
  /** AT+CCHO answers the bare session id (`<id>`, as TS 27.007 writes it) instead of `+CCHO: <id>`. */
  cchoBare?: boolean;
}

export const MODEM_MANUFACTURER = 'seal-bridge';
export const MODEM_MODEL = 'seal-bridge virtual modem';
export const MODEM_REVISION = 'SEALVM01';

/** Longest APDU accepted by AT+CSIM / AT+CGLA: a short case 4 command (4 + 1 + 255 + 1 bytes). */
const MAX_APDU = 261;
/** Longest command line; longer input is dropped and answered ERROR. */
const MAX_LINE = 2048;
/** Bound on GET RESPONSE / resend rounds while the modem resolves 61xx / 6Cxx. */
const MAX_ROUNDS = 64;

const CME_TEXT: Record<number, string> = {
  3: 'operation not allowed',
  4: 'operation not supported',
  10: 'SIM not inserted',
  13: 'SIM failure',
  21: 'invalid index',
  50: 'incorrect parameters',
  100: 'unknown',
};

// ---------------------------------------------------------------------------------------------
// Pure pieces: line splitting and command parsing

/**
 * Splits the byte stream from the host into command lines. A line ends at `\r`, at `\r\n` (the
 * `\n` is swallowed even when it arrives in a later chunk) or at a lone `\n`. Each complete line
 * comes with its terminator as received, for the echo. Lines longer than `maxLine` are cut and
 * flagged `overflow`.
 */
export class AtLineReader {
  private buf = '';
  private afterCr = false;
  private overflow = false;
  constructor(private readonly maxLine = MAX_LINE) {}

  push(chunk: string): { line: string; terminator: string; overflow: boolean }[] {
    const out: { line: string; terminator: string; overflow: boolean }[] = [];
    for (const ch of chunk) {
      if (ch === '\n' && this.afterCr) {
        this.afterCr = false;
        out.push({ line: '', terminator: '\n', overflow: false }); // the rest of a \r\n: echo only
        continue;
      }
      this.afterCr = ch === '\r';
      if (ch === '\r' || ch === '\n') {
        out.push({ line: this.buf, terminator: ch, overflow: this.overflow });
        this.buf = '';
        this.overflow = false;
        continue;
      }
      if (this.buf.length >= this.maxLine) this.overflow = true;
      else this.buf += ch;
    }
    return out;
  }
}

export interface AtArg {
  text: string;
  quoted: boolean;
}

export type AtCommand =
  | { kind: 'basic'; name: string; value: string } // e.g. E0 → name E, value 0; I; Z; &F
  | { kind: 'extended'; name: string; form: 'exec' | 'read' | 'test' | 'set'; args: AtArg[] }; // +CSIM=…

/** Splits on `sep` outside double quotes; undefined when a quote is left open. */
function splitOutsideQuotes(s: string, sep: string): string[] | undefined {
  const parts: string[] = [];
  let cur = '';
  let inQuote = false;
  for (const ch of s) {
    if (ch === '"') inQuote = !inQuote;
    if (ch === sep && !inQuote) {
      parts.push(cur);
      cur = '';
    } else cur += ch;
  }
  if (inQuote) return undefined;
  parts.push(cur);
  return parts;
}

/**
 * Parses one command line. `null`: not an AT command line (ignored, like a real modem ignores
 * noise); `'syntax'`: an AT line that cannot be parsed (answered ERROR); else the commands of the
 * line (`AT+CMEE=1;+CSIM=10,"…"` gives two). Command names are upper-cased, arguments kept as
 * written (quotes removed, `quoted` set).
 */
export function parseAtLine(rawLine: string): AtCommand[] | null | 'syntax' {
  const line = rawLine.replace(/^[\s\0]+/, '').replace(/\s+$/, '');
  if (line.length < 2 || line.slice(0, 2).toUpperCase() !== 'AT') return null;
  const body = line.slice(2);
  if (body.trim() === '') return [];
  const pieces = splitOutsideQuotes(body, ';');
  if (!pieces) return 'syntax';
  const out: AtCommand[] = [];
  for (const [i, rawPiece] of pieces.entries()) {
    const piece = rawPiece.trim();
    if (piece === '') {
      if (i === pieces.length - 1 && i > 0) continue; // a trailing ';'
      return 'syntax';
    }
    const ext = /^([+^$%#][A-Za-z][A-Za-z0-9]*)(.*)$/.exec(piece);
    if (ext) {
      const name = ext[1]!.toUpperCase();
      const rest = ext[2]!.trim();
      if (rest === '') out.push({ kind: 'extended', name, form: 'exec', args: [] });
      else if (rest === '?') out.push({ kind: 'extended', name, form: 'read', args: [] });
      else if (rest === '=?') out.push({ kind: 'extended', name, form: 'test', args: [] });
      else if (rest.startsWith('=')) {
        const raw = splitOutsideQuotes(rest.slice(1), ',');
        if (!raw) return 'syntax';
        const args: AtArg[] = [];
        for (const a of raw) {
          const t = a.trim();
          if (t.startsWith('"')) {
            if (t.length < 2 || !t.endsWith('"') || t.slice(1, -1).includes('"')) return 'syntax';
            args.push({ text: t.slice(1, -1), quoted: true });
          } else {
            if (t.includes('"')) return 'syntax';
            args.push({ text: t, quoted: false });
          }
        }
        out.push({ kind: 'extended', name, form: 'set', args });
      } else return 'syntax';
      continue;
    }
    // basic commands, possibly several in a row (ATE0V1): a letter or &letter, then digits
    const re = /(&?[A-Za-z])(\d*)/y;
    let pos = 0;
    while (pos < piece.length) {
      if (piece[pos] === ' ') {
        pos++;
        continue;
      }
      re.lastIndex = pos;
      const m = re.exec(piece);
      if (!m) return 'syntax';
      out.push({ kind: 'basic', name: m[1]!.toUpperCase(), value: m[2]! });
      pos = re.lastIndex;
    }
  }
  return out;
}

/** A decimal integer argument, else undefined. */
function intArg(a: AtArg | undefined): number | undefined {
  if (!a || a.quoted || !/^\d{1,6}$/.test(a.text)) return undefined;
  return Number(a.text);
}

/** A hex string argument (quoted, or bare as some hosts send), else undefined. */
function hexArg(a: AtArg | undefined): string | undefined {
  if (!a || !/^[0-9A-Fa-f]*$/.test(a.text) || a.text.length % 2 !== 0) return undefined;
  return a.text;
}

/** The class byte with the logical channel `ch` (0–3 first interindustry, 4–19 further). */
function claOnChannel(cla: number, ch: number): number {
  if (ch < 4) return (cla & 0x40) === 0 ? (cla & 0xfc) | ch : ch; // further-interindustry CLA to channel < 4: plain
  return (cla & 0x80) | 0x40 | (ch - 4);
}

/** The CLA of GET RESPONSE for a command sent with `cla`: same channel, interindustry class. */
function getResponseCla(cla: number): number {
  return (cla & 0x40) !== 0 ? 0x40 | (cla & 0x0f) : cla & 0x03;
}

/** `apdu` with its short-form Le set to `le` (0 = 256); undefined for extended or odd APDUs. */
function withLe(apdu: Buffer, le: number): Buffer | undefined {
  if (apdu.length === 4) return Buffer.concat([apdu, Buffer.from([le])]);
  if (apdu.length === 5) return Buffer.concat([apdu.subarray(0, 4), Buffer.from([le])]);
  const lc = apdu[4]!;
  if (lc === 0) return undefined;
  if (apdu.length === 5 + lc) return Buffer.concat([apdu, Buffer.from([le])]);
  if (apdu.length === 6 + lc) return Buffer.concat([apdu.subarray(0, 5 + lc), Buffer.from([le])]);
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// The modem

export interface VirtualModemOptions {
  log?: (line: string) => void;
}

export class VirtualModem {
  mode: ModemMode = 'normal';
  private quirkState: ModemQuirks = {};
  private echo = true;
  private cmee = 1;
  private simPresent = true;
  private readonly reader = new AtLineReader();
  private queue: Promise<void> = Promise.resolve();
  /** AT+CCHO session id → logical channel number. */
  private sessions = new Map<number, number>();
  private nextSession = 1;
  private urc = 0;
  private readonly log: (line: string) => void;

  constructor(
    private readonly sim: VirtualCard,
    private readonly write: (text: string) => void,
    options: VirtualModemOptions = {},
  ) {
    this.log = options.log ?? (() => {});
  }

  get quirks(): Readonly<ModemQuirks> {
    return { ...this.quirkState };
  }

  setQuirks(q: ModemQuirks): void {
    this.quirkState = { ...this.quirkState, ...q };
  }

  get simInserted(): boolean {
    return this.simPresent;
  }

  /** Takes the SIM out (AT+CSIM then answers `+CME ERROR: 10`) or puts it back (a fresh power-up). */
  setSimInserted(present: boolean): void {
    this.simPresent = present;
    this.sessions.clear();
    this.sim.reset();
  }

  /** Bytes from the host. Lines are answered in order; the promise settles when these are answered. */
  feed(chunk: Buffer | string): Promise<void> {
    const text = typeof chunk === 'string' ? chunk : chunk.toString('latin1');
    for (const { line, terminator, overflow } of this.reader.push(text)) {
      this.queue = this.queue.then(() => this.handleLine(line, terminator, overflow)).catch((e: unknown) => this.log(`modem: internal error: ${e instanceof Error ? e.message : String(e)}`));
    }
    return this.queue;
  }

  private out(text: string): void {
    if (this.mode !== 'silent') this.write(text);
  }

  private staleLine(): string {
    const lines = ['+CREG: 1', 'RING', '^RSSI: 20'];
    return `\r\n${lines[this.urc++ % lines.length]}\r\n`;
  }

  private async handleLine(line: string, terminator: string, overflow: boolean): Promise<void> {
    if (this.mode === 'silent') return;
    if (this.echo || this.quirkState.echo) this.out(line + terminator);
    if (line === '' && terminator === '\n') return; // second half of \r\n
    if (overflow) {
      this.out('\r\nERROR\r\n');
      return;
    }
    const parsed = parseAtLine(line);
    if (parsed === null) return;
    if (this.mode === 'error') {
      this.out('\r\nERROR\r\n');
      return;
    }
    const stale = this.quirkState.staleLines === true;
    if (stale) this.out(this.staleLine());
    let response: string;
    if (parsed === 'syntax') response = '\r\nERROR\r\n';
    else {
      const info: string[] = [];
      let final = 'OK';
      for (const cmd of parsed) {
        const r = await this.run(cmd, info);
        if (r !== 'OK') {
          final = r;
          break;
        }
      }
      response = (info.length > 0 ? `\r\n${info.join('\r\n')}\r\n` : '') + `\r\n${final}\r\n`;
    }
    this.out(response);
    if (stale) this.out(this.staleLine());
  }

  private cme(n: number): string {
    if (this.cmee === 0) return 'ERROR';
    if (this.cmee === 2) return `+CME ERROR: ${CME_TEXT[n] ?? 'unknown'}`;
    return `+CME ERROR: ${n}`;
  }

  /** Runs one command; pushes information text to `info`; returns the final result code. */
  private async run(cmd: AtCommand, info: string[]): Promise<string> {
    if (cmd.kind === 'basic') {
      switch (cmd.name) {
        case 'E':
          if (cmd.value !== '' && cmd.value !== '0' && cmd.value !== '1') return 'ERROR';
          this.echo = cmd.value === '1';
          return 'OK';
        case 'I':
          info.push(MODEM_MANUFACTURER, MODEM_MODEL, `Revision: ${MODEM_REVISION}`);
          return 'OK';
        case 'Z':
        case '&F':
          this.echo = true;
          this.cmee = 1;
          return 'OK';
        case 'V':
        case 'Q':
          return cmd.value === '' || cmd.value === '0' || cmd.value === '1' ? 'OK' : 'ERROR';
        default:
          return 'ERROR';
      }
    }
    const { name, form, args } = cmd;
    switch (name) {
      case '+CGMI':
        if (form === 'test') return 'OK';
        if (form !== 'exec') return 'ERROR';
        info.push(MODEM_MANUFACTURER);
        return 'OK';
      case '+CGMM':
        if (form === 'test') return 'OK';
        if (form !== 'exec') return 'ERROR';
        info.push(MODEM_MODEL);
        return 'OK';
      case '+CGMR':
        if (form === 'test') return 'OK';
        if (form !== 'exec') return 'ERROR';
        info.push(MODEM_REVISION);
        return 'OK';
      case '+CMEE': {
        if (form === 'test') {
          info.push('+CMEE: (0-2)');
          return 'OK';
        }
        if (form === 'read') {
          info.push(`+CMEE: ${this.cmee}`);
          return 'OK';
        }
        const n = form === 'exec' ? 0 : intArg(args[0]);
        if (n === undefined || n > 2 || (form === 'set' && args.length !== 1)) return 'ERROR';
        this.cmee = n;
        return 'OK';
      }
      case '+CPIN':
        if (form === 'test') return 'OK';
        if (form !== 'read') return this.cme(3);
        if (!this.simPresent) return this.cme(10);
        info.push('+CPIN: READY');
        return 'OK';
      case '+CLAC':
        if (form !== 'exec') return form === 'test' ? 'OK' : 'ERROR';
        info.push('ATE', 'ATI', 'ATZ', 'AT&F', 'AT+CGMI', 'AT+CGMM', 'AT+CGMR', 'AT+CMEE', 'AT+CPIN', 'AT+CLAC', 'AT+CSIM', 'AT+CCHO', 'AT+CCHC', 'AT+CGLA');
        return 'OK';
      case '+CSIM':
        return this.csim(form, args, info);
      case '+CCHO':
        return this.ccho(form, args, info);
      case '+CGLA':
        return this.cgla(form, args, info);
      case '+CCHC':
        return this.cchc(form, args);
      default:
        return 'ERROR';
    }
  }

  /** `<len>,"<hex>"` with len = number of hex characters, 4..MAX_APDU bytes; else undefined. */
  private apduArgs(lenArg: AtArg | undefined, hexA: AtArg | undefined): Buffer | undefined {
    const len = intArg(lenArg);
    const hex = hexArg(hexA);
    if (len === undefined || hex === undefined || hex.length !== len) return undefined;
    if (len < 8 || len > 2 * MAX_APDU) return undefined;
    return Buffer.from(hex, 'hex');
  }

  /** Sends one APDU to the SIM; unless the getResponse quirk is on, resolves 61xx and 6Cxx as modems do. */
  private async exchange(apdu: Buffer, resolve = !this.quirkState.getResponse): Promise<Buffer> {
    let raw = Buffer.from(await this.sim.transmit(apdu));
    if (!resolve) return raw;
    const parts: Buffer[] = [];
    let command = apdu;
    for (let round = 0; round < MAX_ROUNDS && raw.length >= 2; round++) {
      const sw1 = raw[raw.length - 2]!;
      const sw2 = raw[raw.length - 1]!;
      if (sw1 === 0x6c) {
        const again = withLe(command, sw2);
        if (!again) break;
        command = again;
      } else if (sw1 === 0x61) {
        parts.push(raw.subarray(0, -2));
        command = Buffer.from([getResponseCla(apdu[0]!), 0xc0, 0x00, 0x00, sw2]);
      } else break;
      raw = Buffer.from(await this.sim.transmit(command));
    }
    return Buffer.concat([...parts, raw]);
  }

  private async csim(form: string, args: AtArg[], info: string[]): Promise<string> {
    if (form === 'test') return 'OK';
    if (form !== 'set') return 'ERROR';
    const apdu = args.length === 2 ? this.apduArgs(args[0], args[1]) : undefined;
    if (!apdu) return this.cme(50);
    if (!this.simPresent) return this.cme(10);
    if (this.quirkState.cmeOnSelect && apdu[1] === 0xa4) return this.cme(3);
    const r = await this.exchange(apdu);
    info.push(`+CSIM: ${r.length * 2},"${r.toString('hex').toUpperCase()}"`);
    return 'OK';
  }

  private async ccho(form: string, args: AtArg[], info: string[]): Promise<string> {
    if (form === 'test') return 'OK';
    if (form !== 'set') return 'ERROR';
    const hex = args.length === 1 && args[0]!.quoted ? hexArg(args[0]) : undefined;
    if (hex === undefined || hex.length < 10 || hex.length > 32) return this.cme(50);
    if (!this.simPresent) return this.cme(10);
    const open = await this.exchange(Buffer.from('0070000001', 'hex'), true);
    if (open.length !== 3 || open.readUInt16BE(1) !== 0x9000) return this.cme(100);
    const ch = open[0]!;
    const aid = Buffer.from(hex, 'hex');
    const sel = await this.exchange(Buffer.concat([Buffer.from([claOnChannel(0x00, ch), 0xa4, 0x04, 0x00, aid.length]), aid, Buffer.from([0x00])]), true);
    const sw = sel.readUInt16BE(sel.length - 2);
    if (sw !== 0x9000 && sw >> 8 !== 0x62 && sw >> 8 !== 0x63) {
      await this.exchange(Buffer.from([0x00, 0x70, 0x80, ch]), true);
      return this.cme(sw === 0x6a82 ? 50 : 100);
    }
    const id = this.nextSession++;
    this.sessions.set(id, ch);
    info.push(this.quirkState.cchoBare ? String(id) : `+CCHO: ${id}`);
    return 'OK';
  }

  private async cgla(form: string, args: AtArg[], info: string[]): Promise<string> {
    if (form === 'test') return 'OK';
    if (form !== 'set') return 'ERROR';
    const id = intArg(args[0]);
    const apdu = args.length === 3 ? this.apduArgs(args[1], args[2]) : undefined;
    if (id === undefined || !apdu) return this.cme(50);
    if (!this.simPresent) return this.cme(10);
    const ch = this.sessions.get(id);
    if (ch === undefined) return this.cme(21);
    apdu[0] = claOnChannel(apdu[0]!, ch);
    const r = await this.exchange(apdu);
    info.push(`+CGLA: ${r.length * 2},"${r.toString('hex').toUpperCase()}"`);
    return 'OK';
  }

  private async cchc(form: string, args: AtArg[]): Promise<string> {
    if (form === 'test') return 'OK';
    if (form !== 'set') return 'ERROR';
    const id = args.length === 1 ? intArg(args[0]) : undefined;
    if (id === undefined) return this.cme(50);
    if (!this.simPresent) return this.cme(10);
    const ch = this.sessions.get(id);
    if (ch === undefined) return this.cme(21);
    this.sessions.delete(id);
    const r = await this.exchange(Buffer.from([0x00, 0x70, 0x80, ch]), true);
    return r.readUInt16BE(r.length - 2) === 0x9000 ? 'OK' : this.cme(100);
  }
}

// ---------------------------------------------------------------------------------------------
// Binding to the pty

export interface VirtualModemPort {
  readonly modem: VirtualModem;
  readonly device: string;
  close(): void;
}

/** Opens the DCE end of the pty pair (`device`) and answers what the host writes to the other end. */
export function openVirtualModem(device: string, sim: VirtualCard, options: VirtualModemOptions = {}): VirtualModemPort {
  const log = options.log ?? (() => {});
  const fd = fs.openSync(device, fs.constants.O_RDWR | fs.constants.O_NOCTTY);
  const stream = new tty.ReadStream(fd);
  stream.setRawMode(true);
  let closed = false;
  const modem = new VirtualModem(
    sim,
    (text) => {
      if (!closed) stream.write(Buffer.from(text, 'latin1'));
    },
    { log },
  );
  stream.on('data', (chunk: Buffer) => void modem.feed(chunk));
  stream.on('error', (e) => {
    if (!closed) log(`modem: ${device}: ${e.message}`);
  });
  return {
    modem,
    device,
    close(): void {
      closed = true;
      stream.destroy();
    },
  };
}
