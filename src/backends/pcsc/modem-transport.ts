/**
 * The modem implementation of ApduTransport: a SIM reached through a cellular modem's AT command
 * port (3GPP TS 27.007 `+CSIM`, and `+CCHO` / `+CGLA` / `+CCHC` for logical channels), over a
 * serial line opened with the `serialport` package (imported lazily).
 *
 * One AT command is in flight at a time. Each command has a deadline (`timeoutMs`, default
 * 10 s): a modem that stays silent gives SealError('TIMEOUT'), after which the line is drained
 * before the next command so a late answer is not taken for the next one. Echo (`ATE0` is sent,
 * but echo is tolerated anyway), unsolicited lines and garbage are skipped by the AT codec. The
 * modem may or may not resolve `61xx` itself: the same ISO response handling as PC/SC runs over
 * CSIM and CGLA. Logical channels use AT+CCHO/CGLA/CCHC when the modem has them, else MANAGE
 * CHANNEL through AT+CSIM.
 */
import { SealError, isSealError } from '../../core/errors.js';
import { openedOrClosed, type CardChannel, type ResponseApdu, type TransportInfo, type ApduTransport } from './transport.js';
import { ExclusiveLock, SerialQueue, onChannel, withIsoResponseHandling } from './apdu.js';
import { AtLineReader, AtResponseCollector, type AtOutcome, ccho, cchc, cgla, csim, identityText, parseCchoResponse, parseSimResponse } from './at.js';
import { GenerationChannel, closeChannel, selectApplet, staleChannel, type ChannelHost } from './pcsc-transport.js';

export interface ModemTransportOptions {
  /** Serial device of the modem's AT port, e.g. /dev/ttyUSB2. */
  port: string;
  /** Line speed (default 115200). */
  baud?: number;
  /** Deadline of each AT command (default 10000 ms). */
  timeoutMs?: number;
}

export interface ModemTransport extends ApduTransport {
  readonly info: TransportInfo;
  /** Incremented when the SIM came back after it was reported missing: re-select applets. */
  readonly generation: number;
  /** Manufacturer / model / revision as the modem reports them (ATI, AT+CGMI, AT+CGMM). */
  readonly identity: string;
  /** AT+CCHO / AT+CGLA are used for logical channels (else MANAGE CHANNEL through AT+CSIM). */
  readonly usesCcho: boolean;
  /** Always false: short APDUs only (many modems cap AT+CSIM at 261 bytes); drivers chain. */
  readonly extendedLength: boolean;
}

/** The part of a serial port the transport uses (a seam over `serialport`). */
export interface SerialLine {
  write(data: string): Promise<void>;
  onData(cb: (chunk: Buffer) => void): void;
  onClose(cb: (err?: Error) => void): void;
  close(): Promise<void>;
}

const DEFAULT_TIMEOUT_MS = 10_000;
/** Quiet time that ends the drain after a timeout. */
const DRAIN_QUIET_MS = 150;

async function openSerialLine(path: string, baudRate: number): Promise<SerialLine> {
  let SerialPort: typeof import('serialport').SerialPort;
  try {
    ({ SerialPort } = await import('serialport'));
  } catch (e) {
    throw new SealError('BACKEND_UNAVAILABLE', `the serial port binding (serialport) could not be loaded (${e instanceof Error ? e.message.split('\n')[0] : String(e)})`, { cause: e });
  }
  const port = new SerialPort({ path, baudRate, autoOpen: false });
  await new Promise<void>((resolve, reject) => {
    port.open((err) => (err ? reject(new SealError('DEVICE_UNAVAILABLE', `cannot open serial port ${path}: ${err.message}`, { cause: err })) : resolve()));
  });
  // Errors after open also arrive as 'close' (with the error) or as a failed write.
  port.on('error', () => undefined);
  return {
    write: (data) =>
      new Promise<void>((resolve, reject) => {
        port.write(data, 'latin1', (err) => {
          if (err) reject(new SealError('DEVICE_UNAVAILABLE', `writing to serial port ${path} failed: ${err.message}`, { cause: err }));
          else port.drain((e) => (e ? reject(new SealError('DEVICE_UNAVAILABLE', `writing to serial port ${path} failed: ${e.message}`, { cause: e })) : resolve()));
        });
      }),
    onData: (cb) => port.on('data', cb),
    onClose: (cb) => port.on('close', (err?: Error | null) => cb(err ?? undefined)),
    close: () =>
      new Promise<void>((resolve) => {
        if (!port.isOpen) return resolve();
        port.close(() => resolve());
      }),
  };
}

/**
 * Opens the modem on `options.port`, probes it (AT, ATE0, AT+CMEE=1, identity, AT+CSIM=?,
 * AT+CCHO=?) and returns the transport. TIMEOUT when the modem does not answer within
 * `timeoutMs`; DEVICE_UNAVAILABLE when the port cannot be opened.
 */
export async function openModemTransport(options: ModemTransportOptions): Promise<ModemTransport> {
  const line = await openSerialLine(options.port, options.baud ?? 115200);
  return openModemTransportOn(line, options);
}

/** The same over an already open line (tests, or a line other than a local serial port). */
export async function openModemTransportOn(line: SerialLine, options: ModemTransportOptions): Promise<ModemTransport> {
  return openedOrClosed(new AtModemTransport(line, options), (t) => t.probe());
}

interface Pending {
  collector: AtResponseCollector;
  settle: (o: AtOutcome & { done: true }) => void;
  fail: (e: SealError) => void;
}

class AtModemTransport implements ModemTransport, ChannelHost {
  readonly info: TransportInfo;
  generation = 1;
  identity = '';
  usesCcho = false;
  readonly extendedLength = false;

  private readonly reader = new AtLineReader();
  private readonly commands = new SerialQueue();
  private readonly exchanges = new SerialQueue();
  private readonly lock = new ExclusiveLock();
  private readonly timeoutMs: number;
  private pending: Pending | undefined;
  private lastData = 0;
  private needsDrain = false;
  private portClosed = false;
  private closed = false;
  /** Set when the modem reported the SIM missing; the next success is a new SIM session. */
  private simLost = false;
  /** CCHO session id → the channel number used in CLA. */
  private readonly sessions = new Map<number, number>();

  constructor(
    private readonly line: SerialLine,
    options: ModemTransportOptions,
  ) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.info = { kind: 'at', name: options.port };
    line.onData((chunk) => this.onData(chunk));
    line.onClose(() => {
      this.portClosed = true;
      this.pending?.fail(new SealError('DEVICE_UNAVAILABLE', `serial port ${this.info.name} closed`));
    });
  }

  private onData(chunk: Buffer): void {
    this.lastData = Date.now();
    let lines: string[];
    try {
      lines = this.reader.push(chunk);
    } catch (e) {
      this.pending?.fail(isSealError(e) ? e : new SealError('DEVICE_ERROR', 'unreadable modem output'));
      return;
    }
    for (const l of lines) {
      const p = this.pending;
      if (!p) continue; // unsolicited or stale: nobody asked
      const o = p.collector.push(l);
      if (o.done) p.settle(o);
    }
  }

  /** After a timeout: wait until the line has been quiet for a moment, dropping what arrives. */
  private async drain(): Promise<void> {
    const deadline = Date.now() + this.timeoutMs;
    while (Date.now() - this.lastData < DRAIN_QUIET_MS && Date.now() < deadline) {
      await sleep(DRAIN_QUIET_MS / 3);
    }
    this.reader.reset();
    this.needsDrain = false;
  }

  /** Sends one AT command and collects its answer; one at a time. */
  private command(cmd: string, what: string): Promise<string[]> {
    return this.commands.run(async () => {
      if (this.closed) throw new SealError('CLOSED', 'the modem transport is closed');
      if (this.portClosed) throw new SealError('DEVICE_UNAVAILABLE', `serial port ${this.info.name} is closed`);
      if (this.needsDrain) await this.drain();
      const outcome = await new Promise<AtOutcome & { done: true }>((resolve, reject) => {
        const timer = setTimeout(() => {
          this.pending = undefined;
          this.needsDrain = true;
          reject(new SealError('TIMEOUT', `${what}: the modem did not answer within ${this.timeoutMs} ms`));
        }, this.timeoutMs);
        this.pending = {
          collector: new AtResponseCollector(cmd, what),
          settle: (o) => {
            clearTimeout(timer);
            this.pending = undefined;
            resolve(o);
          },
          fail: (e) => {
            clearTimeout(timer);
            this.pending = undefined;
            this.needsDrain = true;
            reject(e);
          },
        };
        this.line.write(`${cmd}\r`).catch((e: unknown) => this.pending?.fail(isSealError(e) ? e : new SealError('DEVICE_UNAVAILABLE', 'writing to the serial port failed', { cause: e })));
      });
      if (!outcome.ok) {
        if (outcome.error.backendCode === 'CME_10' || outcome.error.backendCode === 'CME_13') this.simLost = true;
        throw outcome.error;
      }
      if (this.simLost) {
        // The SIM answers again after it was reported missing: whatever was selected is gone.
        this.simLost = false;
        this.generation += 1;
        this.sessions.clear();
      }
      return outcome.lines;
    });
  }

  async probe(): Promise<void> {
    // First contact: a modem may answer the very first line with ERROR (line noise) — retry once.
    try {
      await this.command('AT', 'modem probe (AT)');
    } catch (e) {
      if (!isSealError(e) || e.code === 'TIMEOUT' || e.code === 'DEVICE_UNAVAILABLE' || e.code === 'CLOSED') throw e;
      await this.command('AT', 'modem probe (AT)');
    }
    await this.optional('ATE0', 'disabling echo (ATE0)');
    await this.optional('AT+CMEE=1', 'numeric errors (AT+CMEE=1)');
    const parts: string[] = [];
    for (const cmd of ['AT+CGMI', 'AT+CGMM', 'ATI']) {
      const lines = await this.optional(cmd, `identity (${cmd})`);
      const text = lines ? identityText(lines) : '';
      if (!text || parts.some((p) => p.includes(text))) continue;
      // ATI often repeats what +CGMI / +CGMM said: keep the longer text only
      for (let i = parts.length - 1; i >= 0; i--) if (text.includes(parts[i]!)) parts.splice(i, 1);
      parts.push(text);
    }
    this.identity = parts.join(' / ');
    // +CSIM is required: without it there is no APDU path at all.
    try {
      await this.command('AT+CSIM=?', 'checking AT+CSIM support');
    } catch (e) {
      if (isSealError(e) && (e.code === 'TIMEOUT' || e.code === 'DEVICE_UNAVAILABLE')) throw e;
      // Some modems reject the test form but accept the command itself: find out on first use.
    }
    const cchoOk = (await this.optional('AT+CCHO=?', 'checking AT+CCHO support')) !== undefined;
    const cglaOk = cchoOk && (await this.optional('AT+CGLA=?', 'checking AT+CGLA support')) !== undefined;
    this.usesCcho = cchoOk && cglaOk;
  }

  /** A command whose failure (other than silence or a lost port) only means "not available". */
  private async optional(cmd: string, what: string): Promise<string[] | undefined> {
    try {
      return await this.command(cmd, what);
    } catch (e) {
      if (isSealError(e) && (e.code === 'TIMEOUT' || e.code === 'DEVICE_UNAVAILABLE' || e.code === 'CLOSED')) throw e;
      return undefined;
    }
  }

  private async csimRaw(apdu: Buffer): Promise<Buffer> {
    return parseSimResponse(await this.command(csim(apdu), 'AT+CSIM'), '+CSIM', 'AT+CSIM');
  }

  private async cglaRaw(session: number, apdu: Buffer): Promise<Buffer> {
    return parseSimResponse(await this.command(cgla(session, apdu), 'AT+CGLA'), '+CGLA', 'AT+CGLA');
  }

  /** One complete exchange over CSIM (61xx / 6Cxx resolved), never interleaved with another. */
  private exchange(apdu: Buffer): Promise<ResponseApdu> {
    return this.exchanges.run(() => withIsoResponseHandling((a) => this.csimRaw(a), apdu));
  }

  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.lock.run(fn);
  }

  transmit(apdu: Buffer): Promise<ResponseApdu> {
    return this.exclusive(() => this.exchange(apdu));
  }

  select(aid: Buffer, options: { logical?: boolean } = {}): Promise<{ channel: CardChannel; response: ResponseApdu }> {
    return this.exclusive(async () => {
      if (options.logical === true && this.usesCcho) {
        const opened = await this.openWithCcho(aid);
        if (opened) return opened;
      }
      const generation = this.generation;
      const { number, response } = await selectApplet((a) => this.exchange(a), aid, options.logical === true);
      return { channel: new GenerationChannel(this, number, generation), response };
    });
  }

  /**
   * AT+CCHO: the modem opens the channel and selects the AID itself. Its SELECT response is not
   * reported by 27.007, so `response` is a bare 9000. Undefined when the modem refuses CCHO as
   * not allowed / not supported (then MANAGE CHANNEL through CSIM is used from now on).
   */
  private async openWithCcho(aid: Buffer): Promise<{ channel: CardChannel; response: ResponseApdu } | undefined> {
    if (aid.length < 1 || aid.length > 16) throw new SealError('INVALID_ARGUMENT', `an AID has 1 to 16 bytes, got ${aid.length}`);
    let session: number;
    try {
      session = parseCchoResponse(await this.command(ccho(aid), `AT+CCHO ${aid.toString('hex').toUpperCase()}`));
    } catch (e) {
      if (isSealError(e) && (e.backendCode === 'CME_3' || e.backendCode === 'CME_4')) {
        this.usesCcho = false;
        return undefined;
      }
      if (isSealError(e) && e.backendCode === 'CME_50') {
        // The AID itself is well-formed (checked above): "incorrect parameters" is the SIM
        // refusing the SELECT, which modems report this way when the applet is absent.
        throw new SealError('OBJECT_NOT_FOUND', `AT+CCHO: no applet ${aid.toString('hex').toUpperCase()} on the SIM (+CME ERROR 50)`, { backendCode: 'CME_50', backendStatus: 50, cause: e });
      }
      throw e;
    }
    // 27.007 leaves the session id opaque; modems use the channel number. The CLA must carry the
    // channel on the SIM, so ids outside 1..19 leave the class byte as the driver wrote it.
    this.sessions.set(session, session >= 1 && session <= 19 ? session : 0);
    const generation = this.generation;
    const host: ChannelHost = {
      get generation() {
        return generation;
      },
      channelTransmit: (_n, gen, apdu) => this.cglaTransmit(session, gen, apdu),
      channelClose: (_n, gen) => this.cchoClose(session, gen),
    };
    return { channel: new GenerationChannel(host, this.sessions.get(session) || session, generation), response: { data: Buffer.alloc(0), sw: 0x9000 } };
  }

  private cglaTransmit(session: number, generation: number, apdu: Buffer): Promise<ResponseApdu> {
    return this.exclusive(async () => {
      if (generation !== this.generation || !this.sessions.has(session)) throw staleChannel(session);
      const channel = this.sessions.get(session) ?? 0;
      return this.exchanges.run(() => withIsoResponseHandling((a) => this.cglaRaw(session, a), onChannel(apdu, channel)));
    });
  }

  private async cchoClose(session: number, generation: number): Promise<void> {
    await this.exclusive(async () => {
      if (generation !== this.generation || !this.sessions.delete(session)) return;
      try {
        await this.command(cchc(session), 'AT+CCHC');
      } catch (e) {
        if (isSealError(e) && (e.code === 'DEVICE_UNAVAILABLE' || e.code === 'CLOSED')) return;
        throw e;
      }
    });
  }

  channelTransmit(number: number, generation: number, apdu: Buffer): Promise<ResponseApdu> {
    return this.exclusive(async () => {
      if (generation !== this.generation) throw staleChannel(number);
      return this.exchange(onChannel(apdu, number));
    });
  }

  channelClose(number: number, generation: number): Promise<void> {
    return closeChannel(this, number, generation, (a) => this.exchange(a));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const finish = async (): Promise<void> => {
      // Best effort: give back the channels this transport opened with CCHO.
      for (const session of [...this.sessions.keys()]) {
        await this.cchoClose(session, this.generation).catch(() => undefined);
      }
      this.closed = true;
      this.pending?.fail(new SealError('CLOSED', 'the modem transport is closed'));
      await this.line.close();
    };
    if (this.lock.held()) await finish();
    else await this.lock.run(finish);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
