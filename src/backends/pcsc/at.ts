/**
 * The AT command codec for reaching a SIM through a cellular modem (3GPP TS 27.007): command
 * builders for `+CSIM` (generic SIM access, 8.17), `+CCHO` / `+CGLA` / `+CCHC` (logical channels,
 * 8.45 / 8.43 / 8.46), and a line-based response reader that copes with what real modems send:
 * command echo, unsolicited result codes (`RING`, `+CREG: 1`, …) between the lines, stale lines,
 * garbage bytes, and `+CME ERROR: <n|text>` final results. Pure code: no I/O, no timers.
 */
import { SealError, type ErrorCode } from '../../core/errors.js';

/** Upper-case hex, the form modems expect in AT strings. */
function hex(b: Buffer): string {
  return b.toString('hex').toUpperCase();
}

/** `AT+CSIM=<2×len>,"<hex APDU>"` (no line terminator; the transport adds CR). */
export function csim(apdu: Buffer): string {
  return `AT+CSIM=${apdu.length * 2},"${hex(apdu)}"`;
}

/** `AT+CCHO="<hex AID>"`: the modem opens a logical channel and selects the AID on it. */
export function ccho(aid: Buffer): string {
  return `AT+CCHO="${hex(aid)}"`;
}

/** `AT+CGLA=<session>,<2×len>,"<hex APDU>"`: an APDU on a channel opened with +CCHO. */
export function cgla(session: number, apdu: Buffer): string {
  return `AT+CGLA=${checkSession(session)},${apdu.length * 2},"${hex(apdu)}"`;
}

/** `AT+CCHC=<session>`: closes a channel opened with +CCHO. */
export function cchc(session: number): string {
  return `AT+CCHC=${checkSession(session)}`;
}

function checkSession(session: number): number {
  if (!Number.isInteger(session) || session < 0 || session > 0xffffffff) {
    throw new SealError('INVALID_ARGUMENT', `invalid modem channel session id ${String(session)}`);
  }
  return session;
}

/** Longest line the reader keeps: a +CSIM answer of 65538 bytes in hex plus its prefix. */
export const MAX_AT_LINE = 2 * 65538 + 64;

/**
 * Splits the modem's byte stream into lines (CR, LF or both end a line; empty lines vanish).
 * Control characters inside a line (NUL after power-up, stray bytes on a noisy line) are dropped
 * and the line trimmed. A line longer than MAX_AT_LINE is DEVICE_ERROR (the buffer is cleared, so
 * the reader recovers at the next line end).
 */
export class AtLineReader {
  private partial = '';
  /** After an overlong line: the rest of it, up to its line end, is dropped. */
  private discarding = false;

  push(chunk: Buffer | string): string[] {
    const text = typeof chunk === 'string' ? chunk : chunk.toString('latin1');
    const pieces = (this.partial + text).split(/\r\n|\r|\n/);
    this.partial = pieces.pop() ?? '';
    if (this.discarding && pieces.length > 0) {
      pieces.shift();
      this.discarding = false;
    }
    if (this.discarding) this.partial = '';
    if (this.partial.length > MAX_AT_LINE) {
      this.partial = '';
      this.discarding = true;
      throw new SealError('DEVICE_ERROR', `the modem sent a line longer than ${MAX_AT_LINE} characters`);
    }
    const out: string[] = [];
    for (const p of pieces) {
      if (p.length > MAX_AT_LINE) throw new SealError('DEVICE_ERROR', `the modem sent a line longer than ${MAX_AT_LINE} characters`);
      const line = p.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '').trim();
      if (line.length > 0) out.push(line);
    }
    return out;
  }

  /** Forgets a partial line (after a timeout, before the next command). */
  reset(): void {
    this.partial = '';
    this.discarding = false;
  }
}

// 3GPP TS 27.007 clause 9.2.1 (general +CME ERROR codes): the ones a SIM access can meet.
const CME: ReadonlyMap<number, readonly [ErrorCode, string]> = new Map<number, readonly [ErrorCode, string]>([
  [0, ['DEVICE_ERROR', 'phone failure']],
  [3, ['NOT_SUPPORTED', 'operation not allowed']],
  [4, ['NOT_SUPPORTED', 'operation not supported']],
  [5, ['DEVICE_UNAVAILABLE', 'PH-SIM PIN required']],
  [10, ['DEVICE_UNAVAILABLE', 'SIM not inserted']],
  [11, ['DEVICE_UNAVAILABLE', 'SIM PIN required (unlock the SIM with AT+CPIN first)']],
  [12, ['DEVICE_UNAVAILABLE', 'SIM PUK required']],
  [13, ['DEVICE_UNAVAILABLE', 'SIM failure']],
  [14, ['DEVICE_ERROR', 'SIM busy']],
  [15, ['DEVICE_ERROR', 'SIM wrong']],
  [17, ['DEVICE_UNAVAILABLE', 'SIM PIN2 required']],
  [18, ['DEVICE_UNAVAILABLE', 'SIM PUK2 required']],
  [20, ['DEVICE_ERROR', 'memory full']],
  [21, ['INVALID_ARGUMENT', 'invalid index']],
  [22, ['OBJECT_NOT_FOUND', 'not found']],
  [23, ['DEVICE_ERROR', 'memory failure']],
  [24, ['DATA_TOO_LARGE', 'text string too long']],
  [50, ['INVALID_ARGUMENT', 'incorrect parameters']],
  [100, ['DEVICE_ERROR', 'unknown']],
]);

/** Verbose (`AT+CMEE=2`) texts back to their numbers. */
const CME_TEXT = new Map<string, number>([...CME.entries()].map(([n, [, text]]) => [text.split(' (')[0]!.toLowerCase(), n]));

/**
 * The SealError for a `+CME ERROR: <n>` or `+CME ERROR: <text>` line (backendCode `CME_<n>`,
 * or `CME_TEXT` for a text the table does not know).
 */
export function cmeError(line: string, what = 'modem command'): SealError {
  const arg = line.replace(/^\+CME ERROR:?\s*/i, '').trim();
  let n: number | undefined;
  if (/^\d{1,5}$/.test(arg)) n = Number(arg);
  else n = CME_TEXT.get(arg.toLowerCase());
  if (n !== undefined) {
    const known = CME.get(n);
    const [code, text] = known ?? (['DEVICE_ERROR', 'modem error'] as const);
    return new SealError(code, `${what}: the modem answered +CME ERROR ${n} (${text})`, { backendCode: `CME_${n}`, backendStatus: n });
  }
  const safe = arg.replace(/[^\x20-\x7e]/g, '?').slice(0, 60);
  return new SealError('DEVICE_ERROR', `${what}: the modem answered +CME ERROR "${safe}"`, { backendCode: 'CME_TEXT' });
}

/** Final result codes (V.250 / 27.007) that end a command without `OK`. */
const FAILURE_CODES = new Set(['ERROR', 'NO CARRIER', 'BUSY', 'NO ANSWER', 'NO DIALTONE']);

/**
 * Unsolicited result codes and boot chatter that may appear at any time. Lines with a `+X:`
 * prefix other than the one a command expects are ignored anyway; this list matters for commands
 * whose answer is free text (ATI, AT+CGMI).
 */
const UNSOLICITED = /^(RING|RDY|SMS Ready|Call Ready|PB DONE|POWERED DOWN|NORMAL POWER DOWN|\+[A-Z0-9]+:|\^[A-Z0-9]+|\*[A-Z0-9]+|#[A-Z0-9]+)/i;

export function isUnsolicited(line: string): boolean {
  return UNSOLICITED.test(line);
}

/** The outcome of a command once its final result code has arrived. */
export type AtOutcome =
  | { done: false }
  | { done: true; ok: true; lines: string[] }
  | { done: true; ok: false; error: SealError };

/**
 * Collects the answer to one command, line by line. Keeps the information lines that belong to
 * the command (those with its `+NAME:` prefix; for `+CCHO` also a bare session number; for basic
 * commands such as ATI any line that is neither echo nor unsolicited) and stops at the final
 * result code. Echo of the command and of any other AT command line is skipped.
 */
export class AtResponseCollector {
  private readonly prefix: string | undefined;
  private readonly bareNumber: boolean;
  private readonly lines: string[] = [];
  private outcome: AtOutcome = { done: false };

  constructor(
    readonly command: string,
    private readonly what = 'modem command',
  ) {
    // Extended commands: AT+NAME=..., AT+NAME?, AT+NAME=?, AT+NAME → information lines "+NAME: ...".
    const m = /^AT(\+[A-Z0-9]+)/i.exec(command.trim());
    this.prefix = m ? `${m[1]!.toUpperCase()}:` : undefined;
    this.bareNumber = this.prefix === '+CCHO:';
  }

  get done(): boolean {
    return this.outcome.done;
  }

  /** Feeds one line (already split by AtLineReader); returns the outcome so far. */
  push(line: string): AtOutcome {
    if (this.outcome.done) return this.outcome;
    const upper = line.toUpperCase();
    if (upper.startsWith('AT')) return this.outcome; // echo (ours or a stale one)
    if (upper === 'OK') {
      this.outcome = { done: true, ok: true, lines: this.lines };
    } else if (FAILURE_CODES.has(upper)) {
      this.outcome = {
        done: true,
        ok: false,
        error: new SealError('DEVICE_ERROR', `${this.what}: the modem answered ${upper}`, { backendCode: `AT_${upper.replace(/ /g, '_')}` }),
      };
    } else if (upper.startsWith('+CME ERROR')) {
      this.outcome = { done: true, ok: false, error: cmeError(line, this.what) };
    } else if (upper.startsWith('+CMS ERROR')) {
      const n = line.replace(/^\+CMS ERROR:?\s*/i, '').replace(/[^\x20-\x7e]/g, '?').slice(0, 20);
      this.outcome = { done: true, ok: false, error: new SealError('DEVICE_ERROR', `${this.what}: the modem answered +CMS ERROR ${n}`, { backendCode: `CMS_${n}` }) };
    } else if (this.prefix !== undefined) {
      if (upper.startsWith(this.prefix) || (this.bareNumber && /^\d{1,10}$/.test(line))) this.lines.push(line);
    } else if (!isUnsolicited(line)) {
      this.lines.push(line);
    }
    return this.outcome;
  }
}

function malformed(what: string, detail: string): SealError {
  return new SealError('DEVICE_ERROR', `${what}: malformed modem response (${detail})`);
}

/**
 * Parses `+CSIM: <len>,"<hex>"` (or `+CGLA:` with `prefix`) from the information lines of a
 * command that ended in OK: the last such line wins (earlier ones are stale). The quotes are
 * optional (some modems leave them out); `<len>` must equal the number of hex digits, which must
 * be even and at least 4 (SW1 SW2). Returns the response bytes: data ‖ SW1 SW2.
 */
export function parseSimResponse(lines: readonly string[], prefix: '+CSIM' | '+CGLA' = '+CSIM', what = `${prefix.slice(1)} response`): Buffer {
  const tag = `${prefix}:`;
  const line = [...lines].reverse().find((l) => l.toUpperCase().startsWith(tag));
  if (line === undefined) throw malformed(what, `no ${prefix} line`);
  const m = /^\s*(\d{1,6})\s*,\s*(?:"([0-9A-Fa-f]*)"|([0-9A-Fa-f]*))\s*$/.exec(line.slice(tag.length));
  if (!m) throw malformed(what, `unreadable ${prefix} line`);
  const len = Number(m[1]);
  const digits = m[2] ?? m[3] ?? '';
  if (digits.length !== len) throw malformed(what, `length ${len} but ${digits.length} hex digits`);
  if (digits.length % 2 !== 0) throw malformed(what, 'odd number of hex digits');
  if (digits.length < 4) throw malformed(what, 'no status word');
  return Buffer.from(digits, 'hex');
}

/** The session id from the answer to AT+CCHO: `+CCHO: <id>` or a bare `<id>` line. */
export function parseCchoResponse(lines: readonly string[], what = 'CCHO response'): number {
  for (const l of [...lines].reverse()) {
    const m = /^(?:\+CCHO:\s*)?"?(\d{1,10})"?\s*$/i.exec(l);
    if (m) {
      const id = Number(m[1]);
      if (id <= 0xffffffff) return id;
    }
  }
  throw malformed(what, 'no session id');
}

/** The text of an identification answer (ATI, AT+CGMI, AT+CGMM), `+CGMI: ` prefixes removed. */
export function identityText(lines: readonly string[]): string {
  return lines
    .map((l) => l.replace(/^\+[A-Z]+:\s*/i, '').replace(/^"(.*)"$/, '$1'))
    .join(' ')
    .replace(/[^\x20-\x7e]/g, '')
    .trim()
    .slice(0, 200);
}
