/**
 * One loaded PKCS#11 module per library path, reference-counted, initialized with
 * CKF_OS_LOCKING_OK (pkcs11js runs *Async calls on libuv worker threads). A module that lost
 * its initialization (CKR_CRYPTOKI_NOT_INITIALIZED after a network HSM fail-over) is
 * re-initialized once; its `generation` changes so that stale session and object handles are
 * dropped rather than reused. Calls the session pool stopped waiting for (timed out) are tracked:
 * the module is not finalized under them, only once the last of them has returned.
 */
import { existsSync } from 'node:fs';
import pkcs11 from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import { mapPkcs11Error } from './errors.js';

export interface ModuleOptions {
  /** NSS-style library parameters (`configdir='sql:…' …`), passed in C_Initialize. */
  libraryParameters?: string;
  /** Environment a module reads at C_Initialize (e.g. SOFTHSM2_CONF); must agree for every user of the module. */
  env?: Record<string, string>;
}

export class LoadedModule {
  readonly path: string;
  readonly lib: pkcs11.PKCS11;
  generation = 0;
  #refs = 0;
  #stuck = 0;
  readonly #options: ModuleOptions;

  private constructor(path: string, options: ModuleOptions) {
    this.path = path;
    this.#options = options;
    this.lib = new pkcs11.PKCS11();
  }

  static #modules = new Map<string, LoadedModule>();

  static acquire(path: string, options: ModuleOptions = {}): LoadedModule {
    let m = LoadedModule.#modules.get(path);
    if (m) {
      for (const [k, v] of Object.entries(options.env ?? {})) {
        if (m.#options.env?.[k] !== v) {
          throw new SealError('DEVICE_UNAVAILABLE', `module ${path} is already loaded in this process with a different ${k}`);
        }
      }
    } else {
      if (!existsSync(path)) throw new SealError('MODULE_LOAD_FAILED', `PKCS#11 module not found: ${path}`);
      m = new LoadedModule(path, options);
      try {
        m.lib.load(path);
      } catch (e) {
        throw new SealError('MODULE_LOAD_FAILED', `PKCS#11 module could not be loaded: ${path}`, { cause: e });
      }
      m.#initialize();
      LoadedModule.#modules.set(path, m);
    }
    m.#refs++;
    return m;
  }

  #initialize(): void {
    // the module reads its environment (e.g. SOFTHSM2_CONF) during C_Initialize only: set it for
    // that call and put the process environment back afterwards
    const saved = new Map<string, string | undefined>();
    for (const [k, v] of Object.entries(this.#options.env ?? {})) {
      saved.set(k, process.env[k]);
      process.env[k] = v;
    }
    const args: pkcs11.InitializationOptions = { flags: pkcs11.CKF_OS_LOCKING_OK };
    if (this.#options.libraryParameters) args.libraryParameters = this.#options.libraryParameters;
    try {
      this.lib.C_Initialize(args);
    } catch (e) {
      const mapped = mapPkcs11Error(e, 'C_Initialize');
      if (mapped.backendCode !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') throw mapped;
    } finally {
      for (const [k, v] of saved) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  }

  /** Re-initializes after the module forgot us; every session and object handle becomes stale. */
  reinitialize(): void {
    // not under a call still inside the module; C_Initialize alone then repairs a module that
    // really forgot us (and answers ALREADY_INITIALIZED to one that did not)
    if (this.#stuck === 0) {
      try {
        this.lib.C_Finalize();
      } catch {
        // already finalized: exactly the situation being repaired
      }
    }
    this.generation++;
    this.#initialize();
  }

  get libraryParameters(): string | undefined {
    return this.#options.libraryParameters;
  }

  /** Calls that timed out and have not returned yet (each holds a libuv worker thread). */
  get stuckCalls(): number {
    return this.#stuck;
  }

  /** Keeps the module loaded until an abandoned call settles; `call` must not reject. */
  track(call: Promise<unknown>): void {
    this.#stuck++;
    const done = (): void => {
      if (--this.#stuck === 0 && this.#refs === 0) this.#unload();
    };
    call.then(done, done);
  }

  release(): void {
    if (--this.#refs > 0) return;
    // finalizing under a call still inside the module is undefined behaviour: the last tracked
    // call to return unloads instead (acquire() meanwhile finds the module still loaded)
    if (this.#stuck > 0) return;
    this.#unload();
  }

  #unload(): void {
    LoadedModule.#modules.delete(this.path);
    try {
      this.lib.C_Finalize();
    } catch {
      // the module may already be gone; nothing left to release
    }
    try {
      this.lib.close();
    } catch {
      // idem
    }
  }
}
