/**
 * The PC/SC implementation of ApduTransport: a card in a reader of the local pcsc-lite daemon
 * (or WinSCard / CryptoTokenKit), reached through the `pcsc-mini` N-API binding.
 *
 * - The binding is imported lazily, inside openPcscTransport, so a machine without pcscd or
 *   libpcsclite still loads seal-bridge and its other backends.
 * - Every card call runs on the binding's worker threads; nothing here blocks the event loop.
 * - `exclusive(fn)` holds a PC/SC transaction (SCardBeginTransaction) on a shared connection,
 *   so other processes (OpenSC, yubico-piv-tool) can use the card between our operations but
 *   never between the commands of one operation. Each `transmit` is such an operation on its
 *   own, so `61xx` GET RESPONSE sequences are never interleaved.
 * - Card removal makes the next call fail with DEVICE_UNAVAILABLE ('card removed …'); the call
 *   after that reconnects by itself and increments `generation`. Channels opened before a
 *   reconnection answer SESSION_LOST: the applet has to be selected again.
 */
import { SealError, isSealError } from '../../core/errors.js';
import type { ApduTransport, CardChannel, ResponseApdu, TransportInfo } from './transport.js';
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

type PcscMini = typeof import('pcsc-mini');
type PcscReader = import('pcsc-mini').Reader;
type PcscCard = import('pcsc-mini').Card;

export interface PcscTransportOptions {
  /** Reader name, exactly or as a unique substring. Omitted: the one reader holding a card. */
  reader?: string;
  /** Bound on waiting for the reader list at open and for `waitForCard` (default 5000 ms). */
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
  /** Resolves when a card is present in the reader; TIMEOUT after `timeoutMs`. */
  waitForCard(timeoutMs?: number): Promise<void>;
}

const DEFAULT_TIMEOUT_MS = 5000;
/** Quiet time after the last reader event before the reader list counts as complete. */
const READER_SETTLE_MS = 100;

let bindingPromise: Promise<PcscMini> | undefined;

/** Loads pcsc-mini once; BACKEND_UNAVAILABLE with the reason when it cannot load. */
async function loadBinding(): Promise<PcscMini> {
  bindingPromise ??= import('pcsc-mini').then(
    (m) => ((m as { default?: PcscMini }).default ?? m) as PcscMini,
    (e: unknown) => {
      bindingPromise = undefined;
      throw new SealError('BACKEND_UNAVAILABLE', `the PC/SC binding (pcsc-mini) could not be loaded; is libpcsclite installed? (${e instanceof Error ? e.message.split('\n')[0] : String(e)})`, { cause: e });
    },
  );
  return bindingPromise;
}

/** pcsc-mini error code (its names for SCARD_E_* / SCARD_W_*), if `e` is one of its errors. */
function pcscCode(e: unknown): string | undefined {
  const code = e instanceof Error ? (e as Error & { code?: unknown }).code : undefined;
  if (typeof code === 'string') return code;
  return undefined;
}

const UNAVAILABLE_CODES = new Set(['NoService', 'ServiceStopped', 'NoReadersAvailable', 'UnknownReader', 'ReaderUnavailable', 'NoSmartCard', 'RemovedCard', 'UnpoweredCard', 'UnresponsiveCard', 'SharingViolation', 'NotReady', 'CommError', 'CommDataLost']);

function mapPcscError(e: unknown, what: string): SealError {
  if (isSealError(e)) return e;
  const code = pcscCode(e);
  const opts = { backendCode: code ? `PCSC_${code}` : undefined, cause: e };
  switch (code) {
    case 'NoService':
    case 'ServiceStopped':
      return new SealError('DEVICE_UNAVAILABLE', `${what}: the PC/SC daemon is not reachable (is pcscd running?)`, opts);
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

/**
 * Opens a PC/SC transport to the card in `options.reader`. DEVICE_UNAVAILABLE when pcscd is
 * not running, the reader is absent (the message lists the readers) or holds no card.
 */
export async function openPcscTransport(options: PcscTransportOptions = {}): Promise<PcscTransport> {
  const pcsc = await loadBinding();
  const t = new PcscCardTransport(pcsc, options);
  try {
    await t.open();
  } catch (e) {
    await t.close().catch(() => undefined);
    throw e;
  }
  return t;
}

interface ReaderEntry {
  reader: PcscReader;
  /** Raw ReaderStatus flags of the last change event; undefined before the first one. */
  status: number | undefined;
}

class PcscCardTransport implements PcscTransport {
  info: TransportInfo = { kind: 'pcsc', name: '' };
  generation = 0;
  extendedLength = false;

  private readonly client: InstanceType<PcscMini['Client']>;
  private readonly readers = new Map<string, ReaderEntry>();
  private readonly lock = new ExclusiveLock();
  private readonly exchanges = new SerialQueue();
  private readonly timeoutMs: number;
  private readonly listeners = new Set<() => void>();
  private readerName = '';
  private card: PcscCard | undefined;
  private closed = false;
  private clientError: unknown;
  private started = false;

  constructor(
    private readonly pcsc: PcscMini,
    private readonly options: PcscTransportOptions,
  ) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.client = new pcsc.Client();
  }

  async open(): Promise<void> {
    this.client.on('error', (e) => {
      this.clientError = e;
      this.notify();
    });
    this.client.on('reader', (reader) => {
      const entry: ReaderEntry = { reader, status: undefined };
      this.readers.set(reader.name(), entry);
      reader.on('change', (status) => {
        entry.status = status.raw;
        this.notify();
      });
      reader.on('disconnect', () => {
        if (this.readers.get(reader.name()) === entry) this.readers.delete(reader.name());
        this.notify();
      });
      this.notify();
    });
    try {
      this.client.start();
      this.started = true;
    } catch (e) {
      throw mapPcscError(e, 'PC/SC');
    }
    await this.settleReaders();
    this.readerName = this.chooseReader();
    this.info = { kind: 'pcsc', name: this.readerName };
    await this.lock.run(async () => {
      await this.connected();
    });
  }

  /** Waits until every reader has reported its state and no event came for READER_SETTLE_MS. */
  private async settleReaders(): Promise<void> {
    const deadline = Date.now() + this.timeoutMs;
    let last = Date.now();
    const bump = (): void => {
      last = Date.now();
    };
    this.listeners.add(bump);
    try {
      for (;;) {
        if (this.clientError !== undefined) throw mapPcscError(this.clientError, 'PC/SC');
        const allReported = [...this.readers.values()].every((r) => r.status !== undefined);
        const now = Date.now();
        if (allReported && now - last >= READER_SETTLE_MS) return;
        if (now >= deadline) return;
        await sleep(20);
      }
    } finally {
      this.listeners.delete(bump);
    }
  }

  private chooseReader(): string {
    const names = [...this.readers.keys()];
    const list = names.length > 0 ? names.map((n) => `'${n}'`).join(', ') : 'none';
    const wanted = this.options.reader;
    if (wanted !== undefined && wanted !== '') {
      if (this.readers.has(wanted)) return wanted;
      const matches = names.filter((n) => n.toLowerCase().includes(wanted.toLowerCase()));
      if (matches.length === 1) return matches[0]!;
      if (matches.length > 1) throw new SealError('INVALID_ARGUMENT', `reader '${wanted}' matches several readers: ${matches.map((n) => `'${n}'`).join(', ')}`);
      throw new SealError('DEVICE_UNAVAILABLE', `no PC/SC reader named '${wanted}' (readers: ${list})`);
    }
    const withCard = names.filter((n) => this.cardPresent(n));
    if (withCard.length === 1) return withCard[0]!;
    if (withCard.length > 1) throw new SealError('INVALID_ARGUMENT', `several readers hold a card, name one: ${withCard.map((n) => `'${n}'`).join(', ')}`);
    throw new SealError('DEVICE_UNAVAILABLE', `no card in any PC/SC reader (readers: ${list})`);
  }

  private cardPresent(name: string): boolean {
    const s = this.readers.get(name)?.status;
    return s !== undefined && (s & this.pcsc.ReaderStatus.PRESENT) !== 0 && (s & this.pcsc.ReaderStatus.MUTE) === 0;
  }

  private notify(): void {
    for (const l of [...this.listeners]) l();
  }

  /** The connected card, connecting first when needed (inside the lock). */
  private async connected(): Promise<PcscCard> {
    if (this.closed) throw new SealError('CLOSED', 'the PC/SC transport is closed');
    if (this.card) return this.card;
    const entry = this.readers.get(this.readerName);
    if (!entry) throw new SealError('DEVICE_UNAVAILABLE', `PC/SC reader '${this.readerName}' is not attached`);
    let card: PcscCard;
    try {
      card = await entry.reader.connect(this.pcsc.CardMode.SHARED);
    } catch (e) {
      throw mapPcscError(e, `connecting to the card in '${this.readerName}'`);
    }
    try {
      let state: Awaited<ReturnType<PcscCard['state']>>;
      try {
        state = await card.state();
      } catch (e) {
        // Reset by another application between our connect and now: take the fresh card.
        if (pcscCode(e) !== 'ResetCard') throw e;
        await card.reconnect(this.pcsc.CardMode.SHARED, this.pcsc.CardDisposition.LEAVE);
        state = await card.state();
      }
      const atr = Buffer.from(state.atr);
      this.extendedLength = state.protocol === this.pcsc.Protocol.T1 && atrSupportsExtendedLength(atr);
      this.info = { kind: 'pcsc', name: this.readerName, atr: atr.toString('hex').toUpperCase() };
    } catch (e) {
      await card.disconnect(this.pcsc.CardDisposition.LEAVE).catch(() => undefined);
      throw mapPcscError(e, `reading the card state in '${this.readerName}'`);
    }
    this.card = card;
    this.generation += 1;
    return card;
  }

  /** Forgets the card handle after removal (the next call reconnects). */
  private async drop(): Promise<void> {
    const card = this.card;
    this.card = undefined;
    if (card) await card.disconnect(this.pcsc.CardDisposition.LEAVE).catch(() => undefined);
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
      await card.reconnect(this.pcsc.CardMode.SHARED, this.pcsc.CardDisposition.LEAVE);
      this.generation += 1;
      return true;
    } catch {
      await this.drop();
      return false;
    }
  }

  /** Turns a binding error into a SealError, dropping or re-establishing the connection as needed. */
  private async failure(e: unknown, what: string): Promise<SealError> {
    const code = pcscCode(e);
    if (code === 'ResetCard') {
      // Reset in the middle of an operation: what was sent so far is lost.
      await this.recoverFromReset();
      return new SealError('SESSION_LOST', `${what}: the card was reset by another application; select the applet again`, { backendCode: 'PCSC_ResetCard', cause: e });
    }
    const err = mapPcscError(e, what);
    if (err.code === 'DEVICE_UNAVAILABLE' || code === 'InvalidHandle') await this.drop();
    return err;
  }

  private async rawTransmit(apdu: Buffer): Promise<Buffer> {
    const card = await this.connected();
    try {
      return Buffer.from(await card.transmit(apdu));
    } catch (e) {
      throw await this.failure(e, 'card transmit');
    }
  }

  /** One complete exchange (61xx / 6Cxx resolved), never interleaved with another. */
  private exchange(apdu: Buffer): Promise<ResponseApdu> {
    return this.exchanges.run(() => withIsoResponseHandling((a) => this.rawTransmit(a), apdu));
  }

  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.lock.held()) return fn();
    return this.lock.run(async () => {
      let txn: Awaited<ReturnType<PcscCard['transaction']>>;
      try {
        txn = await (await this.connected()).transaction();
      } catch (e) {
        // A reset by another application since our last operation: nothing of this operation
        // was sent yet, so carry on with the fresh card (a new generation; stale channels see it).
        if (pcscCode(e) !== 'ResetCard' || !(await this.recoverFromReset())) throw await this.failure(e, 'starting a card transaction');
        try {
          txn = await (await this.connected()).transaction();
        } catch (e2) {
          throw await this.failure(e2, 'starting a card transaction');
        }
      }
      try {
        return await fn();
      } finally {
        await txn.end(this.pcsc.CardDisposition.LEAVE).catch(() => undefined);
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
    if (this.cardPresent(this.readerName)) return;
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (this.cardPresent(this.readerName)) finish();
        else if (this.closed) finish(new SealError('CLOSED', 'the PC/SC transport is closed'));
      };
      const timer = setTimeout(() => finish(new SealError('TIMEOUT', `no card in '${this.readerName}' after ${timeoutMs} ms`)), timeoutMs);
      const finish = (e?: SealError): void => {
        clearTimeout(timer);
        this.listeners.delete(check);
        if (e) reject(e);
        else resolve();
      };
      this.listeners.add(check);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const finish = async (): Promise<void> => {
      this.closed = true;
      const card = this.card;
      this.card = undefined;
      const disposition = this.options.disposition === 'leave' ? this.pcsc.CardDisposition.LEAVE : this.pcsc.CardDisposition.RESET;
      if (card) await card.disconnect(disposition).catch(() => undefined);
      if (this.started) {
        try {
          this.client.stop();
        } catch {
          // already stopped
        }
      }
      this.notify();
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

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
