/**
 * The embedded default environment: a SoftHSM2 token in the seal data directory
 * (`$SEAL_HOME`, else `$XDG_DATA_HOME/seal-bridge`, else `~/.local/share/seal-bridge`), created
 * on first use from softhsm-config/, with generated user and SO PINs stored only in 0600 files
 * there. Token initialization happens in-process (C_InitToken / C_InitPIN), so no PIN ever
 * appears on a command line.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync, openSync, closeSync, unlinkSync, statSync, chmodSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import pkcs11 from 'pkcs11js';
import { sealHome } from '../../core/home.js';
export { sealHome };
import { SealError } from '../../core/errors.js';
import { readSecretFile, writeSecretFile } from '../../core/secrets.js';
import { LoadedModule } from './module.js';
import { mapPkcs11Error } from './errors.js';

export const EMBEDDED_TOKEN_LABEL = 'seal-default';

const SOFTHSM_PATHS = [
  '/usr/lib/softhsm/libsofthsm2.so',
  '/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/local/lib/softhsm/libsofthsm2.so',
];

export function softhsmModulePath(): string {
  const configured = process.env.SEAL_SOFTHSM_MODULE;
  if (configured) return configured;
  const found = SOFTHSM_PATHS.find((p) => existsSync(p));
  if (!found) {
    throw new SealError('MODULE_LOAD_FAILED', 'SoftHSM2 is not installed (no libsofthsm2.so); install the Debian package softhsm2 or run scripts/bootstrap');
  }
  return found;
}

function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'seal-bridge') return dir;
    const up = dirname(dir);
    if (up === dir) throw new SealError('INTERNAL', 'seal-bridge package root not found');
    dir = up;
  }
}

/** Writes a SoftHSM2 configuration for a token directory from softhsm-config/. */
export function writeSoftHsmConfig(confPath: string, tokenDir: string): void {
  const template = readFileSync(join(packageRoot(), 'softhsm-config', 'softhsm2.conf.template'), 'utf8');
  mkdirSync(tokenDir, { recursive: true, mode: 0o700 });
  writeFileSync(confPath, template.replaceAll('@TOKENDIR@', tokenDir), { mode: 0o600 });
}

export interface EmbeddedStore {
  home: string;
  confPath: string;
  pinFile: string;
  modulePath: string;
  /** The SoftHSM2 module, acquired for the caller (who releases it). */
  module: LoadedModule;
}

/** A short-lived exclusive lock so two first uses do not both create the token. */
async function withLock<T>(path: string, fn: () => Promise<T> | T): Promise<T> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      closeSync(openSync(path, 'wx', 0o600));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      // a lock older than a minute belongs to a process that died mid-initialization
      try {
        if (Date.now() - statSync(path).mtimeMs > 60_000) unlinkSync(path);
      } catch {
        // the holder removed it meanwhile
      }
      if (Date.now() > deadline) throw new SealError('DEVICE_UNAVAILABLE', `timed out waiting for ${path}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  try {
    return await fn();
  } finally {
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  }
}

function findSlotByLabel(lib: pkcs11.PKCS11, label: string): pkcs11.Handle | undefined {
  return lib.C_GetSlotList(true).find((s) => lib.C_GetTokenInfo(s).label.replace(/[\s\0]+$/, '') === label);
}

/**
 * Makes sure the embedded store exists and holds an initialized token; returns where it is,
 * with the SoftHSM2 module acquired (SOFTHSM2_CONF pointing here) for the caller.
 */
export async function prepareEmbedded(): Promise<EmbeddedStore> {
  const home = sealHome();
  mkdirSync(home, { recursive: true, mode: 0o700 });
  chmodSync(home, 0o700);
  const confPath = join(home, 'softhsm2.conf');
  const pinFile = join(home, 'user-pin');
  const soPinFile = join(home, 'so-pin');
  const modulePath = softhsmModulePath();
  if (!existsSync(confPath)) writeSoftHsmConfig(confPath, join(home, 'tokens'));
  const module = LoadedModule.acquire(modulePath, { env: { SOFTHSM2_CONF: confPath } });
  try {
    if (!findSlotByLabel(module.lib, EMBEDDED_TOKEN_LABEL)) {
      await withLock(join(home, '.init.lock'), () => {
        if (findSlotByLabel(module.lib, EMBEDDED_TOKEN_LABEL)) return;
        initializeToken(module.lib, pinFile, soPinFile);
      });
    } else if (!existsSync(pinFile)) {
      throw new SealError('SECRET_SOURCE', `the embedded token exists but its PIN file ${pinFile} is missing`);
    }
    readSecretFile(pinFile); // refuse a PIN file that others can read, before anything logs in
  } catch (e) {
    module.release();
    throw e;
  }
  return { home, confPath, pinFile, modulePath, module };
}

function initializeToken(lib: pkcs11.PKCS11, pinFile: string, soPinFile: string): void {
  const slot = lib.C_GetSlotList(true).find((s) => (lib.C_GetTokenInfo(s).flags & pkcs11.CKF_TOKEN_INITIALIZED) === 0);
  if (!slot) throw new SealError('DEVICE_UNAVAILABLE', 'SoftHSM2 offers no free slot for the embedded token');
  const userPin = randomBytes(24).toString('base64url');
  const soPin = randomBytes(24).toString('base64url');
  // PIN files first: a crash after C_InitToken must not leave a token nobody can open
  for (const f of [pinFile, soPinFile]) if (existsSync(f)) unlinkSync(f);
  writeSecretFile(soPinFile, soPin);
  writeSecretFile(pinFile, userPin);
  try {
    lib.C_InitToken(slot, soPin, EMBEDDED_TOKEN_LABEL.padEnd(32, ' '));
    const fresh = findSlotByLabel(lib, EMBEDDED_TOKEN_LABEL);
    if (!fresh) throw new SealError('DEVICE_ERROR', 'the embedded token was initialized but cannot be found');
    const s = lib.C_OpenSession(fresh, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    try {
      lib.C_Login(s, pkcs11.CKU_SO, soPin);
      lib.C_InitPIN(s, userPin);
      lib.C_Logout(s);
    } finally {
      lib.C_CloseSession(s);
    }
  } catch (e) {
    throw mapPkcs11Error(e, 'initialize the embedded SoftHSM2 token');
  }
}
