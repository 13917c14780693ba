/**
 * Backend registry keyed by URI scheme. Backends are loaded lazily (dynamic import) the first
 * time their scheme is opened, so a process that only uses PKCS#11 never loads libtss2 or pcsc.
 * A backend that cannot load still answers, with BACKEND_UNAVAILABLE and the reason.
 */
import { SealError, asSealError } from './errors.js';
import { checkProtectionLevel } from './protection.js';
import { SealUri } from './uri.js';
import type { Backend, OpenOptions, SecureEnvironment } from './types.js';

type Loader = () => Promise<Backend>;

const loaders = new Map<string, Loader>();
const loaded = new Map<string, Promise<Backend>>();
const unavailable = new Map<string, string>();

export function registerBackend(scheme: string, loader: Loader): void {
  loaders.set(scheme, loader);
  loaded.delete(scheme);
}

/** Declares a scheme that is known but cannot be used in this build, with the reason. */
export function registerUnavailable(scheme: string, reason: string): void {
  unavailable.set(scheme, reason);
}

export function registeredSchemes(): string[] {
  return [...new Set([...loaders.keys(), ...unavailable.keys()])];
}

export async function loadBackend(scheme: string): Promise<Backend> {
  const loader = loaders.get(scheme);
  if (!loader) {
    const reason = unavailable.get(scheme);
    if (reason) throw new SealError('BACKEND_UNAVAILABLE', `the ${scheme}: backend is unavailable: ${reason}`);
    throw new SealError('INVALID_URI', `unknown URI scheme '${scheme}:' (known: ${registeredSchemes().join(', ')})`);
  }
  let p = loaded.get(scheme);
  if (!p) {
    p = loader().catch((e: unknown) => {
      loaded.delete(scheme);
      throw new SealError('BACKEND_UNAVAILABLE', `the ${scheme}: backend could not be loaded: ${asSealError(e).message}`, { cause: e });
    });
    loaded.set(scheme, p);
  }
  return p;
}

/**
 * Opens a secure environment. `uri` may be a string or a parsed SealUri; undefined means the
 * embedded default (a SoftHSM2 token under the seal data directory).
 */
export async function openEnvironment(uri?: string | SealUri, options: OpenOptions = {}): Promise<SecureEnvironment> {
  const parsed = uri === undefined ? SealUri.parse('pkcs11:') : typeof uri === 'string' ? SealUri.parse(uri) : uri;
  const backend = await loadBackend(parsed.scheme);
  const env = await backend.open(parsed, options);
  try {
    checkProtectionLevel(env.info.protectionLevel, options.minProtectionLevel, `environment '${env.info.label}'`);
  } catch (e) {
    await env.close();
    throw e;
  }
  return env;
}
