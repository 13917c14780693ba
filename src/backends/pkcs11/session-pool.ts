/**
 * Sessions of one token. An operation borrows a session for its Init + operation and gives it
 * back, so concurrent calls on one key never meet CKR_OPERATION_ACTIVE. A persistent "anchor"
 * session holds the login (closing a token's last session would log the user out).
 *
 * Recovery: a session that saw any error is closed, never returned to the pool. A session-fatal
 * status (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR, CKR_USER_NOT_LOGGED_IN, token removed,
 * CKR_CRYPTOKI_NOT_INITIALIZED), from an operation or from the pool's own calls (open, login),
 * makes the pool rebuild before the next call: idle sessions are dropped and the anchor checked
 * (lost session), everything is reopened and the token found again (device error or removal),
 * the module is re-initialized (not initialized); the login follows only when the token says it
 * is gone. An invalid object handle is suspect too (a token that logged the user out hides its
 * private objects that way): the login is checked and cached handles are looked up again.
 * Idempotent work is repeated once on the rebuilt pool, so one such fault costs the caller
 * nothing; a second one in the same call, or any fault in non-idempotent work, reaches the
 * caller as its typed error. A failed C_Login is never repeated within a call; a rejected PIN
 * is remembered and never tried again: every later call fails with the same error until the
 * environment is reopened.
 *
 * Single-part operations (sign, verify, encrypt, decrypt) go to worker threads that own sessions
 * of their own (workers.ts): Init and operation run there, off the event loop, in batches under
 * load. With `workers: 0` they run here like everything else.
 *
 * Timeouts: pkcs11js runs the operation itself (C_Sign, C_Decrypt, key generation, …) on a libuv
 * worker thread, so the pool can stop waiting for it. After `callTimeoutMs` the caller gets
 * TIMEOUT; PKCS#11 has no way to cancel, so the session is set aside (never reused, closed once
 * the module answers) and the next call runs on another one. Abandoned calls each hold a worker
 * thread: once half of libuv's pool is held, calls fail fast with DEVICE_UNAVAILABLE instead of
 * starving the process. A timeout is not retried and triggers no probe of the token (a probe is
 * a synchronous call into a device that may be hung). The synchronous parts of an operation
 * (C_*Init, C_Login, C_FindObjects, …) block the event loop and cannot be bounded from
 * JavaScript.
 */
import pkcs11 from 'pkcs11js';
import type { Handle } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import { ckrOf, HANDLE_SUSPECT, mapPkcs11Error, SESSION_FATAL } from './errors.js';
import type { LoadedModule } from './module.js';
import { WorkerPool, type WorkRequest } from './workers.js';

export interface SessionPoolOptions {
  module: LoadedModule;
  /** Finds the token's slot (by label or serial, never by index); throws TOKEN_NOT_FOUND. */
  findSlot: () => Handle;
  /** Supplies the user PIN when a login is needed; asked at most once per login. */
  pin: () => Promise<string>;
  maxSessions: number;
  /** How long an asynchronous module call may take before the caller gets TIMEOUT. */
  callTimeoutMs: number;
  /** Name of the token for messages. */
  what: string;
  /** Worker threads for single-part operations (0: run them on pool sessions). */
  workers: number;
}

/** Default bound on one module call (URI query `call-timeout-ms`). */
export const DEFAULT_CALL_TIMEOUT_MS = 30_000;
/** Key generation may take far longer than one call (RSA on a card): at least this bound. */
const SLOW_CALL_MIN_MS = 60_000;
const SLOW_CALL_FACTOR = 10;

/**
 * Abandoned calls each hold a libuv worker thread (or one of our own): keep at least half of
 * libuv's pool for the rest. Its size is fixed when the pool first starts.
 */
const MAX_STUCK_CALLS = Math.max(1, Math.floor((Number(process.env.UV_THREADPOOL_SIZE) || 4) / 2));

const EXPIRED = Symbol('expired');

export interface RunOptions {
  /** Safe to repeat once on a fresh session after a session-fatal error (sign, decrypt, find, …). */
  idempotent?: boolean;
  /**
   * Run on the anchor session (serialized): objects created there as session objects live as
   * long as the login, not as long as one pooled session.
   */
  anchored?: boolean;
  /** Key generation: bounded by max(10 × callTimeoutMs, 60 s) instead of callTimeoutMs. */
  slow?: boolean;
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
  readonly stats = { sessionsOpened: 0, sessionsDiscarded: 0, logins: 0, recoveries: 0, reinitializations: 0, retries: 0, timeouts: 0, sessionsSetAside: 0 };

  readonly #workers: WorkerPool | undefined;

  constructor(options: SessionPoolOptions) {
    this.#o = options;
    this.#generation = options.module.generation;
    if (options.workers > 0) {
      const lp = options.module.libraryParameters;
      this.#workers = new WorkerPool({
        module: options.module,
        ...(lp ? { libraryParameters: lp } : {}),
        slot: () => this.slot,
        size: options.workers,
        callTimeoutMs: options.callTimeoutMs,
        what: options.what,
        maxStuck: MAX_STUCK_CALLS,
      });
    }
  }

  /** Counters of the worker threads, if any. */
  get workerStats(): WorkerPool['stats'] | undefined {
    return this.#workers?.stats;
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
    try {
      await this.#rebuild();
    } catch (e) {
      // a lost session or device while opening or logging in: repaired before the next call
      this.#onFailure(e);
      throw mapPkcs11Error(e, `open a session on ${this.#o.what}`);
    }
  }

  async #rebuild(): Promise<void> {
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

  #dropIdle(): void {
    this.#workers?.dropSessions();
    for (const s of this.#idle) this.#close(s);
    this.#open -= this.#idle.length;
    this.#idle = [];
  }

  #dropAll(lostToken: boolean): void {
    this.#dropIdle();
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
    this.#vacate();
  }

  /**
   * A call on `s` was abandoned: `s` leaves the pool at once, is never lent again, and is closed
   * once the module answers (unless the module was re-initialized meanwhile: then the handle may
   * already name someone else's session).
   */
  #setAside(s: Handle, late: Promise<unknown>): void {
    this.stats.sessionsSetAside++;
    const generation = this.#o.module.generation;
    const settle = (): void => {
      if (generation === this.#o.module.generation) this.#close(s);
    };
    this.#o.module.track(late.then(settle, settle));
    this.#vacate();
  }

  /** A borrowed session left the pool for good: its place goes to a waiter or becomes free. */
  #vacate(): void {
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
    const status = e instanceof SealError ? e.backendCode : ckrOf(e)?.name;
    if (status && HANDLE_SUSPECT.has(status)) {
      this.stats.recoveries++;
      // new epoch: keys look their handles up again (a deleted key then says KEY_NOT_FOUND)
      this.#dropIdle();
      this.epoch++;
      this.#checkAnchor = true;
      return true;
    }
    if (!status || !SESSION_FATAL.has(status)) return false;
    this.stats.recoveries++;
    switch (status) {
      case 'CKR_CRYPTOKI_NOT_INITIALIZED':
        if (this.#generation === this.#o.module.generation) {
          this.stats.reinitializations++;
          try {
            this.#o.module.reinitialize();
          } catch {
            // still not initializable: the next call finds the generation changed and tries again
          }
          // the threads learn the new generation now: their session numbers are forgotten
          this.#workers?.dropSessions();
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
        // a lost session: a token that drops one (idle timeout, fail-over) has usually dropped
        // all, so the idle ones go too rather than being tried one per retry
        this.#dropIdle();
        this.#checkAnchor = true;
    }
    return true;
  }

  /** Refuses new work while abandoned calls hold the worker threads it would need. */
  #checkStuck(what: string): void {
    const stuck = this.#o.module.stuckCalls;
    if (stuck >= MAX_STUCK_CALLS) {
      throw new SealError('DEVICE_UNAVAILABLE', `${what}: ${stuck} earlier calls to ${this.#o.what} have not returned; nothing more is sent until they do`);
    }
  }

  #timeoutFor(options: RunOptions): number {
    const ms = this.#o.callTimeoutMs;
    return options.slow ? Math.max(ms * SLOW_CALL_FACTOR, SLOW_CALL_MIN_MS) : ms;
  }

  /**
   * Waits for `work` at most `ms`. On expiry the call is handed to `abandon` (it goes on inside
   * the module) and the caller gets TIMEOUT. Synchronous module calls in `work` run to the end
   * before any timer can fire.
   */
  async #bounded<T>(what: string, work: () => T | Promise<T>, ms: number, abandon: (late: Promise<unknown>) => void): Promise<T> {
    const call = (async () => work())();
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<typeof EXPIRED>((resolve) => {
      timer = setTimeout(resolve, ms, EXPIRED);
    });
    let first: T | typeof EXPIRED;
    try {
      first = await Promise.race([call, expired]);
    } finally {
      clearTimeout(timer);
    }
    if (first !== EXPIRED) return first;
    this.stats.timeouts++;
    abandon(call);
    throw new SealError('TIMEOUT', `${what}: ${this.#o.what} did not answer within ${ms} ms`);
  }

  /**
   * Runs `fn` on a borrowed session. Idempotent work is repeated once on a fresh session after a
   * session-fatal error, so a dropped HSM session costs the caller nothing; anything else fails
   * with the mapped error and the pool is repaired before the next call.
   */
  async run<T>(what: string, fn: (session: Handle) => T | Promise<T>, options: RunOptions = {}): Promise<T> {
    if (options.anchored) return this.#runAnchored(what, fn, options);
    const ms = this.#timeoutFor(options);
    for (let attempt = 0; ; attempt++) {
      this.#checkStuck(what);
      await this.ready();
      const s = await this.#acquire();
      let abandoned = false;
      let result: T;
      try {
        result = await this.#bounded(what, () => fn(s), ms, (late) => {
          abandoned = true;
          this.#setAside(s, late);
        });
      } catch (e) {
        // a timed-out call is not repeated: the device already had its time
        if (abandoned) throw e;
        this.#discard(s);
        const fatal = this.#onFailure(e);
        if (fatal && options.idempotent && attempt === 0) {
          this.stats.retries++;
          continue;
        }
        throw mapPkcs11Error(e, what);
      }
      this.#release(s);
      return result;
    }
  }

  /**
   * A single-part operation: on a worker thread when there are any, else on a borrowed session.
   * `build` makes the request (again for a repeat: object handles may have been looked up anew);
   * it gets the borrowed session when there is one. Recovery and repeats as in run().
   */
  async work(what: string, build: (session?: Handle) => WorkRequest | Promise<WorkRequest>, options: RunOptions = {}): Promise<Buffer | boolean> {
    const workers = this.#workers;
    if (!workers) return this.run(what, async (s) => runHere(this.lib, s, await build(s)), options);
    for (let attempt = 0; ; attempt++) {
      this.#checkStuck(what);
      await this.ready();
      // building looks the key up on a pooled session: that recovers on its own, its errors are final
      const request = await build();
      try {
        return await workers.submit(request);
      } catch (e) {
        if (e instanceof SealError && (e.code === 'TIMEOUT' || e.code === 'CLOSED')) throw e;
        const fatal = this.#onFailure(e);
        if (fatal && options.idempotent && attempt === 0) {
          this.stats.retries++;
          continue;
        }
        throw mapPkcs11Error(e, what);
      }
    }
  }

  #runAnchored<T>(what: string, fn: (session: Handle) => T | Promise<T>, options: RunOptions): Promise<T> {
    const ms = this.#timeoutFor(options);
    const next = this.#anchorQueue.then(async () => {
      this.#checkStuck(what);
      await this.ready();
      const anchor = this.#anchor;
      if (!anchor) throw new SealError('SESSION_LOST', `${what}: no session on ${this.#o.what}`);
      let abandoned = false;
      try {
        return await this.#bounded(what, () => fn(anchor), ms, (late) => {
          abandoned = true;
          this.#abandonAnchor(anchor, late);
        });
      } catch (e) {
        if (abandoned) throw e;
        this.#onFailure(e);
        throw mapPkcs11Error(e, what);
      }
    });
    this.#anchorQueue = next.catch(() => undefined);
    return next;
  }

  /**
   * The anchor's call was abandoned: the next call opens a new anchor and logs in again (session
   * objects of the old one are lost with it); the old one is closed once the module answers.
   */
  #abandonAnchor(anchor: Handle, late: Promise<unknown>): void {
    if (this.#anchor === anchor) {
      this.#anchor = undefined;
      this.#loggedIn = false;
    }
    this.stats.sessionsSetAside++;
    const generation = this.#o.module.generation;
    const settle = (): void => {
      if (generation === this.#o.module.generation && this.#anchor !== anchor) this.#close(anchor);
    };
    this.#o.module.track(late.then(settle, settle));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#waiters.splice(0)) w(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    await this.#workers?.close();
    this.#dropAll(false);
  }
}

/**
 * An empty message as a zero-length view of a real allocation: a zero-length Buffer may carry a
 * NULL data pointer, which modules refuse as CKR_ARGUMENTS_BAD. (worker.ts does the same.)
 */
const EMPTY = Buffer.alloc(1).subarray(0, 0);
const nonNull = (b: Buffer): Buffer => (b.length === 0 ? EMPTY : b);

/** A request on a session of this thread: Init here, the operation on a libuv thread (random: here). */
async function runHere(lib: pkcs11.PKCS11, s: Handle, r: WorkRequest): Promise<Buffer | boolean> {
  switch (r.op) {
    case 'sign':
      lib.C_SignInit(s, r.mechanism, r.key);
      return lib.C_SignAsync(s, nonNull(r.input), Buffer.alloc(r.outputLength));
    case 'verify':
      lib.C_VerifyInit(s, r.mechanism, r.key);
      return lib.C_VerifyAsync(s, nonNull(r.input), r.signature ?? EMPTY);
    case 'encrypt':
      lib.C_EncryptInit(s, r.mechanism, r.key);
      return lib.C_EncryptAsync(s, nonNull(r.input), Buffer.alloc(r.outputLength));
    case 'decrypt':
      lib.C_DecryptInit(s, r.mechanism, r.key);
      return lib.C_DecryptAsync(s, r.input, Buffer.alloc(r.outputLength));
    case 'random':
      return lib.C_GenerateRandom(s, Buffer.alloc(r.outputLength));
  }
}
