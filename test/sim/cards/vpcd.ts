/**
 * Connects a VirtualCard to vpcd (vsmartcard's virtual reader driver inside pcscd). The card is
 * the TCP client; every frame both ways is a 2-byte big-endian length and a payload. A 1-byte
 * payload from vpcd is a control code (00 power off, 01 power on, 02 reset, 04 send the ATR);
 * a longer one is a command APDU, answered with the response APDU. Closing the socket is card
 * removal. Connects to loopback only. Test code only.
 */
import net from 'node:net';
import type { VirtualCard } from './card.js';

export interface VpcdConnection {
  /** Removes the card (closes the socket) until `insert()`. */
  remove(): void;
  insert(): void;
  readonly inserted: boolean;
  /** Stops for good. */
  stop(): void;
}

export function connectToVpcd(card: VirtualCard, port: number, log: (line: string) => void = () => {}): VpcdConnection {
  let socket: net.Socket | undefined;
  let wanted = true;
  let stopped = false;
  let retry: NodeJS.Timeout | undefined;

  const frame = (payload: Buffer): Buffer => {
    const h = Buffer.alloc(2);
    h.writeUInt16BE(payload.length);
    return Buffer.concat([h, payload]);
  };

  const connect = (): void => {
    if (stopped || !wanted || socket) return;
    const s = net.connect({ host: '127.0.0.1', port });
    socket = s;
    let buf = Buffer.alloc(0);
    let queue = Promise.resolve();
    s.on('connect', () => log(`${card.name}: inserted (vpcd port ${port})`));
    s.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2) {
        const n = buf.readUInt16BE(0);
        if (buf.length < 2 + n) break;
        const payload = Buffer.from(buf.subarray(2, 2 + n));
        buf = buf.subarray(2 + n);
        // answers go out in order even when the card answers asynchronously
        queue = queue.then(async () => {
          if (payload.length === 1) {
            const code = payload[0];
            if (code === 0x00 || code === 0x02) card.reset();
            if (code === 0x04) s.write(frame(card.atr()));
            return;
          }
          let response: Buffer;
          try {
            response = await card.transmit(payload);
          } catch (e) {
            log(`${card.name}: card fault: ${e instanceof Error ? e.message : String(e)}`);
            response = Buffer.from([0x6f, 0x00]);
          }
          if (!s.destroyed) s.write(frame(response));
        });
      }
    });
    const lost = (): void => {
      if (socket !== s) return;
      socket = undefined;
      card.reset();
      if (!stopped && wanted) retry = setTimeout(connect, 200);
    };
    s.on('error', lost);
    s.on('close', lost);
  };

  connect();
  return {
    remove(): void {
      wanted = false;
      clearTimeout(retry);
      const s = socket;
      socket = undefined;
      card.reset();
      s?.destroy();
      log(`${card.name}: removed`);
    },
    insert(): void {
      wanted = true;
      connect();
    },
    get inserted(): boolean {
      return wanted;
    },
    stop(): void {
      stopped = true;
      clearTimeout(retry);
      socket?.destroy();
    },
  };
}
