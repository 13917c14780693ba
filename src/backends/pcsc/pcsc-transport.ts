/**
 * The PC/SC implementation of ApduTransport: a card in a reader of the local pcsc-lite daemon,
 * reached through the project's own N-API shim over libpcsclite (native-shims/pcsc,
 * pcsc-native.ts).
 *
 * - The shim is loaded lazily, inside openPcscTransport, so a machine without pcscd or
 *   libpcsclite still loads seal-bridge and its other backends.
 * - Every card call runs on the shim's worker thread; nothing here blocks the event loop.
 *   Waiting for a card (`waitForCard`) runs on a second PC/SC context, so it never holds up
 *   the card I/O, and close() cancels it.
 * - `exclusive(fn)` holds a PC/SC transaction (SCardBeginTransaction) on a shared connection,
 *   so other processes (OpenSC, yubico-piv-tool) can use the card between our operations but
 *   never between the commands of one operation. Each `transmit` is such an operation on its
 *   own, so `61xx` GET RESPONSE sequences are never interleaved.
 * - Card removal makes the next call fail with DEVICE_UNAVAILABLE ('card removed …'); the call
 *   after that reconnects by itself and increments `generation`. Channels opened before a
 *   reconnection answer SESSION_LOST: the applet has to be selected again.
 * - A restarted pcscd invalidates the PC/SC context itself: every call answers
 *   SCARD_E_NO_SERVICE, SCARD_E_SERVICE_STOPPED or SCARD_E_INVALID_HANDLE for good (the call the
 *   daemon went away under may answer SCARD_W_SECURITY_VIOLATION). The context is released and
 *   a new one established at the next call, which reconnects to the card (a new `generation`).
 *   Found when an operation starts its transaction, nothing of it sent yet, this is transparent;
 *   in the middle of an operation that one operation fails with DEVICE_UNAVAILABLE.
 *   `contextRestarts` counts the new contexts.
 */
import { SealError, isSealError } from '../../core/errors.js';
import { openedOrClosed, type ApduTransport, type CardChannel, type ResponseApdu, type TransportInfo } from './transport.js';
import {
  ExclusiveLock,
  SerialQueue,
  atrSupportsExtendedLength,
  commandApdu,
  expectOk,
  onChannel,
  statusError,
  withIsoResponseHandling,
} from './apdu.js';
import { PNP_NOTIFICATION, SCARD, loadPcscShim, scardCode, scardName, type PcscContext, type PcscShim } from './pcsc-native.js';

export interface PcscTransportOptions {
  /** Reader name, exactly or as a unique substring. Omitted: the one reader holding a card. */
  reader?: string;
  /** Bound on `waitForCard` (default 5000 ms). The reader list is read at once at open. */
  timeoutMs?: number;
  /**
   * What happens to the card when the transport closes: `reset` (default) drops the security
   * status (a verified PIN) so no other application inherits it; `leave` keeps it.
   */
  disposition?: 'reset' | 'leave';
}

export interface PcscTransport extends ApduTransport {
  readonly info: TransportInfo;
  /** Incremented at each (re)connection to the card: a driver re-selects its applet when it changes. */
  readonly generation: number;
  /** True when the card (ATR card capabilities) and protocol (T=1) take extended-length APDUs. */
  readonly extendedLength: boolean;
  /** PC/SC contexts established anew after the daemon went away (a pcscd restart). */
  readonly contextRestarts: number;
  /** Resolves when a card is present in the reader; TIMEOUT after `timeoutMs`. */
  waitForCard(timeoutMs?: number): Promise<void>;
}

const DEFAULT_TIMEOUT_MS = 5000;
/** The protocols offered at connect: the reader and card settle on one. */
const PROTOCOLS = SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1;
/** Longest single SCardGetStatusChange of `waitForCard` (it is cancelled earlier when done). */
const WATCH_SLICE_MS = 5000;

/** Loads the shim once; BACKEND_UNAVAILABLE with the reason when it cannot load. */
function loadBinding(): PcscShim {
  try {
    return loadPcscShim();
  } catch (e) {
    throw new SealError('BACKEND_UNAVAILABLE', `the PC/SC binding could not be loaded: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`, { cause: e });
  }
}

/**
 * Answers of a PC/SC context whose daemon is gone (restarted): the context is dead for good.
 * libpcsclite reports a daemon that closed the connection under a call as SecurityViolation
 * (what pcscd's polkit check does to a client it refuses, too).
 */
const SERVICE_LOST = new Set(['NoService', 'ServiceStopped', 'InvalidHandle', 'SecurityViolation']);

function serviceLost(e: unknown): boolean {
  const name = scardName(e);
  return name !== undefined && SERVICE_LOST.has(name);
}

const UNAVAILABLE_CODES = new Set(['NoService', 'ServiceStopped', 'NoReadersAvailable', 'UnknownReader', 'ReaderUnavailable', 'NoSmartCard', 'RemovedCard', 'UnpoweredCard', 'UnresponsiveCard', 'SharingViolation', 'NotReady', 'CommError', 'CommDataLost']);

function mapPcscError(e: unknown, what: string): SealError {
  if (isSealError(e)) return e;
  const code = scardName(e);
  const opts = { backendCode: code ? `PCSC_${code}` : undefined, backendStatus: scardCode(e), cause: e };
  switch (code) {
    case 'NoService':
    case 'ServiceStopped':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: the PC/SC daemon is not reachable (is pcscd running?)`, opts);
    case 'SecurityViolation':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: the PC/SC daemon closed the connection (restarted, or refused this client)`, opts);
    case 'RemovedCard':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: card removed from the reader`, opts);
    case 'NoSmartCard':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: no card in the reader`, opts);
    case 'SharingViolation':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: another application holds the card exclusively`, opts);
    case 'Timeout':
    case 'WaitedTooLong':
      return new SealError('TIMEOUT', `${what}: the PC/SC call timed out`, opts);
    default:
      if (code !== undefined && UNAVAILABLE_CODES.has(code)) return new SealError('DEVICE_UNAVAILABLE', `${what}: ${code}`, opts);
      return new SealError('DEVICE_ERROR', `${what}: ${code ?? (e instanceof Error ? e.message : String(e))}`, opts);
  }
}

/** A card present and answering, by SCARD_STATE_* flags. */
function cardPresent(state: number | undefined): boolean {
  return state !== undefined && (state & SCARD.STATE_PRESENT) !== 0 && (state & SCARD.STATE_MUTE) === 0;
}

/**
 * Opens a PC/SC transport to the card in `options.reader`. DEVICE_UNAVAILABLE when pcscd is
 * not running, the reader is absent (the message lists the readers) or holds no card.
 */
export async function openPcscTransport(options: PcscTransportOptions = {}): Promise<PcscTransport> {
  const pcsc = loadBinding();
  return openedOrClosed(new PcscCardTransport(pcsc, options), (t) => t.open());
}

/** Our connection to the card: the shim's handle id and the protocol in use. */
interface CardConnection {
  handle: number;
  protocol: number;
}

class PcscCardTransport implements PcscTransport {
  info: TransportInfo = { kind: 'pcsc', name: '' };
  generation = 0;
  extendedLength = false;
  contextRestarts = 0;

  /** Card I/O: connect, transmit, transactions; replaced when the daemon went away. */
  private io: PcscContext;
  /** The context `io` is dead (its daemon restarted): establish a new one before the next call. */
  private ioLost = false;
  /** Reader events for waitForCard, opened at the first wait. */
  private watcher: PcscContext | undefined;
  private readonly lock = new ExclusiveLock();
  private readonly exchanges = new SerialQueue();
  private readonly timeoutMs: number;
  private readonly waiters = new Set<() => void>();
  private readerName = '';
  private card: CardConnection | undefined;
  private closed = false;
  /** Last state of the reader seen by the watch loop; current only while `watching`. */
  private readerState: number | undefined;
  private watching = false;
  private watchError: SealError | undefined;

  constructor(
    private readonly pcsc: PcscShim,
    private readonly options: PcscTransportOptions,
  ) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.io = new pcsc.Context();
  }

  async open(): Promise<void> {
    try {
      await this.io.open();
    } catch (e) {
      throw mapPcscError(e, 'PC/SC');
    }
    const states = await this.readerStates();
    this.readerName = this.chooseReader(states);
    this.info = { kind: 'pcsc', name: this.readerName };
    await this.lock.run(async () => {
      await this.connected();
    });
  }

  /** Every reader with its SCARD_STATE_* flags, as pcscd knows them now. */
  private async readerStates(): Promise<Map<string, number>> {
    let names: string[];
    try {
      names = await this.io.listReaders();
    } catch (e) {
      if (scardName(e) === 'NoReadersAvailable') return new Map();
      throw mapPcscError(e, 'listing the PC/SC readers');
    }
    if (names.length === 0) return new Map();
    let states: { eventState: number }[];
    try {
      // UNAWARE for every reader: answers at once with the current states
      states = await this.io.getStatusChange(names, names.map(() => SCARD.STATE_UNAWARE), 0);
    } catch (e) {
      throw mapPcscError(e, 'reading the PC/SC reader states');
    }
    const out = new Map<string, number>();
    names.forEach((n, i) => {
      const s = states[i]!.eventState;
      if ((s & (SCARD.STATE_UNKNOWN | SCARD.STATE_IGNORE)) === 0) out.set(n, s);
    });
    return out;
  }

  private chooseReader(states: Map<string, number>): string {
    const names = [...states.keys()];
    const list = names.length > 0 ? names.map((n) => `'${n}'`).join(', ') : 'none';
    const wanted = this.options.reader;
    if (wanted !== undefined && wanted !== '') {
      if (states.has(wanted)) return wanted;
      const matches = names.filter((n) => n.toLowerCase().includes(wanted.toLowerCase()));
      if (matches.length === 1) return matches[0]!;
      if (matches.length > 1) throw new SealError('INVALID_ARGUMENT', `reader '${wanted}' matches several readers: ${matches.map((n) => `'${n}'`).join(', ')}`);
      throw new SealError('DEVICE_UNAVAILABLE', `no PC/SC reader named '${wanted}' (readers: ${list})`);
    }
    const withCard = names.filter((n) => cardPresent(states.get(n)));
    if (withCard.length === 1) return withCard[0]!;
    if (withCard.length > 1) throw new SealError('INVALID_ARGUMENT', `several readers hold a card, name one: ${withCard.map((n) => `'${n}'`).join(', ')}`);
    throw new SealError('DEVICE_UNAVAILABLE', `no card in any PC/SC reader (readers: ${list})`);
  }

  private notify(): void {
    for (const l of [...this.waiters]) l();
  }

  /** The connected card, connecting first when needed (inside the lock). */
  private async connected(): Promise<CardConnection> {
    if (this.closed) throw new SealError('CLOSED', 'the PC/SC transport is closed');
    if (this.card) return this.card;
    let card: CardConnection;
    for (;;) {
      const fresh = await this.context();
      try {
        card = await this.io.connect(this.readerName, SCARD.SHARE_SHARED, PROTOCOLS);
        break;
      } catch (e) {
        // a context that worked before and whose daemon has gone since: once more on a new one
        if (!fresh && serviceLost(e)) {
          await this.loseContext();
          continue;
        }
        const name = scardName(e);
        if (name === 'UnknownReader' || name === 'ReaderUnavailable') {
          throw new SealError('DEVICE_UNAVAILABLE', `PC/SC reader '${this.readerName}' is not attached`, { backendCode: `PCSC_${name}`, backendStatus: scardCode(e), cause: e });
        }
        throw mapPcscError(e, `connecting to the card in '${this.readerName}'`);
      }
    }
    try {
      let state: Awaited<ReturnType<PcscContext['status']>>;
      try {
        state = await this.io.status(card.handle);
      } catch (e) {
        // Reset by another application between our connect and now: take the fresh card.
        if (scardName(e) !== 'ResetCard') throw e;
        card.protocol = (await this.io.reconnect(card.handle, SCARD.SHARE_SHARED, PROTOCOLS, SCARD.LEAVE_CARD)).protocol;
        state = await this.io.status(card.handle);
      }
      if (state.protocol !== SCARD.PROTOCOL_UNDEFINED) card.protocol = state.protocol;
      const atr = state.atr;
      this.extendedLength = card.protocol === SCARD.PROTOCOL_T1 && atrSupportsExtendedLength(atr);
      this.info = { kind: 'pcsc', name: this.readerName, atr: atr.toString('hex').toUpperCase() };
    } catch (e) {
      await this.io.disconnect(card.handle, SCARD.LEAVE_CARD).catch(() => undefined);
      throw mapPcscError(e, `reading the card state in '${this.readerName}'`);
    }
    this.card = card;
    this.generation += 1;
    return card;
  }

  /**
   * The I/O context, established anew when the old one was lost; true when it is new (so a
   * failure on it is not the old daemon's). DEVICE_UNAVAILABLE while pcscd is not back.
   */
  private async context(): Promise<boolean> {
    if (!this.ioLost) return false;
    const io = new this.pcsc.Context();
    try {
      await io.open();
    } catch (e) {
      await io.close().catch(() => undefined);
      throw mapPcscError(e, 'PC/SC');
    }
    if (this.closed) {
      await io.close().catch(() => undefined);
      throw new SealError('CLOSED', 'the PC/SC transport is closed');
    }
    this.io = io;
    this.ioLost = false;
    this.contextRestarts += 1;
    return true;
  }

  /** The daemon went away: the card handle and the context with it (the next call starts over). */
  private async loseContext(): Promise<void> {
    if (this.ioLost) return;
    const io = this.io;
    this.card = undefined;
    this.ioLost = true;
    // releasing a context whose daemon is gone only frees the library's side of it
    await io.close().catch(() => undefined);
  }

  /** Forgets the card handle after removal (the next call reconnects). */
  private async drop(): Promise<void> {
    const card = this.card;
    this.card = undefined;
    if (card) await this.io.disconnect(card.handle, SCARD.LEAVE_CARD).catch(() => undefined);
  }

  /**
   * After another application reset the card: the connection survives a reconnect, the card's
   * state (selected applets, verified PIN) does not, hence a new generation. False when the
   * reconnect failed too (the handle is dropped; the next call connects anew).
   */
  private async recoverFromReset(): Promise<boolean> {
    const card = this.card;
    if (!card) return false;
    try {
      card.protocol = (await this.io.reconnect(card.handle, SCARD.SHARE_SHARED, PROTOCOLS, SCARD.LEAVE_CARD)).protocol;
      this.generation += 1;
      return true;
    } catch {
      await this.drop();
      return false;
    }
  }

  /** Turns a shim error into a SealError, dropping or re-establishing the connection as needed. */
  private async failure(e: unknown, what: string): Promise<SealError> {
    const code = scardName(e);
    if (code === 'ResetCard') {
      // Reset in the middle of an operation: what was sent so far is lost.
      await this.recoverFromReset();
      return new SealError('SESSION_LOST', `${what}: the card was reset by another application; select the applet again`, { backendCode: 'PCSC_ResetCard', backendStatus: scardCode(e), cause: e });
    }
    const err = mapPcscError(e, what);
    if (serviceLost(e)) await this.loseContext();
    else if (err.code === 'DEVICE_UNAVAILABLE') await this.drop();
    return err;
  }

  private async rawTransmit(apdu: Buffer): Promise<Buffer> {
    const card = await this.connected();
    try {
      // the shim receives into a MAX_BUFFER_SIZE_EXTENDED buffer: short and extended answers alike
      return await this.io.transmit(card.handle, card.protocol, apdu);
    } catch (e) {
      throw await this.failure(e, 'card transmit');
    }
  }

  /** One complete exchange (61xx / 6Cxx resolved), never interleaved with another. */
  private exchange(apdu: Buffer): Promise<ResponseApdu> {
    return this.exchanges.run(() => withIsoResponseHandling((a) => this.rawTransmit(a), apdu));
  }

  /** SCardBeginTransaction on the connected card; the context and handle to end it on. */
  private async beginTransaction(): Promise<{ io: PcscContext; handle: number }> {
    const card = await this.connected();
    const io = this.io;
    await io.beginTransaction(card.handle);
    return { io, handle: card.handle };
  }

  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.lock.held()) return fn();
    return this.lock.run(async () => {
      let tx: { io: PcscContext; handle: number };
      try {
        tx = await this.beginTransaction();
      } catch (e) {
        // Nothing of this operation was sent yet. A reset by another application since our last
        // operation: carry on with the fresh card. A daemon restarted since: carry on with a new
        // context and connection. Either way a new generation, which stale channels see.
        const recovered = scardName(e) === 'ResetCard' ? await this.recoverFromReset() : serviceLost(e) ? (await this.loseContext(), true) : false;
        if (!recovered) throw await this.failure(e, 'starting a card transaction');
        try {
          tx = await this.beginTransaction();
        } catch (e2) {
          throw await this.failure(e2, 'starting a card transaction');
        }
      }
      try {
        return await fn();
      } finally {
        await tx.io.endTransaction(tx.handle, SCARD.LEAVE_CARD).catch(() => undefined);
      }
    });
  }

  transmit(apdu: Buffer): Promise<ResponseApdu> {
    return this.exclusive(() => this.exchange(apdu));
  }

  select(aid: Buffer, options: { logical?: boolean } = {}): Promise<{ channel: CardChannel; response: ResponseApdu }> {
    return this.exclusive(async () => {
      const generation = this.generation;
      const { number, response } = await selectApplet((a) => this.exchange(a), aid, options.logical === true);
      return { channel: new GenerationChannel(this, number, generation), response };
    });
  }

  /** Used by channels: sends on `number` if the card was not reconnected since `generation`. */
  channelTransmit(number: number, generation: number, apdu: Buffer): Promise<ResponseApdu> {
    return this.exclusive(async () => {
      if (generation !== this.generation) throw staleChannel(number);
      return this.exchange(onChannel(apdu, number));
    });
  }

  channelClose(number: number, generation: number): Promise<void> {
    return closeChannel(this, number, generation, (a) => this.exchange(a));
  }

  async waitForCard(timeoutMs = this.timeoutMs): Promise<void> {
    if (this.closed) throw new SealError('CLOSED', 'the PC/SC transport is closed');
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (this.closed) finish(new SealError('CLOSED', 'the PC/SC transport is closed'));
        else if (this.watching && cardPresent(this.readerState)) finish();
        else if (this.watchError) finish(this.watchError);
      };
      const timer = setTimeout(() => finish(new SealError('TIMEOUT', `no card in '${this.readerName}' after ${timeoutMs} ms`)), timeoutMs);
      const finish = (e?: SealError): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        // the last waiter gone: end the wait in progress instead of letting it run its slice
        if (this.waiters.size === 0) void this.watcher?.cancel().catch(() => undefined);
        if (e) reject(e);
        else resolve();
      };
      this.waiters.add(check);
      if (this.watching) check(); // the watch loop's state is current: a card may be there already
      else void this.watch();
    });
  }

  /**
   * Follows the reader's state on the watcher context while someone waits: the first call asks
   * with UNAWARE (answered at once with the current state), the next ones block until the state
   * changes (a card inserted or removed, the reader detached or attached: the PnP pseudo reader).
   */
  private async watch(): Promise<void> {
    this.watching = true;
    this.watchError = undefined;
    this.readerState = undefined;
    try {
      const watcher = await this.openWatcher();
      let known = [SCARD.STATE_UNAWARE as number, SCARD.STATE_UNAWARE as number];
      while (this.waiters.size > 0 && !this.closed) {
        let states: { eventState: number }[];
        try {
          states = await watcher.getStatusChange([this.readerName, PNP_NOTIFICATION], known, WATCH_SLICE_MS);
        } catch (e) {
          const name = scardName(e);
          if (name === 'Timeout' || name === 'Cancelled') continue;
          throw e;
        }
        known = states.map((s) => s.eventState & ~SCARD.STATE_CHANGED);
        this.readerState = states[0]!.eventState;
        this.notify();
      }
    } catch (e) {
      if (serviceLost(e) && this.watcher) {
        // the daemon restarted: the next wait starts on a new context
        const dead = this.watcher;
        this.watcher = undefined;
        await dead.close().catch(() => undefined);
      }
      if (!this.closed) {
        this.watchError = mapPcscError(e, `waiting for a card in '${this.readerName}'`);
        this.notify();
      }
    } finally {
      this.watching = false;
    }
  }

  private async openWatcher(): Promise<PcscContext> {
    if (this.watcher) return this.watcher;
    const watcher = new this.pcsc.Context();
    try {
      await watcher.open();
    } catch (e) {
      await watcher.close().catch(() => undefined);
      throw e;
    }
    if (this.closed) {
      await watcher.close().catch(() => undefined);
      throw new SealError('CLOSED', 'the PC/SC transport is closed');
    }
    this.watcher = watcher;
    return watcher;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const finish = async (): Promise<void> => {
      this.closed = true;
      this.notify();
      const card = this.card;
      this.card = undefined;
      const disposition = this.options.disposition === 'leave' ? SCARD.LEAVE_CARD : SCARD.RESET_CARD;
      if (card) await this.io.disconnect(card.handle, disposition).catch(() => undefined);
      // a lost context was released when it was found dead
      await Promise.all([this.watcher?.close(), this.ioLost ? undefined : this.io.close()].map((p) => p?.catch(() => undefined)));
    };
    // Wait for a running operation unless close() is called from inside one.
    if (this.lock.held()) await finish();
    else await this.lock.run(finish);
  }
}

/** What both transports need from each other to run a channel. */
export interface ChannelHost {
  readonly generation: number;
  channelTransmit(number: number, generation: number, apdu: Buffer): Promise<ResponseApdu>;
  channelClose(number: number, generation: number): Promise<void>;
}

/** A channel bound to the connection generation it was opened in. */
export class GenerationChannel implements CardChannel {
  private closed = false;

  constructor(
    private readonly host: ChannelHost,
    readonly number: number,
    private readonly generation: number,
  ) {}

  transmit(apdu: Buffer): Promise<ResponseApdu> {
    if (this.closed) return Promise.reject(new SealError('CLOSED', `logical channel ${this.number} is closed`));
    return this.host.channelTransmit(this.number, this.generation, apdu);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.number !== 0) await this.host.channelClose(this.number, this.generation);
  }
}

export function staleChannel(number: number): SealError {
  return new SealError('SESSION_LOST', `the card was removed, reset or reconnected since channel ${number} was opened; select the applet again`);
}

/** MANAGE CHANNEL close (`00 70 80 <ch>`), skipped when the card was reconnected meanwhile. */
export async function closeChannel(
  host: { readonly generation: number; exclusive<T>(fn: () => Promise<T>): Promise<T> },
  number: number,
  generation: number,
  exchange: (apdu: Buffer) => Promise<ResponseApdu>,
): Promise<void> {
  try {
    await host.exclusive(async () => {
      if (generation !== host.generation) return;
      expectOk(await exchange(commandApdu(0x00, 0x70, 0x80, number)), `MANAGE CHANNEL (close ${number})`);
    });
  } catch (e) {
    // A card that is gone has no channel left to close.
    if (isSealError(e) && (e.code === 'DEVICE_UNAVAILABLE' || e.code === 'CLOSED' || e.code === 'SESSION_LOST')) return;
    throw e;
  }
}

/**
 * SELECT by AID (`00 A4 04 00 Lc AID 00`) on the basic channel, or on a new logical channel
 * opened with MANAGE CHANNEL (`00 70 00 00 01`). A status other than 9000 or a warning (62xx,
 * 63xx) throws the mapped error (6A82 → OBJECT_NOT_FOUND) after closing the new channel.
 */
export async function selectApplet(
  exchange: (apdu: Buffer) => Promise<ResponseApdu>,
  aid: Buffer,
  logical: boolean,
): Promise<{ number: number; response: ResponseApdu }> {
  if (aid.length < 1 || aid.length > 16) throw new SealError('INVALID_ARGUMENT', `an AID has 1 to 16 bytes, got ${aid.length}`);
  const what = `SELECT ${aid.toString('hex').toUpperCase()}`;
  let number = 0;
  if (logical) {
    const open = await exchange(commandApdu(0x00, 0x70, 0x00, 0x00, undefined, 1));
    const data = expectOk(open, 'MANAGE CHANNEL (open)');
    if (data.length !== 1 || data[0]! < 1 || data[0]! > 19) throw new SealError('DEVICE_ERROR', 'MANAGE CHANNEL (open): the card returned no valid channel number');
    number = data[0]!;
  }
  let response: ResponseApdu;
  try {
    response = await exchange(onChannel(commandApdu(0x00, 0xa4, 0x04, 0x00, aid, 256), number));
  } catch (e) {
    if (number !== 0) await exchange(commandApdu(0x00, 0x70, 0x80, number)).catch(() => undefined);
    throw e;
  }
  const sw1 = response.sw >> 8;
  if (response.sw !== 0x9000 && sw1 !== 0x62 && sw1 !== 0x63) {
    if (number !== 0) await exchange(commandApdu(0x00, 0x70, 0x80, number)).catch(() => undefined);
    throw statusError(response.sw, what);
  }
  return { number, response };
}
