/**
 * The `pcsc:` and `at:` backends: smart cards and SIMs through a PC/SC reader or a cellular
 * modem's AT command port, with the PIV and GSMA IoT SAFE applet drivers. This file only parses
 * URIs, opens the transport and wires the driver into its environment.
 *
 *   pcsc:reader=<name>;applet=piv[;slot=9a]?pin-source=env:PIV_PIN&mgmt-key-source=file:/path
 *   pcsc:reader=<name>;applet=iotsafe[;object=<label>]
 *   at:port=/dev/ttyUSB2;applet=iotsafe[;object=<label>]?baud=115200&timeout-ms=10000
 *
 * Path attributes: `reader` (PC/SC reader name, exact or a unique part; omitted: the only reader
 * holding a card), `port` (modem AT port), `applet` (`piv` | `iotsafe`; `at:` defaults to
 * `iotsafe`), `slot` (PIV key slot), `object` / `id` / `type` (IoT SAFE container).
 * Query attributes: `pin-source` / `pin-value` (PIV PIN; else SEAL_PIN, else a prompt),
 * `mgmt-key-source=env:NAME|file:PATH` (PIV management key, hex; files must be 0600),
 * `mgmt-key-alg=3des|aes128|aes192|aes256` (default: the card's metadata, else 3DES),
 * `timeout-ms`, `baud` (at:), `peer-object` (IoT SAFE container for a peer's public key),
 * `cla=80|00` (IoT SAFE class byte, default: probed), `protection-level=0..3` (override, warns).
 */
import path from 'node:path';
import { SealError } from '../../core/errors.js';
import { parseSecretSource, pinSourceOf, resolvePin, resolveSecretSource } from '../../core/secrets.js';
import { SealUri } from '../../core/uri.js';
import type { Backend, EnvironmentInfo, OpenOptions, SecureEnvironment } from '../../core/types.js';
import { IotSafeEnvironment, PivEnvironment, cardProtection } from './environment.js';
import { IotSafeApplet } from './iotsafe.js';
import { MGMT_ALGORITHMS, PivApplet, isMgmtAlgName, type GenerationalTransport, type MgmtAlgName, type PivCredentials } from './piv.js';
import { openPcscTransport } from './pcsc-transport.js';
import { openModemTransport, type ModemTransport } from './modem-transport.js';

export { PivEnvironment, IotSafeEnvironment, type PivGenerateKeySpec } from './environment.js';
export { PivKey, IotSafeKey } from './key.js';
export { PIV_CAPABILITIES } from './capabilities.js';

type AppletName = 'piv' | 'iotsafe';

const PATH: Record<'pcsc' | 'at', Record<AppletName, ReadonlySet<string>>> = {
  pcsc: { piv: new Set(['reader', 'applet', 'slot']), iotsafe: new Set(['reader', 'applet', 'object', 'id', 'type']) },
  at: { piv: new Set(), iotsafe: new Set(['port', 'applet', 'object', 'id', 'type']) },
};
const QUERY: Record<'pcsc' | 'at', Record<AppletName, ReadonlySet<string>>> = {
  pcsc: {
    piv: new Set(['pin-source', 'pin-value', 'mgmt-key-source', 'mgmt-key-alg', 'protection-level', 'timeout-ms']),
    iotsafe: new Set(['protection-level', 'timeout-ms', 'peer-object', 'cla']),
  },
  at: { piv: new Set(), iotsafe: new Set(['baud', 'timeout-ms', 'protection-level', 'peer-object', 'cla']) },
};

function appletOf(uri: SealUri, scheme: 'pcsc' | 'at'): AppletName {
  const applet = uri.get('applet') ?? (scheme === 'at' ? 'iotsafe' : undefined);
  if (applet === undefined) throw new SealError('INVALID_URI', 'a pcsc: URI names its applet: applet=piv or applet=iotsafe');
  if (applet !== 'piv' && applet !== 'iotsafe') throw new SealError('INVALID_URI', `unknown applet '${applet.slice(0, 40)}' (piv, iotsafe)`);
  if (scheme === 'at' && applet === 'piv') throw new SealError('NOT_SUPPORTED', 'at: URIs reach the IoT SAFE applet of a SIM; PIV cards go through pcsc:');
  return applet;
}

function checkAttributes(uri: SealUri, scheme: 'pcsc' | 'at', applet: AppletName): void {
  for (const n of uri.pathNames) {
    if (!PATH[scheme][applet].has(n)) throw new SealError('INVALID_URI', `unknown ${scheme}: path attribute '${n}' for applet=${applet}`);
  }
  for (const n of uri.queryNames) {
    if (!QUERY[scheme][applet].has(n)) {
      const why = applet === 'iotsafe' && (n.startsWith('pin-') || n.startsWith('mgmt-')) ? ' (the IoT SAFE applet has no PIN)' : '';
      throw new SealError('INVALID_URI', `unknown ${scheme}: query attribute '${n}' for applet=${applet}${why}`);
    }
  }
}

function intQuery(uri: SealUri, name: string, min: number, max: number): number | undefined {
  const v = uri.query(name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isInteger(n) || n < min || n > max) throw new SealError('INVALID_URI', `${name} must be an integer ${min}..${max}`);
  return n;
}

function claOf(uri: SealUri): 0x00 | 0x80 | undefined {
  const v = uri.query('cla');
  if (v === undefined) return undefined;
  if (v === '80') return 0x80;
  if (v === '00') return 0x00;
  throw new SealError('INVALID_URI', 'cla must be 80 (0x8N, proprietary) or 00 (0x0N)');
}

/** The environment's own URI: transport and applet; the query without secrets; no object part. */
function baseUriOf(uri: SealUri, scheme: 'pcsc' | 'at', place: Record<string, string>, applet: AppletName): SealUri {
  const query: Record<string, string | undefined> = {};
  for (const n of uri.queryNames) if (n !== 'pin-value') query[n] = uri.query(n);
  return SealUri.build(scheme, { ...place, applet }, query);
}

/** The PIV management key from its secret source: hex (16, 24 or 32 bytes), separators allowed. */
export function parseManagementKey(text: string): Buffer {
  const hex = text.replace(/[\s:]/g, '');
  if (!/^[0-9a-fA-F]*$/.test(hex) || ![32, 48, 64].includes(hex.length)) {
    throw new SealError('SECRET_SOURCE', 'the management key must be 32, 48 or 64 hex digits (16, 24 or 32 bytes)');
  }
  return Buffer.from(hex, 'hex');
}

function pivCredentials(uri: SealUri, what: string, options: OpenOptions): PivCredentials {
  pinSourceOf(uri); // a malformed pin-source fails now, not at the first signature
  const mgmtSource = uri.query('mgmt-key-source');
  const source = mgmtSource !== undefined ? parseSecretSource(mgmtSource) : undefined;
  const alg = uri.query('mgmt-key-alg');
  if (alg !== undefined && !isMgmtAlgName(alg)) throw new SealError('INVALID_URI', `mgmt-key-alg must be one of ${Object.keys(MGMT_ALGORITHMS).join(', ')}`);
  return {
    pin: async () => Buffer.from(await resolvePin(uri, what, options), 'utf8'),
    managementKey: () => {
      if (!source) throw new SealError('SECRET_SOURCE', `${what}: this operation needs the PIV management key: give mgmt-key-source=env:NAME|file:PATH in the URI`);
      return parseManagementKey(resolveSecretSource(source));
    },
    managementAlgorithm: alg as MgmtAlgName | undefined,
  };
}

async function openPiv(uri: SealUri, transport: GenerationalTransport, options: OpenOptions, onClose: () => Promise<void>): Promise<SecureEnvironment> {
  const reader = transport.info.name;
  const applet = new PivApplet(transport, pivCredentials(uri, `the PIV card in '${reader}'`, options));
  const id = await applet.identity();
  const protection = cardProtection('pcsc', reader, '', uri.query('protection-level'));
  const serial = id.serial ?? id.guid ?? '';
  const info: EnvironmentInfo = {
    backend: 'pcsc (PIV, SP 800-73-4)',
    manufacturer: id.version ? 'Yubico' : '',
    model: id.version ? 'YubiKey PIV' : 'PIV card',
    serial,
    firmware: id.version ?? '',
    label: id.serial ? `PIV #${id.serial}` : `PIV in '${reader}'`,
    protectionLevel: protection.level,
    protectionReason: protection.reason,
  };
  return new PivEnvironment(applet, { baseUri: baseUriOf(uri, 'pcsc', { reader }, 'piv'), info, onClose });
}

function printable(b: Buffer | undefined): string {
  if (!b || b.length === 0) return '';
  return /^[\x20-\x7e]+$/.test(b.toString('latin1')) ? b.toString('latin1') : b.toString('hex');
}

async function openIotSafe(
  uri: SealUri,
  scheme: 'pcsc' | 'at',
  transport: GenerationalTransport,
  place: Record<string, string>,
  identity: string,
  onClose: () => Promise<void>,
): Promise<SecureEnvironment> {
  const cla = claOf(uri);
  const applet = new IotSafeApplet(transport, cla !== undefined ? { cla } : {});
  const objects = await applet.listObjects();
  const app = await applet.applicationInfo();
  const name = transport.info.name;
  const protection = cardProtection(scheme, name, identity, uri.query('protection-level'));
  const appletId = printable(app?.appletId);
  const info: EnvironmentInfo = {
    backend: `${scheme} (GSMA IoT SAFE)`,
    manufacturer: scheme === 'at' ? identity : '',
    model: `GSMA IoT SAFE applet${appletId ? ` ${appletId}` : ''}`,
    serial: appletId,
    firmware: app?.version ? app.version.toString('hex') : '',
    label: `IoT SAFE in '${name}'`,
    protectionLevel: protection.level,
    protectionReason: protection.reason,
  };
  const peerObject = uri.query('peer-object');
  return new IotSafeEnvironment(applet, objects, app, {
    baseUri: baseUriOf(uri, scheme, place, 'iotsafe'),
    info,
    onClose,
    ...(peerObject !== undefined ? { peerObject } : {}),
  });
}

/** Runs `open` with the transport's release as the environment's onClose; releases on failure. */
async function withTransport(release: () => Promise<void>, open: (onClose: () => Promise<void>) => Promise<SecureEnvironment>): Promise<SecureEnvironment> {
  try {
    return await open(release);
  } catch (e) {
    await release().catch(() => undefined);
    throw e;
  }
}

/**
 * One modem transport per serial port in this process, shared by the environments opened on it
 * (a serial port can be opened once: the OS lock refuses a second open). Each environment has its
 * own logical channel on it; the transport closes with the last environment. The first opener's
 * `baud` and `timeout-ms` apply while the port is shared.
 */
const modems = new Map<string, { transport: Promise<ModemTransport>; users: number }>();

async function acquireModem(port: string, options: { baud?: number; timeoutMs?: number }): Promise<{ transport: ModemTransport; release: () => Promise<void> }> {
  const key = path.resolve(port);
  let entry = modems.get(key);
  if (!entry) {
    const created = { transport: openModemTransport({ port, ...options }), users: 0 };
    modems.set(key, created);
    created.transport.catch(() => {
      if (modems.get(key) === created) modems.delete(key);
    });
    entry = created;
  }
  const shared = entry;
  shared.users += 1;
  let transport: ModemTransport;
  try {
    transport = await shared.transport;
  } catch (e) {
    shared.users -= 1;
    throw e;
  }
  let released = false;
  return {
    transport,
    release: async () => {
      if (released) return;
      released = true;
      shared.users -= 1;
      if (shared.users > 0) return;
      if (modems.get(key) === shared) modems.delete(key);
      await transport.close();
    },
  };
}

export const backend: Backend = {
  scheme: 'pcsc',
  async open(uri: SealUri, options: OpenOptions): Promise<SecureEnvironment> {
    const applet = appletOf(uri, 'pcsc');
    checkAttributes(uri, 'pcsc', applet);
    const timeoutMs = intQuery(uri, 'timeout-ms', 1, 600_000);
    claOf(uri);
    if (applet === 'piv') pivCredentials(uri, 'the PIV card', options);
    const reader = uri.get('reader');
    const transport = await openPcscTransport({ ...(reader !== undefined ? { reader } : {}), ...(timeoutMs !== undefined ? { timeoutMs } : {}) });
    return withTransport(() => transport.close(), (onClose) =>
      applet === 'piv' ? openPiv(uri, transport, options, onClose) : openIotSafe(uri, 'pcsc', transport, { reader: transport.info.name }, '', onClose),
    );
  },
};

export const atBackend: Backend = {
  scheme: 'at',
  async open(uri: SealUri, _options: OpenOptions): Promise<SecureEnvironment> {
    const applet = appletOf(uri, 'at');
    checkAttributes(uri, 'at', applet);
    const port = uri.get('port');
    if (port === undefined || port === '') throw new SealError('INVALID_URI', 'an at: URI names the modem port: at:port=/dev/ttyUSB2');
    const baud = intQuery(uri, 'baud', 300, 4_000_000);
    const timeoutMs = intQuery(uri, 'timeout-ms', 1, 600_000);
    claOf(uri);
    const { transport, release } = await acquireModem(port, { ...(baud !== undefined ? { baud } : {}), ...(timeoutMs !== undefined ? { timeoutMs } : {}) });
    return withTransport(release, (onClose) => openIotSafe(uri, 'at', transport, { port }, transport.identity, onClose));
  },
};

export default backend;
