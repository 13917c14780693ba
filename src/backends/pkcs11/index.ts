/**
 * The `pkcs11:` backend: any PKCS#11 module through pkcs11js (RFC 7512 URIs), with SoftHSM2 as
 * the embedded default when the URI names no module.
 *
 *   pkcs11:token=gw-hsm;serial=…?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:SEAL_PIN
 *   pkcs11:                                  (the embedded default)
 *
 * Query attributes beyond RFC 7512: `max-sessions` (1..256, default 8), `call-timeout-ms` (how
 * long one asynchronous module call may take before TIMEOUT, default 30000; key generation gets
 * ten times that, at least a minute), `workers` (threads for sign/verify/encrypt/decrypt, 0..16,
 * default one per core up to 4; 0 runs them on the pool's sessions), `protection-level` (an
 * override, with a warning).
 */
import type { Handle } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import { resolvePin } from '../../core/secrets.js';
import { SealUri } from '../../core/uri.js';
import type { Backend, OpenOptions, SecureEnvironment } from '../../core/types.js';
import { Pkcs11Environment, protectionFor } from './environment.js';
import { EMBEDDED_TOKEN_LABEL, prepareEmbedded } from './embedded.js';
import { mapPkcs11Error } from './errors.js';
import { LoadedModule } from './module.js';
import { DEFAULT_CALL_TIMEOUT_MS, SessionPool } from './session-pool.js';
import { defaultWorkerCount } from './workers.js';

export { PKCS11_MECHANISM_ROWS } from './mechanisms.js';
export { Pkcs11Environment } from './environment.js';
export { sealHome, EMBEDDED_TOKEN_LABEL } from './embedded.js';

const DEFAULT_MAX_SESSIONS = 8;
const KNOWN_PATH = new Set(['token', 'manufacturer', 'serial', 'model', 'object', 'id', 'type', 'library-manufacturer', 'library-description', 'library-version', 'slot-description', 'slot-manufacturer', 'slot-id']);
const KNOWN_QUERY = new Set(['module-path', 'module-name', 'pin-source', 'pin-value', 'protection-level', 'max-sessions', 'call-timeout-ms', 'workers']);
const MAX_CALL_TIMEOUT_MS = 24 * 3600 * 1000;

function checkAttributes(uri: SealUri): void {
  for (const n of uri.pathNames) if (!KNOWN_PATH.has(n)) throw new SealError('INVALID_URI', `unknown pkcs11 path attribute '${n}'`);
  for (const n of uri.queryNames) if (!KNOWN_QUERY.has(n)) throw new SealError('INVALID_URI', `unknown pkcs11 query attribute '${n}'`);
  if (uri.has('slot-id')) throw new SealError('INVALID_URI', 'select the token by token= or serial=, not by slot-id: slot ids change between runs');
}

function findSlot(module: LoadedModule, uri: SealUri): Handle {
  const lib = module.lib;
  const wantLabel = uri.get('token');
  const wantSerial = uri.get('serial');
  const wantManufacturer = uri.get('manufacturer');
  const wantModel = uri.get('model');
  let slots: Handle[];
  try {
    slots = lib.C_GetSlotList(true);
  } catch (e) {
    throw mapPkcs11Error(e, 'list the slots');
  }
  const tokens = slots.map((slot) => ({ slot, info: lib.C_GetTokenInfo(slot) }));
  const matches = tokens.filter(({ info }) =>
    (wantLabel === undefined || info.label.replace(/[\s\0]+$/, '') === wantLabel) &&
    (wantSerial === undefined || info.serialNumber.replace(/[\s\0]+$/, '') === wantSerial) &&
    (wantManufacturer === undefined || info.manufacturerID.replace(/[\s\0]+$/, '') === wantManufacturer) &&
    (wantModel === undefined || info.model.replace(/[\s\0]+$/, '') === wantModel),
  );
  const names = tokens.map(({ info }) => `'${info.label.replace(/[\s\0]+$/, '')}'`).join(', ') || 'none';
  if (matches.length === 0) throw new SealError('TOKEN_NOT_FOUND', `no token matches the URI (tokens present: ${names})`);
  if (matches.length > 1) throw new SealError('TOKEN_NOT_FOUND', `${matches.length} tokens match the URI (${names}); add token= or serial=`);
  return matches[0]!.slot;
}

async function open(uri: SealUri, options: OpenOptions): Promise<SecureEnvironment> {
  checkAttributes(uri);
  if (uri.has('object') || uri.has('id') || uri.has('type')) {
    // a key URI opens its environment: drop the object part
    uri = uri.withPath({ object: undefined, id: undefined, type: undefined });
  }
  const embedded = uri.query('module-path') === undefined && uri.query('module-name') === undefined;
  let module: LoadedModule;
  let baseUri: SealUri;
  let pinUri: SealUri;
  if (embedded) {
    const token = uri.get('token');
    if (token !== undefined && token !== EMBEDDED_TOKEN_LABEL) {
      throw new SealError('INVALID_URI', `token '${token}' needs module-path= (only the embedded default '${EMBEDDED_TOKEN_LABEL}' works without one)`);
    }
    const store = await prepareEmbedded();
    module = store.module;
    baseUri = SealUri.build('pkcs11', { token: EMBEDDED_TOKEN_LABEL });
    pinUri = SealUri.build('pkcs11', {}, { 'pin-source': `file:${store.pinFile}` });
    uri = baseUri;
  } else {
    const path = uri.query('module-path');
    if (path === undefined) throw new SealError('INVALID_URI', 'module-name= is not resolved by seal-bridge; give module-path=');
    module = LoadedModule.acquire(path);
    // what a key URI carries: everything but the PIN value and the selection of the key itself
    baseUri = uri.withQuery({ 'pin-value': undefined });
    pinUri = uri;
  }
  let pool: SessionPool | undefined;
  try {
    const slot = findSlot(module, uri);
    const tokenInfo = module.lib.C_GetTokenInfo(slot);
    const label = tokenInfo.label.replace(/[\s\0]+$/, '');
    if (!uri.has('token') && !embedded) baseUri = baseUri.withPath({ token: label });
    let pin: string | undefined;
    const maxQuery = uri.query('max-sessions');
    const maxSessions = maxQuery !== undefined ? Number(maxQuery) : DEFAULT_MAX_SESSIONS;
    if (!Number.isInteger(maxSessions) || maxSessions < 1 || maxSessions > 256) throw new SealError('INVALID_URI', 'max-sessions must be 1..256');
    const timeoutQuery = uri.query('call-timeout-ms') ?? String(DEFAULT_CALL_TIMEOUT_MS);
    const callTimeoutMs = /^\d{1,9}$/.test(timeoutQuery) ? Number(timeoutQuery) : NaN;
    if (!(callTimeoutMs >= 1 && callTimeoutMs <= MAX_CALL_TIMEOUT_MS)) throw new SealError('INVALID_URI', `call-timeout-ms must be 1..${MAX_CALL_TIMEOUT_MS}`);
    const workersQuery = uri.query('workers');
    let workers = workersQuery !== undefined ? (/^\d{1,2}$/.test(workersQuery) ? Number(workersQuery) : NaN) : defaultWorkerCount();
    if (!(workers >= 0 && workers <= 16)) throw new SealError('INVALID_URI', 'workers must be 0..16');
    // a token that limits sessions: the anchor, at least one pooled session, then the threads
    let poolSessions = maxSessions;
    if (tokenInfo.maxSessionCount > 0) {
      const room = Math.max(1, tokenInfo.maxSessionCount - 1);
      workers = Math.min(workers, Math.floor(room / 2));
      poolSessions = Math.max(1, Math.min(maxSessions, room - workers));
    }
    pool = new SessionPool({
      module,
      findSlot: () => findSlot(module, uri),
      // asked once; the same PIN serves re-logins after a lost session (never a different guess)
      pin: async () => (pin ??= await resolvePin(pinUri, `token '${label}'`, options)),
      maxSessions: poolSessions,
      callTimeoutMs,
      workers,
      what: `token '${label}'`,
    });
    await pool.ready();
    const mechanisms = new Set(module.lib.C_GetMechanismList(slot));
    const slotInfo = module.lib.C_GetSlotInfo(slot);
    const moduleInfo = module.lib.C_GetInfo();
    const protection = protectionFor(tokenInfo.manufacturerID, tokenInfo.model, (slotInfo.flags & 0x4) !== 0, uri.query('protection-level'));
    const fw = tokenInfo.firmwareVersion;
    let released = false;
    return new Pkcs11Environment({
      pool,
      modulePath: module.path,
      baseUri,
      mechanisms,
      info: {
        backend: `pkcs11 (${moduleInfo.libraryDescription.replace(/[\s\0]+$/, '')} ${moduleInfo.libraryVersion.major}.${moduleInfo.libraryVersion.minor})`,
        manufacturer: tokenInfo.manufacturerID.replace(/[\s\0]+$/, ''),
        model: tokenInfo.model.replace(/[\s\0]+$/, ''),
        serial: tokenInfo.serialNumber.replace(/[\s\0]+$/, ''),
        firmware: `${fw.major}.${fw.minor}`,
        label,
        protectionLevel: protection.level,
        protectionReason: protection.reason,
      },
      onClose: () => {
        if (!released) module.release();
        released = true;
      },
    });
  } catch (e) {
    // a failed login leaves the anchor session open: close it, or it keeps the token's login
    // state (and a session slot) for the life of the process
    await pool?.close().catch(() => undefined);
    module.release();
    throw e instanceof SealError ? e : mapPkcs11Error(e, 'open the token');
  }
}

export const backend: Backend = { scheme: 'pkcs11', open };
export default backend;
