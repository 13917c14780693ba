/**
 * One TPM connection: the ESYS context, the storage root key (SRK), the salted session for
 * parameter encryption and a small cache of loaded objects, all rebuilt after a TPM restart or a
 * dead TCTI connection. Operations run one at a time (the TPM executes one command at a time
 * anyway), so a loaded handle cannot be flushed under an operation that is using it.
 *
 * Works without a resource manager: at most `maxLoaded` of our keys are loaded at once (plus a
 * transient SRK when it cannot be made persistent), and everything we load is flushed again.
 *
 * A failure below the TPM can wedge tpm2-tss's ESYS context for good: after a lost TCTI or a
 * response or argument it could not (un)marshal, it answers every later call with
 * TSS2_ESYS_RC_BAD_SEQUENCE without sending anything. Such a context is finalized and created
 * again like a lost connection (and the call repeated: it was never sent). When the TPM itself
 * is still running, what the wedged context had loaded (our objects, by Name, and our salted
 * session) is flushed from the new one, so nothing is left in a TPM without a resource manager.
 */
import { existsSync, readFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import { SealError } from '../../core/errors.js';
import { writeSecretFile } from '../../core/secrets.js';
import { loadTpmShim, TR, type EsysContext } from './native.js';
import { isConnectionLost, isEsysWedged, isStackFailure, isTpmCode, RC, tpmError } from './errors.js';
import {
  AES128_CFB,
  ALG,
  CURVE,
  OBJ,
  SYM_NULL,
  decodeHandles,
  decodeProperties,
  decodePublic,
  encodePublic,
  encodeSensitiveCreate,
  encodeSymDef,
  objectName,
  type PublicArea,
} from './marshal.js';

export const SRK_PERSISTENT_HANDLE = 0x81000001;
const SU_CLEAR = 0x0000;
const SE_HMAC = 0x00;
const SE_POLICY = 0x01;
const SESSION = { continueSession: 0x01, decrypt: 0x20, encrypt: 0x40 } as const;
const CAP_TPM_PROPERTIES = 6;
const CAP_HANDLES = 1;
/** TPM_PT_PERMANENT-class variable properties of the dictionary-attack logic. */
const PT_VAR = { LOCKOUT_COUNTER: 0x20e, MAX_AUTH_FAIL: 0x20f, LOCKOUT_INTERVAL: 0x210, LOCKOUT_RECOVERY: 0x211 } as const;

/** The ECC P-256 storage key template of the TCG provisioning guidance, with noDA. */
export function srkTemplate(): Extract<PublicArea, { type: 'ecc' }> {
  return {
    type: 'ecc',
    nameAlg: ALG.SHA256,
    attributes: OBJ.fixedTPM | OBJ.fixedParent | OBJ.sensitiveDataOrigin | OBJ.userWithAuth | OBJ.noDA | OBJ.restricted | OBJ.decrypt,
    authPolicy: Buffer.alloc(0),
    symmetric: AES128_CFB,
    scheme: { alg: ALG.NULL },
    curve: CURVE['P-256'],
    kdf: { alg: ALG.NULL },
    x: Buffer.alloc(32),
    y: Buffer.alloc(32),
  };
}

export interface ConnectionOptions {
  tcti: string;
  /** Key store directory: the SRK's recorded Name lives here (srk.json). */
  storeDir: string;
  /** Owner hierarchy auth (for making the SRK persistent); empty by default. */
  ownerAuth?: Buffer;
  /** Salted HMAC session with AES-128-CFB parameter encryption (default true). */
  paramEncryption: boolean;
  /** Our objects loaded at once (default 2). */
  maxLoaded: number;
  /**
   * This process is the TPM's only user (no resource manager): at each connection, flush the
   * transient objects and sessions that a crashed run left in the TPM.
   */
  exclusive?: boolean;
}

/** Something the cache can (re)load: its blobs and the parent it belongs under. */
export interface Loadable {
  readonly cacheKey: string;
  readonly public: Buffer;
  readonly private: Buffer;
  /** Auth value of the object (empty when none), set on its handle before each use. */
  auth(): Buffer;
  /** A key made persistent at this handle: used there (after checking its Name), never flushed. */
  readonly persistentHandle?: number | undefined;
  /** A derived object: re-created (deterministically) by TPM2_CreateLoaded under its derivation parent. */
  readonly derivation?: { parent: Loadable; template: Buffer } | undefined;
}

/** What a wedged context left loaded in a TPM that kept running: flushed through the next context. */
interface Leftovers {
  /** Names of our transient objects. */
  names: Buffer[];
  /** TPM handles of our sessions. */
  sessions: number[];
}

export class TpmConnection {
  readonly #o: ConnectionOptions;
  #ctx: EsysContext | undefined;
  #srk: number | undefined;
  #srkTransient = false;
  #srkName: Buffer | undefined;
  #salted: number | undefined;
  #saltedFlags = -1;
  readonly #loaded = new Map<string, number>(); // cacheKey → ESYS_TR, in LRU order
  readonly #publics = new Map<string, Buffer>(); // cacheKey → TPM2B_PUBLIC of what is loaded (for its Name)
  readonly #pins = new Map<string, number>(); // cacheKey → fast-path calls in flight
  readonly #persistent = new Set<string>(); // cached entries that are persistent handles
  /**
   * What a fast-path call found out about its context: dead (lost TCTI) or wedged, dropped before
   * its next use; `suspect` after another failure below the TPM, probed before its next use.
   */
  #broken: { ctx: EsysContext; state: 'lost' | 'wedged' | 'suspect' } | undefined;
  #leftovers: Leftovers | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  /** Incremented at each (re)connection. */
  generation = 0;
  reconnects = 0;
  /** Of the reconnections, those that replaced a wedged ESYS context (TSS2_ESYS_RC_BAD_SEQUENCE). */
  wedges = 0;
  properties = new Map<number, number>();

  constructor(options: ConnectionOptions) {
    this.#o = options;
  }

  get paramEncryption(): boolean {
    return this.#o.paramEncryption;
  }

  /**
   * Runs `fn` alone on the TPM. A dead connection or a wedged ESYS context is rebuilt; `fn` is
   * repeated once when `idempotent`, or when the context refused it without sending anything.
   */
  run<T>(what: string, fn: (ctx: EsysContext) => Promise<T>, idempotent = true): Promise<T> {
    const next = this.#queue.then(async () => {
      if (this.#closed) throw new SealError('CLOSED', 'the TPM environment is closed');
      for (let attempt = 0; ; attempt++) {
        let ctx: EsysContext | undefined;
        try {
          await this.#dropBroken();
          ctx = await this.#context();
          return await fn(ctx);
        } catch (e) {
          // a failure below the TPM may have wedged the context: ask it (one TPM2_GetRandom)
          const state = ctx !== undefined && isStackFailure(e) && !isEsysWedged(e) ? await probe(ctx) : undefined;
          const lost = isConnectionLost(e) || state === 'lost' || (this.#broken !== undefined && this.#broken.ctx === ctx && this.#broken.state === 'lost');
          const wedged = !lost && ctx !== undefined && (isEsysWedged(e) || state === 'wedged');
          const stale = isTpmCode(e, RC.HANDLE) || isTpmCode(e, RC.REFERENCE_H0) || isTpmCode(e, RC.INITIALIZE);
          if (lost || wedged || (attempt === 0 && stale)) {
            // never keep a dead or wedged context, not even when the call is not repeated
            await this.#drop(wedged);
            // repeated: what a wedged context refused unsent; an idempotent call after a lost
            // connection or a TPM restart (not what wedged it: the same arguments would again)
            if (attempt === 0 && (isEsysWedged(e) || (idempotent && (lost || stale)))) continue;
          }
          if (attempt === 0 && isTpmCode(e, RC.OBJECT_MEMORY)) {
            // someone else (or a crashed run of ours) filled the transient slots: free ours, try once more
            await this.#flushAll();
            continue;
          }
          throw await this.#describe(e, what);
        }
      }
    });
    this.#queue = next.catch(() => undefined);
    return next;
  }

  /**
   * Turns a failure into a SealError; a rejected auth value carries the tries left before the
   * dictionary-attack lockout, a lockout the time until the TPM forgets one failure. Never retries.
   */
  async #describe(e: unknown, what: string): Promise<SealError> {
    if (isTpmCode(e, RC.SESSION_MEMORY) || isTpmCode(e, RC.OBJECT_MEMORY)) {
      return tpmError(e, what, {
        detail: 'the TPM\'s slots are full, probably with objects or sessions a process left behind without a resource manager: use /dev/tpmrm0 or tabrmd, restart the TPM, or open with exclusive=on when this process is its only user',
      });
    }
    const authFail = isTpmCode(e, RC.AUTH_FAIL);
    const lockout = isTpmCode(e, RC.LOCKOUT);
    if ((!authFail && !lockout) || !this.#ctx) return tpmError(e, what);
    try {
      const vars = decodeProperties((await this.#ctx.getCapability(CAP_TPM_PROPERTIES, PT_VAR.LOCKOUT_COUNTER, 4)).data);
      const counter = vars.get(PT_VAR.LOCKOUT_COUNTER) ?? 0;
      const max = vars.get(PT_VAR.MAX_AUTH_FAIL) ?? 0;
      const interval = vars.get(PT_VAR.LOCKOUT_INTERVAL) ?? 0;
      if (authFail) {
        const triesLeft = Math.max(0, max - counter);
        return tpmError(e, what, { triesLeft, detail: `wrong auth value; ${triesLeft} tries left before the dictionary-attack lockout` });
      }
      const wait = interval * Math.max(1, counter - max + 1);
      return tpmError(e, what, { triesLeft: 0, detail: `dictionary-attack lockout: the TPM forgets one failure every ${interval} s, authorizations work again in about ${wait} s (or after TPM2_DictionaryAttackLockReset with lockout auth)` });
    } catch {
      return tpmError(e, what);
    }
  }

  async #context(): Promise<EsysContext> {
    if (this.#ctx) return this.#ctx;
    this.#broken = undefined;
    let shim;
    try {
      shim = loadTpmShim();
    } catch (e) {
      throw new SealError('BACKEND_UNAVAILABLE', e instanceof Error ? e.message : String(e));
    }
    const ctx = new shim.Context(this.#o.tcti);
    try {
      await ctx.open();
    } catch (e) {
      await ctx.close().catch(() => undefined);
      throw new SealError('DEVICE_UNAVAILABLE', `cannot connect to the TPM (TCTI ${this.#o.tcti.split(':')[0] ?? ''}): ${tpmError(e, 'connect').message}`, { cause: e });
    }
    try {
      await ctx.startup(SU_CLEAR);
    } catch (e) {
      if (!isTpmCode(e, RC.INITIALIZE)) {
        await ctx.close().catch(() => undefined);
        throw tpmError(e, 'TPM2_Startup');
      }
    }
    if (this.#o.exclusive) await flushStale(ctx);
    const leftovers = this.#leftovers;
    this.#leftovers = undefined;
    if (leftovers && !this.#o.exclusive) await flushLeftovers(ctx, leftovers);
    this.#ctx = ctx;
    this.generation++;
    const props = await ctx.getCapability(CAP_TPM_PROPERTIES, 0x100, 128);
    this.properties = decodeProperties(props.data);
    const vars = await ctx.getCapability(CAP_TPM_PROPERTIES, 0x200, 64);
    for (const [k, v] of decodeProperties(vars.data)) this.properties.set(k, v);
    return ctx;
  }

  /**
   * The fast path for an operation on an object that is already loaded, with a session that needs
   * no change: the call goes straight to the worker's FIFO without waiting for the operation in
   * front of it, so concurrent callers keep the TPM busy back to back. The handle is pinned so no
   * eviction flushes it meanwhile. Undefined when the slow path (`run`) is needed.
   */
  tryFast<T>(cacheKey: string, decrypt: boolean, encrypt: boolean, fn: (ctx: EsysContext, handle: number, session: number) => Promise<T>): Promise<T> | undefined {
    const ctx = this.#ctx;
    if (this.#closed || !ctx) return undefined;
    const handle = this.#loaded.get(cacheKey);
    if (handle === undefined) return undefined;
    let session: number = TR.PASSWORD;
    if (this.#o.paramEncryption) {
      const flags = SESSION.continueSession | (decrypt ? SESSION.decrypt : 0) | (encrypt ? SESSION.encrypt : 0);
      if (this.#salted === undefined || flags !== this.#saltedFlags) return undefined;
      session = this.#salted;
    }
    this.#loaded.delete(cacheKey);
    this.#loaded.set(cacheKey, handle);
    this.#pins.set(cacheKey, (this.#pins.get(cacheKey) ?? 0) + 1);
    return fn(ctx, handle, session).catch((e: unknown) => {
      // the first failure tells what happened to the context (a lost TCTI wedges it as well)
      if (ctx === this.#ctx && !this.#broken && (isConnectionLost(e) || isStackFailure(e))) {
        this.#broken = { ctx, state: isConnectionLost(e) ? 'lost' : isEsysWedged(e) ? 'wedged' : 'suspect' };
      }
      throw e;
    }).finally(() => {
      const n = (this.#pins.get(cacheKey) ?? 1) - 1;
      if (n <= 0) this.#pins.delete(cacheKey);
      else this.#pins.set(cacheKey, n);
    });
  }

  /** True when a fast-path failure should be retried on the slow path (which reconnects and reloads). */
  static retryOnSlowPath(e: unknown): boolean {
    return isConnectionLost(e) || isEsysWedged(e) || isTpmCode(e, RC.HANDLE) || isTpmCode(e, RC.REFERENCE_H0) || isTpmCode(e, RC.INITIALIZE) || (e instanceof Error && /closed|not open/.test(e.message) && !(e instanceof SealError));
  }

  /** The SealError for a fast-path failure (tries left on a wrong auth value, lockout time). */
  describe(e: unknown, what: string): Promise<SealError> {
    return this.#describe(e, what);
  }

  /**
   * Forgets the connection and every handle (after a restart or a lost TCTI). A `wedged` context
   * talked to a TPM that is still running: what it had loaded is flushed from the next context.
   */
  async #drop(wedged = false): Promise<void> {
    const ctx = this.#ctx;
    if (ctx && wedged) {
      this.#leftovers = await this.#leftoversOf(ctx);
      this.wedges++;
    }
    this.#ctx = undefined;
    this.#broken = undefined;
    this.#srk = undefined;
    this.#salted = undefined;
    this.#loaded.clear();
    this.#publics.clear();
    this.reconnects++;
    if (ctx) await ctx.close().catch(() => undefined);
  }

  /** A context a fast-path call found dead or wedged is dropped before anything else uses it. */
  async #dropBroken(): Promise<void> {
    const broken = this.#broken;
    this.#broken = undefined;
    if (!broken || broken.ctx !== this.#ctx) return;
    const state = broken.state === 'suspect' ? await probe(broken.ctx) : broken.state;
    if (state !== 'ok') await this.#drop(state === 'wedged');
  }

  /** Our transient objects (their Names) and sessions (their TPM handles) in a context about to go. */
  async #leftoversOf(ctx: EsysContext): Promise<Leftovers> {
    const names: Buffer[] = [];
    for (const key of this.#loaded.keys()) {
      const pub = this.#publics.get(key);
      if (this.#persistent.has(key) || !pub) continue;
      try {
        names.push(nameOfPublic(pub));
      } catch {
        // a public area that does not parse was never loaded
      }
    }
    if (this.#srkTransient && this.#srk !== undefined && this.#srkName) names.push(this.#srkName);
    const sessions: number[] = [];
    if (this.#salted !== undefined) {
      try {
        // a session's Name is its TPM handle; ESYS answers from its own records, wedged or not
        const { name } = await ctx.trGetName(this.#salted);
        if (name.length === 4) sessions.push(name.readUInt32BE(0));
      } catch {
        // unknown to ESYS: nothing to flush
      }
    }
    return { names, sessions };
  }

  async #flushAll(): Promise<void> {
    const ctx = this.#ctx;
    if (!ctx) return;
    for (const [k, h] of this.#loaded) await this.#release(ctx, k, h);
    this.#loaded.clear();
  }

  /** Flushes a transient object; a persistent one only loses its ESYS resource (it stays in the TPM). */
  async #release(ctx: EsysContext, cacheKey: string, handle: number): Promise<void> {
    this.#publics.delete(cacheKey);
    if (this.#persistent.has(cacheKey)) {
      this.#persistent.delete(cacheKey);
      await ctx.trClose(handle).catch(() => undefined);
    } else {
      await ctx.flushContext(handle).catch(() => undefined);
    }
  }

  // ---- storage root key -------------------------------------------------------------------------

  /** The SRK's handle: the persistent one when its Name is the one on record, else a transient one. */
  async srk(ctx: EsysContext): Promise<number> {
    if (this.#srk !== undefined) return this.#srk;
    const recordFile = path.join(this.#o.storeDir, 'srk.json');
    const recorded = existsSync(recordFile) ? (JSON.parse(readFileSync(recordFile, 'utf8')) as { name?: string }).name : undefined;
    let persistent: number | undefined;
    try {
      persistent = (await ctx.trFromTpmPublic(SRK_PERSISTENT_HANDLE)).handle;
    } catch {
      persistent = undefined;
    }
    if (persistent !== undefined) {
      const { name } = await ctx.readPublic(persistent);
      if (recorded === undefined || recorded !== name.toString('hex')) {
        // not on record yet (or different): compare with the deterministic SRK of the template
        const fresh = await this.#createSrk(ctx);
        const freshName = (await ctx.readPublic(fresh)).name;
        await ctx.flushContext(fresh);
        if (!freshName.equals(name)) {
          throw new SealError('DEVICE_ERROR', `the key at persistent handle 0x${SRK_PERSISTENT_HANDLE.toString(16)} is not the storage root key of the TCG template; refusing to use it`);
        }
        this.#record(recordFile, name);
      }
      this.#srk = persistent;
      this.#srkTransient = false;
    } else {
      const fresh = await this.#createSrk(ctx);
      const name = (await ctx.readPublic(fresh)).name;
      this.#srkName = name;
      try {
        if (this.#o.ownerAuth?.length) await ctx.trSetAuth(TR.RH_OWNER, this.#o.ownerAuth);
        const made = await ctx.evictControl(TR.RH_OWNER, fresh, [TR.PASSWORD], SRK_PERSISTENT_HANDLE);
        await ctx.flushContext(fresh);
        this.#srk = made.handle;
        this.#srkTransient = false;
      } catch {
        // the owner does not allow persistence: keep a transient SRK (re-created identically)
        this.#srk = fresh;
        this.#srkTransient = true;
      }
      this.#record(recordFile, name);
    }
    return this.#srk;
  }

  #record(file: string, name: Buffer): void {
    const tmp = `${file}.${process.pid}.tmp`;
    writeSecretFile(tmp, `${JSON.stringify({ handle: `0x${SRK_PERSISTENT_HANDLE.toString(16)}`, name: name.toString('hex') })}\n`);
    renameSync(tmp, file);
  }

  async #createSrk(ctx: EsysContext): Promise<number> {
    if (this.#o.ownerAuth?.length) await ctx.trSetAuth(TR.RH_OWNER, this.#o.ownerAuth);
    const r = await ctx.createPrimary(TR.RH_OWNER, [TR.PASSWORD], encodeSensitiveCreate(), encodePublic(srkTemplate()));
    return r.handle;
  }

  /** The SRK's public area (for the import helper on a server). */
  async srkPublic(): Promise<Buffer> {
    return this.run('read the storage key', async (ctx) => (await ctx.readPublic(await this.srk(ctx))).public);
  }

  get srkIsPersistent(): boolean {
    return !this.#srkTransient;
  }

  // ---- sessions ------------------------------------------------------------------------------------

  /**
   * The authorization session for a command that uses an object's auth value: a salted HMAC
   * session with parameter encryption (`decrypt`: the first command parameter is encrypted,
   * `encrypt`: the first response parameter is), or the plain password session when turned off.
   */
  async authSession(ctx: EsysContext, decrypt: boolean, encrypt: boolean): Promise<number> {
    if (!this.#o.paramEncryption) return TR.PASSWORD;
    if (this.#salted === undefined) {
      const srk = await this.srk(ctx);
      this.#salted = (await ctx.startAuthSession(srk, TR.NONE, SE_HMAC, encodeSymDef(AES128_CFB), ALG.SHA256)).handle;
      this.#saltedFlags = -1;
    }
    const flags = SESSION.continueSession | (decrypt ? SESSION.decrypt : 0) | (encrypt ? SESSION.encrypt : 0);
    if (flags !== this.#saltedFlags) {
      await ctx.sessionSetAttributes(this.#salted, flags, 0xff);
      this.#saltedFlags = flags;
    }
    return this.#salted;
  }

  /** A policy session satisfied by `satisfy`; flushed by the caller through `flushSession`. */
  async policySession(ctx: EsysContext, satisfy: (session: number) => Promise<void>): Promise<number> {
    const s = (await ctx.startAuthSession(TR.NONE, TR.NONE, SE_POLICY, encodeSymDef(SYM_NULL), ALG.SHA256)).handle;
    try {
      await satisfy(s);
      return s;
    } catch (e) {
      await ctx.flushContext(s).catch(() => undefined);
      throw e;
    }
  }

  // ---- loaded objects ---------------------------------------------------------------------------------

  /** The handle of a loaded object, loading it (and flushing the least recently used) as needed. */
  async loaded(ctx: EsysContext, obj: Loadable): Promise<number> {
    const cached = this.#loaded.get(obj.cacheKey);
    if (cached !== undefined) {
      this.#loaded.delete(obj.cacheKey);
      this.#loaded.set(obj.cacheKey, cached);
      return cached;
    }
    let handle: number;
    if (obj.persistentHandle !== undefined) {
      await this.#makeRoom(ctx);
      handle = (await ctx.trFromTpmPublic(obj.persistentHandle)).handle;
      const { name } = await ctx.readPublic(handle);
      if (!name.equals(nameOfPublic(obj.public))) {
        await ctx.trClose(handle).catch(() => undefined);
        throw new SealError('DEVICE_ERROR', `the object at persistent handle 0x${obj.persistentHandle.toString(16)} is not this key (its Name differs)`);
      }
      this.#persistent.add(obj.cacheKey);
    } else if (obj.derivation) {
      const parent = await this.loaded(ctx, obj.derivation.parent);
      await this.#makeRoom(ctx, obj.derivation.parent.cacheKey);
      const session = await this.authSession(ctx, true, false);
      handle = (await ctx.createLoaded(parent, [session], encodeSensitiveCreate(), obj.derivation.template)).handle;
    } else {
      await this.#makeRoom(ctx);
      const srk = await this.srk(ctx);
      const session = await this.authSession(ctx, true, false);
      handle = (await ctx.load(srk, [session], obj.private, obj.public)).handle;
    }
    this.#loaded.set(obj.cacheKey, handle);
    this.#publics.set(obj.cacheKey, obj.public);
    return handle;
  }

  /** Makes a loaded key persistent at `persistent` (owner authorization); the transient copy is flushed. */
  async persist(ctx: EsysContext, obj: Loadable, persistent: number): Promise<void> {
    const transient = await this.loaded(ctx, obj);
    if (this.#o.ownerAuth?.length) await ctx.trSetAuth(TR.RH_OWNER, this.#o.ownerAuth);
    const made = await ctx.evictControl(TR.RH_OWNER, transient, [TR.PASSWORD], persistent);
    await this.evict(ctx, obj.cacheKey);
    await ctx.trClose(made.handle).catch(() => undefined);
  }

  /** Removes a persistent key from the TPM's NV (owner authorization). */
  async unpersist(ctx: EsysContext, cacheKey: string, persistent: number): Promise<void> {
    await this.evict(ctx, cacheKey);
    const h = (await ctx.trFromTpmPublic(persistent)).handle;
    if (this.#o.ownerAuth?.length) await ctx.trSetAuth(TR.RH_OWNER, this.#o.ownerAuth);
    await ctx.evictControl(TR.RH_OWNER, h, [TR.PASSWORD], persistent);
  }

  /** Flushes least recently used objects (other than `keep`) until one more fits. */
  async #makeRoom(ctx: EsysContext, keep?: string): Promise<void> {
    while (this.#loaded.size >= this.#o.maxLoaded) {
      const victim = [...this.#loaded.keys()].find((k) => k !== keep && !this.#pins.has(k));
      if (victim === undefined) return;
      const h = this.#loaded.get(victim)!;
      this.#loaded.delete(victim);
      await this.#release(ctx, victim, h);
    }
  }

  /** Flushes one object from the cache (after destroy). */
  async evict(ctx: EsysContext, cacheKey: string): Promise<void> {
    const h = this.#loaded.get(cacheKey);
    if (h === undefined) return;
    this.#loaded.delete(cacheKey);
    await this.#release(ctx, cacheKey, h);
  }

  get loadedCount(): number {
    return this.#loaded.size;
  }

  /** Reads TPM handles of a class (e.g. 0x80 transient) — for tests and `doctor`. */
  async handles(first: number): Promise<number[]> {
    return this.run('list handles', async (ctx) => {
      return decodeHandles((await ctx.getCapability(CAP_HANDLES, first, 64)).data);
    });
  }

  async close(): Promise<void> {
    await this.#queue.catch(() => undefined);
    this.#closed = true;
    const ctx = this.#ctx;
    if (!ctx) return;
    // a wedged context flushes nothing: a new one does (a dead one has nothing left to flush)
    const broken = this.#broken?.ctx === ctx ? this.#broken.state : undefined;
    if (broken === 'wedged' || (broken === 'suspect' && (await probe(ctx)) === 'wedged')) {
      await this.#drop(true);
      try {
        await (await this.#context()).close();
      } catch {
        // the TPM went away meanwhile: nothing of ours is left in it
      }
      this.#ctx = undefined;
      return;
    }
    await this.#flushAll();
    this.#ctx = undefined;
    if (this.#salted !== undefined) await ctx.flushContext(this.#salted).catch(() => undefined);
    if (this.#srkTransient && this.#srk !== undefined) await ctx.flushContext(this.#srk).catch(() => undefined);
    await ctx.close().catch(() => undefined);
  }
}

/** Names an object from its TPM2B_PUBLIC bytes. */
export function nameOfPublic(tpm2bPublic: Buffer): Buffer {
  return objectName(decodePublic(tpm2bPublic).bytes);
}

/**
 * Whether a context still works, after a failure that may have wedged it: one TPM2_GetRandom,
 * which a wedged context refuses without sending it.
 */
async function probe(ctx: EsysContext): Promise<'ok' | 'wedged' | 'lost'> {
  try {
    await ctx.getRandom(1);
    return 'ok';
  } catch (e) {
    if (isEsysWedged(e)) return 'wedged';
    return isConnectionLost(e) ? 'lost' : 'ok';
  }
}

/**
 * Flushes what a wedged context left: our sessions by handle, our transient objects by Name.
 * Best effort, never throws: what cannot be flushed now stays until the TPM restarts.
 */
async function flushLeftovers(ctx: EsysContext, left: Leftovers): Promise<void> {
  for (const h of left.sessions) {
    try {
      await ctx.flushContext((await ctx.trFromTpmPublic(h)).handle);
    } catch {
      // gone with a TPM restart
    }
  }
  if (left.names.length === 0) return;
  let handles: number[];
  try {
    handles = decodeHandles((await ctx.getCapability(CAP_HANDLES, 0x80000000, 64)).data).filter((h) => h >>> 24 === 0x80);
  } catch {
    return;
  }
  for (const h of handles) {
    let tr: number | undefined;
    try {
      tr = (await ctx.trFromTpmPublic(h)).handle;
      const { name } = await ctx.trGetName(tr);
      if (left.names.some((n) => n.equals(name))) await ctx.flushContext(tr);
      else await ctx.trClose(tr);
    } catch {
      if (tr !== undefined) await ctx.trClose(tr).catch(() => undefined);
    }
  }
}

/** Flushes every transient object and session in the TPM (exclusive use only). */
async function flushStale(ctx: EsysContext): Promise<void> {
  for (const first of [0x80000000, 0x02000000, 0x03000000]) {
    const handles = decodeHandles((await ctx.getCapability(CAP_HANDLES, first, 64)).data).filter((h) => h >>> 24 === first >>> 24);
    for (const h of handles) {
      try {
        const tr = (await ctx.trFromTpmPublic(h)).handle;
        await ctx.flushContext(tr);
      } catch {
        // gone meanwhile, or a handle ESYS cannot name: leave it
      }
    }
  }
}
