/**
 * The one long-running process that hosts every virtual card of the test simulators. Started by
 * `scripts/sim start` inside the card network namespace (where vpcd listens):
 *   node --import ./test/integration/support/ts-loader.mjs test/sim/card-host.ts \
 *        --dir <simdir>/cards --modem <simdir>/modem/dce
 *
 * - the virtual PIV card (state in <dir>/piv) on vpcd port 35963 → reader "Virtual PCD 00 00";
 * - the virtual IoT SAFE applet (state in <dir>/iotsafe): one front end on vpcd port 35964 →
 *   reader "Virtual PCD 00 01", another (T=0, as a SIM) behind the virtual modem on the pty.
 *
 * A control socket (<dir>/control.sock, newline-delimited JSON, one answer line per request)
 * lets tests remove and insert cards, switch the modem's mode and quirks and the applet's quirks:
 *   {"cmd":"remove","card":"piv"|"iotsafe"|"modem-sim"}   {"cmd":"insert","card":…}
 *   {"cmd":"modem","mode":"normal"|"silent"|"error"}
 *   {"cmd":"modem-quirks","echo":true,"staleLines":true,"getResponse":true,"cmeOnSelect":true,"cchoBare":true}
 *   {"cmd":"iotsafe-quirks","signatureDer":true,"tag33Length":2,"getResponse":true,"t0WrongLe":true,"fileSizeLittleEndian":true}
 *   {"cmd":"status"}
 * Answers are {"ok":true,…} or {"ok":false,"error":"…"}. `insert` answers once vpcd has asked the
 * card for its ATR (pcscd has seen it), bounded by a timeout. <dir>/ready is written when every
 * card is connected and the control socket listens. Logs go to stdout and never carry a secret.
 * SIGTERM / SIGINT end it cleanly. Test code only.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { VirtualCard } from './cards/card.js';
import { openVirtualIotSafe, type IotSafeQuirks } from './cards/iotsafe-applet.js';
import { openVirtualPivCard } from './cards/piv-card.js';
import { connectToVpcd, type VpcdConnection } from './cards/vpcd.js';
import { openVirtualModem, type ModemMode, type ModemQuirks, type VirtualModemPort } from './modem/virtual-modem.js';

export const PIV_VPCD_PORT = 35963;
export const IOTSAFE_VPCD_PORT = 35964;
/** How long `insert` and start-up wait for pcscd to power a card. */
const POWER_UP_TIMEOUT_MS = 10_000;

export interface CardHostOptions {
  dir: string;
  /** DCE end of the modem pty pair; no modem without it. */
  modemDevice?: string;
  pivPort?: number;
  iotsafePort?: number;
  log?: (line: string) => void;
  /** Opens the PIV card (tests may pass another VirtualCard). */
  openPiv?: (stateDir: string, log: (line: string) => void) => VirtualCard;
}

export interface CardHost {
  readonly controlSocket: string;
  /** Answers one control request (what the socket does for each line). */
  control(request: unknown): Promise<Record<string, unknown>>;
  stop(): Promise<void>;
}

/** A card on vpcd, with a count of ATR requests (vpcd asks at power-up and at each presence poll). */
interface VpcdSlot {
  readonly conn: VpcdConnection;
  readonly port: number;
  atrRequests: number;
  waiters: (() => void)[];
}

function attach(card: VirtualCard, port: number, log: (line: string) => void): VpcdSlot {
  const counter = { atrRequests: 0, waiters: [] as (() => void)[] };
  const tracked: VirtualCard = {
    name: card.name,
    atr(): Buffer {
      counter.atrRequests++;
      for (const w of counter.waiters.splice(0)) w();
      return card.atr();
    },
    transmit: (apdu) => card.transmit(apdu),
    reset: () => card.reset(),
  };
  return Object.assign(counter, { conn: connectToVpcd(tracked, port, log), port });
}

/** Resolves true once vpcd has asked for the card's ATR more than `since` times, false on timeout. */
function poweredUp(slot: VpcdSlot, since: number, timeoutMs = POWER_UP_TIMEOUT_MS): Promise<boolean> {
  if (slot.atrRequests > since) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      slot.waiters = slot.waiters.filter((w) => w !== done);
      resolve(false);
    }, timeoutMs);
    const done = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    slot.waiters.push(done);
  });
}

const MODEM_MODES: readonly ModemMode[] = ['normal', 'silent', 'error'];
const MODEM_QUIRK_KEYS = ['echo', 'staleLines', 'getResponse', 'cmeOnSelect', 'cchoBare'] as const;
const IOTSAFE_BOOLEAN_QUIRKS = ['signatureDer', 'getResponse', 't0WrongLe', 'fileSizeLittleEndian'] as const;

class ControlError extends Error {}

/** The boolean fields `keys` of `req` (besides `cmd` and `extra`), refusing any other field. */
function booleanFields<K extends string>(req: Record<string, unknown>, keys: readonly K[], extra: readonly string[] = []): Partial<Record<K, boolean>> {
  const out: Partial<Record<K, boolean>> = {};
  for (const [k, v] of Object.entries(req)) {
    if (k === 'cmd' || extra.includes(k)) continue;
    if (!(keys as readonly string[]).includes(k)) throw new ControlError(`unknown field '${k}'`);
    if (typeof v !== 'boolean') throw new ControlError(`'${k}' must be true or false`);
    out[k as K] = v;
  }
  return out;
}

export async function startCardHost(options: CardHostOptions): Promise<CardHost> {
  const log = options.log ?? ((line: string) => console.log(`card-host: ${line}`));
  const dir = path.resolve(options.dir);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  fs.chmodSync(dir, 0o700);
  fs.rmSync(path.join(dir, 'ready'), { force: true });

  const openPiv = options.openPiv ?? ((stateDir: string, l: (line: string) => void) => openVirtualPivCard(stateDir, { log: l }));
  const piv = openPiv(path.join(dir, 'piv'), log);
  const iotsafe = openVirtualIotSafe(path.join(dir, 'iotsafe'));

  const slots: Record<'piv' | 'iotsafe', VpcdSlot> = {
    piv: attach(piv, options.pivPort ?? PIV_VPCD_PORT, log),
    iotsafe: attach(iotsafe.frontEnd('iotsafe-pcsc'), options.iotsafePort ?? IOTSAFE_VPCD_PORT, log),
  };

  let modemPort: VirtualModemPort | undefined;
  const stopAll = (): void => {
    slots.piv.conn.stop();
    slots.iotsafe.conn.stop();
    modemPort?.close();
  };
  try {
    if (options.modemDevice) {
      modemPort = openVirtualModem(options.modemDevice, iotsafe.frontEnd('iotsafe-modem', { t0: true }), { log });
      log(`modem: answering on ${options.modemDevice}`);
    }
    for (const [name, slot] of Object.entries(slots)) {
      if (!(await poweredUp(slot, 0))) throw new Error(`${name}: pcscd did not power the card on vpcd port ${slot.port} within ${POWER_UP_TIMEOUT_MS} ms`);
    }
  } catch (e) {
    stopAll();
    throw e;
  }

  const status = (): Record<string, unknown> => ({
    ok: true,
    cards: {
      piv: { inserted: slots.piv.conn.inserted, port: slots.piv.port, atrRequests: slots.piv.atrRequests },
      iotsafe: { inserted: slots.iotsafe.conn.inserted, port: slots.iotsafe.port, atrRequests: slots.iotsafe.atrRequests },
      'modem-sim': { inserted: modemPort?.modem.simInserted ?? false },
    },
    modem: modemPort ? { device: modemPort.device, mode: modemPort.modem.mode, quirks: modemPort.modem.quirks } : null,
    iotsafe: { quirks: iotsafe.quirks, objects: iotsafe.describe() },
  });

  const requireModem = (): VirtualModemPort => {
    if (!modemPort) throw new ControlError('this card host runs no modem');
    return modemPort;
  };

  async function control(request: unknown): Promise<Record<string, unknown>> {
    try {
      if (typeof request !== 'object' || request === null || Array.isArray(request)) throw new ControlError('a request is a JSON object');
      const req = request as Record<string, unknown>;
      switch (req.cmd) {
        case 'status':
          return status();
        case 'remove':
        case 'insert': {
          const card = req.card;
          const insert = req.cmd === 'insert';
          if (card === 'modem-sim') {
            requireModem().modem.setSimInserted(insert);
            log(`modem SIM ${insert ? 'inserted' : 'removed'}`);
            return { ok: true, card, inserted: insert };
          }
          if (card !== 'piv' && card !== 'iotsafe') throw new ControlError("'card' must be 'piv', 'iotsafe' or 'modem-sim'");
          const slot = slots[card];
          if (!insert) {
            slot.conn.remove();
            return { ok: true, card, inserted: false };
          }
          if (slot.conn.inserted) return { ok: true, card, inserted: true };
          const before = slot.atrRequests;
          slot.conn.insert();
          if (!(await poweredUp(slot, before))) throw new ControlError(`${card}: pcscd did not power the card within ${POWER_UP_TIMEOUT_MS} ms`);
          return { ok: true, card, inserted: true };
        }
        case 'modem': {
          const mode = req.mode;
          if (!MODEM_MODES.includes(mode as ModemMode)) throw new ControlError("'mode' must be 'normal', 'silent' or 'error'");
          requireModem().modem.mode = mode as ModemMode;
          log(`modem mode ${String(mode)}`);
          return { ok: true, mode };
        }
        case 'modem-quirks': {
          const q: ModemQuirks = booleanFields(req, MODEM_QUIRK_KEYS);
          const m = requireModem().modem;
          m.setQuirks(q);
          log(`modem quirks ${JSON.stringify(m.quirks)}`);
          return { ok: true, quirks: m.quirks };
        }
        case 'iotsafe-quirks': {
          const q: IotSafeQuirks = booleanFields(req, IOTSAFE_BOOLEAN_QUIRKS, ['tag33Length']);
          if ('tag33Length' in req) {
            if (req.tag33Length !== 1 && req.tag33Length !== 2) throw new ControlError("'tag33Length' must be 1 or 2");
            q.tag33Length = req.tag33Length;
          }
          iotsafe.setQuirks(q);
          log(`iotsafe quirks ${JSON.stringify(iotsafe.quirks)}`);
          return { ok: true, quirks: iotsafe.quirks };
        }
        default:
          throw new ControlError(`unknown command ${JSON.stringify(req.cmd ?? null)}`);
      }
    } catch (e) {
      return { ok: false, error: e instanceof ControlError ? e.message : `internal error: ${e instanceof Error ? e.message : String(e)}` };
    }
  }

  // control socket: newline-delimited JSON, answers in request order per connection
  const controlSocket = path.join(dir, 'control.sock');
  fs.rmSync(controlSocket, { force: true });
  const clients = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (sock) => {
    clients.add(sock);
    sock.on('close', () => clients.delete(sock));
    sock.on('error', () => sock.destroy());
    let buf = '';
    let queue = Promise.resolve();
    sock.on('data', (chunk) => {
      buf += chunk.toString('utf8');
      if (buf.length > 65536) {
        sock.end(`${JSON.stringify({ ok: false, error: 'request too long' })}\n`);
        return;
      }
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line === '') continue;
        queue = queue.then(async () => {
          let answer: Record<string, unknown>;
          try {
            answer = await control(JSON.parse(line) as unknown);
          } catch {
            answer = { ok: false, error: 'not JSON' };
          }
          if (!sock.destroyed) sock.write(`${JSON.stringify(answer)}\n`);
        });
      }
    });
    // a client may send its requests and half-close: answer them all, then close
    sock.on('end', () => void queue.then(() => sock.end()));
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(controlSocket, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.chmodSync(controlSocket, 0o600);
  } catch (e) {
    stopAll();
    throw e;
  }

  fs.writeFileSync(path.join(dir, 'ready'), `${process.pid}\n`, { mode: 0o600 });
  log(`ready: PIV on vpcd port ${slots.piv.port}, IoT SAFE on vpcd port ${slots.iotsafe.port}${modemPort ? `, modem on ${modemPort.device}` : ''}, control ${controlSocket}`);

  let stopped = false;
  return {
    controlSocket,
    control,
    async stop(): Promise<void> {
      if (stopped) return;
      stopped = true;
      fs.rmSync(path.join(dir, 'ready'), { force: true });
      for (const c of clients) c.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(controlSocket, { force: true });
      stopAll();
      log('stopped');
    },
  };
}

function parseArgs(argv: string[]): CardHostOptions {
  const opts: CardHostOptions = { dir: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    const port = (): number => {
      const n = Number(value());
      if (!Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`${a} needs a port number`);
      return n;
    };
    if (a === '--dir') opts.dir = value();
    else if (a === '--modem') opts.modemDevice = value();
    else if (a === '--piv-port') opts.pivPort = port();
    else if (a === '--iotsafe-port') opts.iotsafePort = port();
    else throw new Error(`unknown argument ${String(a)}`);
  }
  if (!opts.dir) throw new Error('usage: card-host.ts --dir <cards dir> [--modem <dce pty>] [--piv-port N] [--iotsafe-port N]');
  return opts;
}

async function main(): Promise<void> {
  let host: CardHost;
  try {
    host = await startCardHost(parseArgs(process.argv.slice(2)));
  } catch (e) {
    console.error(`card-host: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  }
  const shutdown = (): void => {
    void host.stop().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) void main();
