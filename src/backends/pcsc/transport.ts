/**
 * The APDU transport contract shared by the card backends. Two implementations: a PC/SC reader
 * (pcsc-transport.ts) and a cellular modem's AT+CSIM / AT+CGLA (modem-transport.ts). Applet
 * drivers (piv.ts, iotsafe.ts) only ever see this interface.
 *
 * A transport hands back complete ISO 7816-4 responses: `61xx` (GET RESPONSE) and `6Cxx`
 * (resend with Le) are resolved below this interface, so a driver sees the data and the final
 * status word only.
 */

export interface ResponseApdu {
  /** Response data without the status word. */
  data: Buffer;
  /** SW1 << 8 | SW2, e.g. 0x9000. */
  sw: number;
}

export interface TransportInfo {
  kind: 'pcsc' | 'at';
  /** Reader name or serial port path (no secrets). */
  name: string;
  /** ATR of the card as hex, when the transport knows it (PC/SC). */
  atr?: string;
}

/** A logical channel (or the basic channel 0) with one applet selected on it. */
export interface CardChannel {
  readonly number: number;
  /**
   * Sends a command APDU on this channel. The CLA's channel bits are set by the channel (the
   * caller passes its class byte with channel 0; variants of the class byte for an applet such as
   * IoT SAFE's `0x80 | channel` are the driver's choice through `claStyle`).
   */
  transmit(apdu: Buffer): Promise<ResponseApdu>;
  close(): Promise<void>;
}

export interface ApduTransport {
  readonly info: TransportInfo;
  /** Sends a command APDU on the basic channel. */
  transmit(apdu: Buffer): Promise<ResponseApdu>;
  /**
   * Selects an applet by AID and returns the channel to talk to it: the basic channel when
   * `logical` is false, else a new logical channel (MANAGE CHANNEL, or AT+CCHO on a modem).
   * Returns the SELECT response too (FCI / application property template).
   */
  select(aid: Buffer, options?: { logical?: boolean }): Promise<{ channel: CardChannel; response: ResponseApdu }>;
  /**
   * Runs `fn` with exclusive access to the card: no other client (process or caller) can send
   * an APDU between the commands of `fn` (PC/SC: SCardBeginTransaction on an exclusive or
   * shared connection; modem: the port's command queue). Calls nest safely.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/**
 * Runs a new transport's first step (connect, probe) and hands the transport out only when it
 * succeeded; otherwise closes it again, so nothing half open is left holding a reader or port.
 */
export async function openedOrClosed<T extends { close(): Promise<void> }>(t: T, start: (t: T) => Promise<unknown>): Promise<T> {
  try {
    await start(t);
  } catch (e) {
    await t.close().catch(() => undefined);
    throw e;
  }
  return t;
}
