/**
 * Lazy loading of a native shim from native-shims/<name>/build/Release: loaded once on first use;
 * when it cannot be used (not built, its system library missing) every call throws the same Error
 * saying why, so the backend it serves reports BACKEND_UNAVAILABLE and nothing else is affected.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { findPackageRoot } from './package-root.js';

export interface ShimSpec {
  /** Path below the package root, e.g. native-shims/tpm2/build/Release/tpm2_esys.node. */
  relative: string;
  /** What to do when the file is missing (e.g. which Debian package to install). */
  notBuilt: string;
  /** What may be wrong when the file exists but does not load. */
  loadHint: string;
  /** Runs once before the first load (e.g. to set a library's environment defaults). */
  before?: () => void;
}

export function shimLoader<T>(spec: ShimSpec): () => T {
  let shim: T | undefined;
  let reason: string | undefined;
  return () => {
    if (shim) return shim;
    if (reason === undefined) {
      const root = findPackageRoot();
      const file = root === undefined ? undefined : path.join(root, spec.relative);
      if (file === undefined) reason = 'seal-bridge package root not found';
      else if (!existsSync(file)) reason = spec.notBuilt;
      else {
        spec.before?.();
        try {
          shim = createRequire(import.meta.url)(file) as T;
          return shim;
        } catch (e) {
          reason = `${spec.loadHint}: ${e instanceof Error ? e.message : String(e)}`;
        }
      }
    }
    throw new Error(reason);
  };
}
