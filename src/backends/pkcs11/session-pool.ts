/**
 * Sessions of one token. An operation borrows a session for its Init + operation and gives it
 * back, so concurrent calls on one key never meet CKR_OPERATION_ACTIVE. A persistent "anchor"
 * session holds the login (closing a token's last session would log the user out).
 *
 * Recovery: a session that saw any error is closed, never returned to the pool. A session-fatal
 * status (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR, CKR_USER_NOT_LOGGED_IN, token removed,
 * CKR_CRYPTOKI_NOT_INITIALIZED) makes the pool check its anchor, re-find the token, re-initialize
 * the module when needed and log in again — once. A rejected PIN is remembered and never tried
 * again: every later call fails with the same error until the environment is reopened.
 */
import pkcs11 from 'pkcs11js';
import type { Handle } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import { ckrOf, mapPkcs11Error, SESSION_FATAL } from './errors.js';
import type { LoadedModule } from './module.js';

export interface SessionPoolOptions {
  module: LoadedModule;
  /** Finds the token's slot (by label or serial, never by index); throws TOKEN_NOT_FOUND. */
  findSlot: () => Handle;
  /** Supplies the user PIN when a login is needed; asked at most once per login. */
  pin: () => Promise<string>;
  maxSessions: number;
  /** Name of the token for messages. */
  what: string;
}

export interface RunOptions {
  /** Safe to repeat once on a fresh session after a session-fatal error (sign, decrypt, find, …). */
  idempotent?: boolean;
  /**
   * Run on the anchor session (serialized): objects created there as session objects live as
   * long as the login, not as long as one pooled session.
   */
  anchored?: boolean;
}

export class SessionPool {
  readonly #o: SessionPoolOptions;
  #slot: Handle | undefined;
  #anchor: Handle | undefined;
  #loggedIn = false;
  #idle: Handle[] = [];
  #open = 0;
  #waiters: Array<(s: Handle | SealError) => void> = [];
  #readying: Promise<void> | undefined;
  #pinError: SealError | undefined;
  #checkAnchor = false;
  #generation: number;
  #closed = false;
  #anchorQueue: Promise<unknown> = Promise.resolve();
  #epochOf = new WeakMap<Handle, number>();
  /** Changes whenever every session was dropped: cached object handles must be looked up again. */
  epoch = 0;
  /** Counters for doctor/tests: recoveries performed. */
  readonly stats = { sessionsOpened: 0, sessionsDiscarded: 0, logins: 0, recoveries: 0, reinitializations: 0 };

  constructor(options: SessionPoolOptions) {
    this.#o = options;
    this.#generation = options.module.generation;
  }

  get lib(): pkcs11.PKCS11 {
    return this.#o.module.lib;
  }

  get slot(): Handle {
    if (!this.#slot) this.#slot = this.#o.findSlot();
    return this.#slot;
  }

  /** Opens the anchor session and logs in if the token needs it. */
  ready(): Promise<void> {
    if (this.#closed) return Promise.reject(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    if (this.#pinError) return Promise.reject(this.#pinError);
    if (this.#anchor && this.#loggedIn && !this.#checkAnchor && this.#generation === this.#o.module.generation) return Promise.resolve();
    if (!this.#readying) {
      this.#readying = this.#makeReady().finally(() => {
        this.#readying = undefined;
      });
    }
    return this.#readying;
  }

  async #makeReady(): Promise<void> {
    if (this.#generation !== this.#o.module.generation) {
      this.#dropAll(false);
      this.#generation = this.#o.module.generation;
    }
    if (this.#anchor && this.#checkAnchor) {
      this.#checkAnchor = false;
      try {
        const info = this.lib.C_GetSessionInfo(this.#anchor);
        this.#loggedIn = info.state === 3 /* CKS_RW_USER_FUNCTIONS */ || info.state === 1 /* CKS_RO_USER_FUNCTIONS */;
      } catch {
        this.#dropAll(true);
      }
    }
    if (!this.#anchor) {
      this.#anchor = this.#openSession();
      this.#open--; // the anchor does not count against the operation pool
      this.#loggedIn = false;
    }
    if (!this.#loggedIn) {
      const info = this.lib.C_GetTokenInfo(this.slot);
      if ((info.flags & pkcs11.CKF_LOGIN_REQUIRED) === 0) {
        this.#loggedIn = true;
        return;
      }
      const pin = await this.#o.pin();
      try {
        this.stats.logins++;
        this.lib.C_Login(this.#anchor, pkcs11.CKU_USER, pin);
      } catch (e) {
        const ckr = ckrOf(e);
        if (ckr?.name !== 'CKR_USER_ALREADY_LOGGED_IN') {
          const err = this.#loginError(e);
          if (err.code === 'PIN_INCORRECT' || err.code === 'PIN_LOCKED') this.#pinError = err;
          throw err;
        }
      }
      this.#loggedIn = true;
    }
  }

  #loginError(e: unknown): SealError {
    const mapped = mapPkcs11Error(e, `login to ${this.#o.what}`);
    if (mapped.code !== 'PIN_INCORRECT' && mapped.code !== 'PIN_LOCKED') return mapped;
    let flags = 0;
    try {
      flags = this.lib.C_GetTokenInfo(this.slot).flags;
    } catch {
      // token info is a courtesy here; the PIN error stands on its own
    }
    const opts = { backendCode: mapped.backendCode, backendStatus: mapped.backendStatus, cause: e };
    if (flags & pkcs11.CKF_USER_PIN_LOCKED || mapped.code === 'PIN_LOCKED') {
      return new SealError('PIN_LOCKED', `the user PIN of ${this.#o.what} is locked`, { ...opts, triesLeft: 0 });
    }
    const triesLeft = flags & pkcs11.CKF_USER_PIN_FINAL_TRY ? 1 : undefined;
    const hint = triesLeft === 1 ? ' (one try left)' : flags & pkcs11.CKF_USER_PIN_COUNT_LOW ? ' (few tries left)' : '';
    return new SealError('PIN_INCORRECT', `the PIN for ${this.#o.what} was rejected${hint}; it is not tried again`, triesLeft === undefined ? opts : { ...opts, triesLeft });
  }

  #openSession(): Handle {
    const s = this.lib.C_OpenSession(this.slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    this.#open++;
    this.stats.sessionsOpened++;
    this.#epochOf.set(s, this.epoch);
    return s;
  }

  #close(s: Handle): void {
    try {
      this.lib.C_CloseSession(s);
    } catch {
      // a dead session cannot be closed; forgetting it is all that is left to do
    }
  }

  #dropAll(lostToken: boolean): void {
    for (const s of this.#idle) this.#close(s);
    this.#open -= this.#idle.length;
    this.#idle = [];
    if (this.#anchor) this.#close(this.#anchor);
    this.#anchor = undefined;
    this.#loggedIn = false;
    if (lostToken) this.#slot = undefined;
    this.epoch++;
  }

  async #acquire(): Promise<Handle> {
    const s = this.#idle.pop();
    if (s) return s;
    if (this.#open < this.#o.maxSessions) {
      try {
        return this.#openSession();
      } catch (e) {
        this.#onFailure(e);
        throw mapPkcs11Error(e, `open a session on ${this.#o.what}`);
      }
    }
    const got = await new Promise<Handle | SealError>((resolve) => this.#waiters.push(resolve));
    if (got instanceof SealError) throw got;
    return got;
  }

  #release(s: Handle): void {
    if (this.#epochOf.get(s) !== this.epoch) {
      // borrowed before the pool was rebuilt: it belongs to a dead login
      this.#discard(s);
      return;
    }
    const w = this.#waiters.shift();
    if (w) w(s);
    else this.#idle.push(s);
  }

  #discard(s: Handle): void {
    this.#close(s);
    this.stats.sessionsDiscarded++;
    const w = this.#waiters.shift();
    if (w) {
      // hand the waiter a fresh session in place of the dead one
      try {
        const fresh = this.lib.C_OpenSession(this.slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
        this.stats.sessionsOpened++;
        this.#epochOf.set(fresh, this.epoch);
        w(fresh);
      } catch (e) {
        this.#open--;
        w(mapPkcs11Error(e, `open a session on ${this.#o.what}`));
      }
    } else {
      this.#open--;
    }
  }

  /** Reacts to a failed call: decides what must be rebuilt before the next one. */
  #onFailure(e: unknown): boolean {
    const ckr = ckrOf(e);
    if (!ckr || !SESSION_FATAL.has(ckr.name)) return false;
    this.stats.recoveries++;
    switch (ckr.name) {
      case 'CKR_CRYPTOKI_NOT_INITIALIZED':
        if (this.#generation === this.#o.module.generation) {
          this.stats.reinitializations++;
          this.#o.module.reinitialize();
        }
        break;
      case 'CKR_DEVICE_ERROR':
      case 'CKR_DEVICE_REMOVED':
      case 'CKR_TOKEN_NOT_PRESENT':
        this.#dropAll(true);
        break;
      case 'CKR_USER_NOT_LOGGED_IN':
        this.#loggedIn = false;
        this.#checkAnchor = true;
        break;
      default:
        this.#checkAnchor = true;
    }
    return true;
  }

  /**
   * Runs `fn` on a borrowed session. Idempotent work is repeated once on a fresh session after a
   * session-fatal error, so a dropped HSM session costs the caller nothing; anything else fails
   * with the mapped error and the pool is repaired before the next call.
   */
  async run<T>(what: string, fn: (session: Handle) => T | Promise<T>, options: RunOptions = {}): Promise<T> {
    if (options.anchored) return this.#runAnchored(what, fn);
    for (let attempt = 0; ; attempt++) {
      await this.ready();
      const s = await this.#acquire();
      try {
        const result = await fn(s);
        this.#release(s);
        return result;
      } catch (e) {
        this.#discard(s);
        const fatal = this.#onFailure(e);
        if (fatal && options.idempotent && attempt === 0) continue;
        throw mapPkcs11Error(e, what);
      }
    }
  }

  #runAnchored<T>(what: string, fn: (session: Handle) => T | Promise<T>): Promise<T> {
    const next = this.#anchorQueue.then(async () => {
      await this.ready();
      const anchor = this.#anchor;
      if (!anchor) throw new SealError('SESSION_LOST', `${what}: no session on ${this.#o.what}`);
      try {
        return await fn(anchor);
      } catch (e) {
        this.#onFailure(e);
        throw mapPkcs11Error(e, what);
      }
    });
    this.#anchorQueue = next.catch(() => undefined);
    return next;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#waiters.splice(0)) w(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    this.#dropAll(false);
  }
}
