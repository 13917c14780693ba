/**
 * What a virtual card is to the test simulators: an ATR and a function from command APDU to
 * response APDU (data ‖ SW1 SW2). Power and reset events let a card drop its session state
 * (selected applet, verified PIN) the way a real card does. Test code only, never product code.
 */
export interface VirtualCard {
  readonly name: string;
  atr(): Buffer;
  /** One command APDU in, one response APDU (with status word) out. */
  transmit(apdu: Buffer): Buffer | Promise<Buffer>;
  /** Power off or reset: forget the selected applet, security status and open logical channels. */
  reset(): void;
}
