/**
 * Test access to the card host's control socket (test/sim/card-host.ts), whose path
 * `scripts/sim start` exports as SEAL_CARD_CONTROL: remove and insert virtual cards, switch the
 * virtual modem's mode and quirks, switch the IoT SAFE applet's quirks. Each helper returns once
 * the change is effective: card removal and insertion are awaited as PC/SC itself reports them
 * (opensc-tool -l on SEAL_PIV_READER / SEAL_IOTSAFE_READER); mode and quirk changes are in force
 * when the card host answers.
 */
import { execFile } from 'node:child_process';
import net from 'node:net';
import type { IotSafeQuirks } from '../sim/cards/iotsafe-applet.js';
import type { ModemMode, ModemQuirks } from '../sim/modem/virtual-modem.js';
import { requireEnv } from './env.js';

export type { IotSafeQuirks } from '../sim/cards/iotsafe-applet.js';
export type { ModemMode, ModemQuirks } from '../sim/modem/virtual-modem.js';

export type CardName = 'piv' | 'iotsafe' | 'modem-sim';

export interface CardControlResponse {
  ok: boolean;
  error?: string;
  [field: string]: unknown;
}

const CONTROL_TIMEOUT_MS = 30_000;
const PCSC_TIMEOUT_MS = 15_000;

/** Sends one request to the card host and returns its answer (`ok` false included, not thrown). */
export function cardControl(request: Record<string, unknown>): Promise<CardControlResponse> {
  const socketPath = requireEnv('SEAL_CARD_CONTROL');
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`card host: no answer to ${String(request.cmd)} within ${CONTROL_TIMEOUT_MS} ms`));
    }, CONTROL_TIMEOUT_MS);
    sock.on('connect', () => sock.write(`${JSON.stringify(request)}\n`));
    sock.on('data', (chunk) => {
      buf += chunk.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      try {
        resolve(JSON.parse(buf.slice(0, nl)) as CardControlResponse);
      } catch {
        reject(new Error('card host: answer is not JSON'));
      }
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`card host control socket ${socketPath}: ${e.message}`));
    });
  });
}

async function mustControl(request: Record<string, unknown>): Promise<CardControlResponse> {
  const r = await cardControl(request);
  if (!r.ok) throw new Error(`card host refused ${String(request.cmd)}: ${r.error ?? 'no reason given'}`);
  return r;
}

/** Whether PC/SC reports a card in `reader` (opensc-tool -l); undefined when the reader is not listed. */
export function readerHasCard(reader: string): Promise<boolean | undefined> {
  return new Promise((resolve, reject) => {
    execFile('opensc-tool', ['-l'], { timeout: 10_000 }, (err, stdout) => {
      // opensc-tool exits non-zero when no reader is found; the listing decides
      if (err && !stdout) {
        reject(new Error(`opensc-tool -l failed: ${err.message}`));
        return;
      }
      for (const line of stdout.split('\n')) {
        // "Nr.  Card  Features  Name" rows: "1    Yes             Virtual PCD 00 01"
        const m = /^\s*\d+\s+(Yes|No)\s+(.*)$/.exec(line);
        if (m && m[2]!.trimEnd().endsWith(reader)) {
          resolve(m[1] === 'Yes');
          return;
        }
      }
      resolve(undefined);
    });
  });
}

function readerOf(card: 'piv' | 'iotsafe'): string {
  return requireEnv(card === 'piv' ? 'SEAL_PIV_READER' : 'SEAL_IOTSAFE_READER');
}

async function waitForReader(reader: string, present: boolean): Promise<void> {
  const deadline = Date.now() + PCSC_TIMEOUT_MS;
  for (;;) {
    if ((await readerHasCard(reader)) === present) return;
    if (Date.now() > deadline) throw new Error(`PC/SC still reports ${present ? 'no card' : 'a card'} in '${reader}' after ${PCSC_TIMEOUT_MS} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Takes a virtual card out; returns when PC/SC (or, for the modem SIM, the modem) no longer sees it. */
export async function removeCard(card: CardName): Promise<void> {
  await mustControl({ cmd: 'remove', card });
  if (card !== 'modem-sim') await waitForReader(readerOf(card), false);
}

/** Puts a virtual card back; returns when PC/SC (or, for the modem SIM, the modem) sees it again. */
export async function insertCard(card: CardName): Promise<void> {
  await mustControl({ cmd: 'insert', card });
  if (card !== 'modem-sim') await waitForReader(readerOf(card), true);
}

export async function setModemMode(mode: ModemMode): Promise<void> {
  await mustControl({ cmd: 'modem', mode });
}

/** Sets the quirks given (others unchanged); returns the quirks now in force. */
export async function setModemQuirks(quirks: ModemQuirks): Promise<ModemQuirks> {
  return (await mustControl({ cmd: 'modem-quirks', ...quirks })).quirks as ModemQuirks;
}

/** Sets the quirks given (others unchanged); returns the quirks now in force. */
export async function setIotSafeQuirks(quirks: IotSafeQuirks): Promise<IotSafeQuirks> {
  return (await mustControl({ cmd: 'iotsafe-quirks', ...quirks })).quirks as IotSafeQuirks;
}

/** Back to a plain modem and applet: mode normal, every quirk off, all cards inserted. */
export async function resetCardSimulators(): Promise<void> {
  await setModemMode('normal');
  await setModemQuirks({ echo: false, staleLines: false, getResponse: false, cmeOnSelect: false, cchoBare: false });
  await setIotSafeQuirks({ signatureDer: false, tag33Length: 1, getResponse: false, t0WrongLe: false, fileSizeLittleEndian: false });
  for (const card of ['piv', 'iotsafe', 'modem-sim'] as const) await insertCard(card);
}

export async function cardStatus(): Promise<CardControlResponse> {
  return mustControl({ cmd: 'status' });
}
