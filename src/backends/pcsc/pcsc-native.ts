/**
 * Lazy loader and typed surface of the `pcsc_lite` native shim (native-shims/pcsc), a thin
 * binding over pcsc-lite. Each PcscContext owns one SCARDCONTEXT on its own worker thread;
 * every call returns a Promise and queues FIFO behind the previous ones on that context.
 * pcsc-lite serialises the calls of one SCARDCONTEXT, so waiting for reader events
 * (getStatusChange) belongs on a second context, never on the one that talks to the card.
 * Card handles are small integer ids from the shim's own table, never the raw SCARDHANDLE.
 *
 * A failing call rejects with an Error whose `code` is the SCARD_E_* / SCARD_W_* value
 * (unsigned, e.g. 0x80100069) and whose message is pcsc_stringify_error's text.
 * A process without libpcsclite (or without the built shim) gets a reason instead of a crash,
 * and only a process that opens a PC/SC transport loads the shim at all.
 */
import path from 'node:path';
import { shimLoader } from '../../core/native-shim.js';

/** Constants of pcsc-lite's pcsclite.h (the subset the transport uses). */
export const SCARD = {
  SHARE_EXCLUSIVE: 0x1,
  SHARE_SHARED: 0x2,
  SHARE_DIRECT: 0x3,
  PROTOCOL_UNDEFINED: 0x0,
  PROTOCOL_T0: 0x1,
  PROTOCOL_T1: 0x2,
  PROTOCOL_RAW: 0x4,
  LEAVE_CARD: 0x0,
  RESET_CARD: 0x1,
  UNPOWER_CARD: 0x2,
  EJECT_CARD: 0x3,
  STATE_UNAWARE: 0x0,
  STATE_IGNORE: 0x1,
  STATE_CHANGED: 0x2,
  STATE_UNKNOWN: 0x4,
  STATE_UNAVAILABLE: 0x8,
  STATE_EMPTY: 0x10,
  STATE_PRESENT: 0x20,
  STATE_ATRMATCH: 0x40,
  STATE_EXCLUSIVE: 0x80,
  STATE_INUSE: 0x100,
  STATE_MUTE: 0x200,
  STATE_UNPOWERED: 0x400,
  INFINITE: 0xffffffff,
} as const;

/** The pseudo reader whose state changes when a reader is attached or detached. */
export const PNP_NOTIFICATION = '\\\\?PnP?\\Notification';

/**
 * The SCARD_* return codes (pcsclite.h) by name: the name is the macro without `SCARD_` and its
 * class letter, in CamelCase (`SCARD_W_REMOVED_CARD` → `RemovedCard`).
 */
export const SCARD_CODES = {
  InternalError: 0x80100001,
  Cancelled: 0x80100002,
  InvalidHandle: 0x80100003,
  InvalidParameter: 0x80100004,
  InvalidTarget: 0x80100005,
  NoMemory: 0x80100006,
  WaitedTooLong: 0x80100007,
  InsufficientBuffer: 0x80100008,
  UnknownReader: 0x80100009,
  Timeout: 0x8010000a,
  SharingViolation: 0x8010000b,
  NoSmartCard: 0x8010000c,
  UnknownCard: 0x8010000d,
  CantDispose: 0x8010000e,
  ProtoMismatch: 0x8010000f,
  NotReady: 0x80100010,
  InvalidValue: 0x80100011,
  SystemCancelled: 0x80100012,
  CommError: 0x80100013,
  UnknownError: 0x80100014,
  InvalidAtr: 0x80100015,
  NotTransacted: 0x80100016,
  ReaderUnavailable: 0x80100017,
  Shutdown: 0x80100018,
  PciTooSmall: 0x80100019,
  ReaderUnsupported: 0x8010001a,
  DuplicateReader: 0x8010001b,
  CardUnsupported: 0x8010001c,
  NoService: 0x8010001d,
  ServiceStopped: 0x8010001e,
  UnsupportedFeature: 0x8010001f,
  NoReadersAvailable: 0x8010002e,
  CommDataLost: 0x8010002f,
  ServerTooBusy: 0x80100031,
  UnsupportedCard: 0x80100065,
  UnresponsiveCard: 0x80100066,
  UnpoweredCard: 0x80100067,
  ResetCard: 0x80100068,
  RemovedCard: 0x80100069,
  SecurityViolation: 0x8010006a,
} as const;

export type ScardName = keyof typeof SCARD_CODES;

const NAMES = new Map<number, ScardName>(Object.entries(SCARD_CODES).map(([k, v]) => [v, k as ScardName]));

/** The SCARD code of a shim rejection, if `e` is one. */
export function scardCode(e: unknown): number | undefined {
  const code = e instanceof Error ? (e as Error & { code?: unknown }).code : undefined;
  return typeof code === 'number' ? code : undefined;
}

/** The name of a shim rejection's SCARD code (`RemovedCard`), or `0x…` for a code not in the table. */
export function scardName(e: unknown): string | undefined {
  const code = scardCode(e);
  if (code === undefined) return undefined;
  return NAMES.get(code) ?? `0x${code.toString(16).toUpperCase()}`;
}

export interface ReaderStateChange {
  /** dwEventState: SCARD_STATE_* flags; the upper 16 bits count the reader's events. */
  eventState: number;
  /** ATR of the card in the reader (empty without a card). */
  atr: Buffer;
}

export interface CardStatus {
  reader: string;
  /** SCardStatus state (SCARD_ABSENT … SCARD_SPECIFIC bits in pcsc-lite). */
  state: number;
  protocol: number;
  atr: Buffer;
}

export interface PcscContext {
  /** SCardEstablishContext (system scope). */
  open(): Promise<void>;
  /** Cancels a wait in progress, disconnects (reset) handles still open, releases the context. */
  close(): Promise<void>;
  /** Ends the getStatusChange in progress, which rejects with Cancelled; no-op without one. */
  cancel(): Promise<void>;
  /** Reader names; rejects with NoReadersAvailable when there is none. */
  listReaders(): Promise<string[]>;
  connect(reader: string, shareMode: number, preferredProtocols: number): Promise<{ handle: number; protocol: number }>;
  reconnect(handle: number, shareMode: number, preferredProtocols: number, initialization: number): Promise<{ protocol: number }>;
  status(handle: number): Promise<CardStatus>;
  /** One APDU exchange; the response (data ‖ SW1 SW2) has up to 65538 bytes. */
  transmit(handle: number, protocol: number, apdu: Buffer): Promise<Buffer>;
  beginTransaction(handle: number): Promise<void>;
  endTransaction(handle: number, disposition: number): Promise<void>;
  /** The handle id is forgotten whatever the outcome. */
  disconnect(handle: number, disposition: number): Promise<void>;
  /** SCardGetStatusChange; `timeoutMs` SCARD.INFINITE waits until a change or cancel(). */
  getStatusChange(readers: readonly string[], currentStates: readonly number[], timeoutMs: number): Promise<ReaderStateChange[]>;
}

export interface PcscShim {
  Context: new () => PcscContext;
}

/** The shim, or a thrown Error saying why it cannot be used. */
export const loadPcscShim = shimLoader<PcscShim>({
  relative: path.join('native-shims', 'pcsc', 'build', 'Release', 'pcsc_lite.node'),
  notBuilt: 'the PC/SC shim is not built: install libpcsclite-dev (Debian) and run `node scripts/build-shims.mjs`',
  loadHint: 'the PC/SC shim does not load (is libpcsclite installed?)',
});
