/**
 * Worker threads for single-part operations (sign, verify, encrypt, decrypt). Each thread owns
 * one session of the environment's token and runs batches of requests with synchronous module
 * calls (worker.ts); the event loop only packs requests and unpacks answers. Under load the
 * threads run back to back on every core, a batch per message; a lone call goes out at once.
 *
 * Why not pkcs11js' *Async calls: each of them is one libuv work item (a thread wake-up there and
 * one back), and its C_*Init still runs on the event loop. Here Init and operation run on the
 * thread, and one message carries up to a few milliseconds of work.
 *
 * Hung calls: a thread reports its progress through shared memory. When a batch has not moved
 * for `callTimeoutMs` (checked every `callTimeoutMs`, so it is noticed within twice that), the
 * item in progress fails with TIMEOUT, the items around it go back to the queue (they are all
 * idempotent), and the thread is abandoned: it is replaced, told to close its session and end
 * once the module answers, and the module stays loaded until then.
 */
import { Worker } from 'node:worker_threads';
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { Handle, Mechanism } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import type { LoadedModule } from './module.js';
import type { ItemResult, WorkBatch, WorkerInit, WorkItem, WorkOp, WorkReply } from './worker-protocol.js';

export interface WorkRequest {
  op: WorkOp;
  mechanism: Mechanism;
  key: Handle;
  input: Buffer;
  /** verify: the signature to check. */
  signature?: Buffer;
  /** Room for the output (sign, encrypt, decrypt). */
  outputLength: number;
}

export interface WorkerPoolOptions {
  module: LoadedModule;
  libraryParameters?: string;
  slot: () => Handle;
  size: number;
  callTimeoutMs: number;
  what: string;
}

/** Threads by default: one per core, at most 4 (the event loop needs a share of the CPU too). */
export function defaultWorkerCount(): number {
  return Math.min(4, Math.max(1, availableParallelism()));
}

/** A batch should hold about this much module time: enough to hide the message round trip. */
const BATCH_TARGET_MS = 4;
const MAX_BATCH = 64;
/** Nice value of the threads (Linux): the event loop is served first when both want the CPU. */
const THREAD_NICE = 5;

interface Pending {
  req: WorkRequest;
  resolve: (v: Buffer | boolean) => void;
  reject: (e: unknown) => void;
}

interface Thread {
  worker: Worker;
  ready: boolean;
  /** The batch it is working on. */
  batch: Pending[] | undefined;
  batchId: number;
  /** Items of the current batch the thread has finished (written by the thread). */
  progress: Int32Array;
  watchdog: NodeJS.Timeout | undefined;
  /** Just answered: idle again once the answer's continuations have queued their next calls. */
  draining: boolean;
  started: number;
  /** Its session as of its last answer, and what its next batch must do about it. */
  session: Buffer | undefined;
  drop: 'close' | 'forget' | undefined;
}

let workerSource: { url: URL } | undefined;

/** The thread's script: the built file, or worker.ts transpiled when running from sources. */
async function workerUrl(): Promise<URL> {
  if (workerSource) return workerSource.url;
  const js = new URL('./worker.js', import.meta.url);
  if (import.meta.url.endsWith('.js') && existsSync(fileURLToPath(js))) {
    workerSource = { url: js };
  } else {
    const ts = (await import('typescript')).default;
    const file = fileURLToPath(new URL('./worker.ts', import.meta.url));
    const out = ts.transpileModule(readFileSync(file, 'utf8'), {
      fileName: file,
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, sourceMap: false },
    });
    workerSource = { url: new URL(`data:text/javascript,${encodeURIComponent(out.outputText)}`) };
  }
  return workerSource.url;
}

/** An error the session pool's status mapping reads like a pkcs11js error. */
function moduleError(e: { code: number; method: string; message: string }): Error {
  return Object.assign(new Error(e.message), { code: e.code, method: e.method });
}

export class WorkerPool {
  readonly #o: WorkerPoolOptions;
  #threads: Thread[] = [];
  #queue: Pending[] = [];
  #starting: Promise<void> | undefined;
  #nextId = 1;
  #perItemMs = 1;
  #closed = false;
  #abandoned = 0;
  readonly stats = { threadsStarted: 0, threadsAbandoned: 0, batches: 0, items: 0, timeouts: 0 };

  constructor(options: WorkerPoolOptions) {
    this.#o = options;
  }

  get size(): number {
    return this.#o.size;
  }

  /** Threads that were abandoned and have not ended yet. */
  get stuck(): number {
    return this.#abandoned;
  }

  submit(req: WorkRequest): Promise<Buffer | boolean> {
    if (this.#closed) return Promise.reject(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    return new Promise((resolve, reject) => {
      this.#queue.push({ req, resolve, reject });
      this.#dispatch();
    });
  }

  #dispatch(): void {
    if (this.#queue.length === 0) return;
    if (this.#threads.length < this.#o.size) {
      this.#start();
      if (this.#threads.every((t) => !t.ready)) return; // the first ready thread dispatches
    }
    const idle = this.#threads.filter((t) => t.ready && !t.batch && !t.draining);
    for (let i = 0; i < idle.length && this.#queue.length > 0; i++) {
      const cap = Math.max(1, Math.min(MAX_BATCH, Math.floor(BATCH_TARGET_MS / this.#perItemMs)));
      const n = Math.min(cap, Math.ceil(this.#queue.length / (idle.length - i)));
      this.#send(idle[i]!, this.#queue.splice(0, n));
    }
  }

  #start(): void {
    if (this.#starting) return;
    this.#starting = (async () => {
      const url = await workerUrl();
      while (!this.#closed && this.#threads.length < this.#o.size) this.#spawn(url);
    })()
      .catch((e) => this.#failQueue(new SealError('INTERNAL', `${this.#o.what}: worker threads could not start: ${e instanceof Error ? e.message : String(e)}`, { cause: e })))
      .finally(() => {
        this.#starting = undefined;
      });
  }

  #spawn(url: URL): void {
    const init: WorkerInit = {
      modulePath: this.#o.module.path,
      requireFrom: import.meta.url,
      nice: process.platform === 'linux' ? THREAD_NICE : 0,
      ...(this.#o.libraryParameters ? { libraryParameters: this.#o.libraryParameters } : {}),
    };
    const worker = new Worker(url, { workerData: init });
    worker.unref();
    const t: Thread = { worker, ready: false, batch: undefined, batchId: 0, progress: new Int32Array(1), watchdog: undefined, draining: false, started: 0, session: undefined, drop: undefined };
    this.stats.threadsStarted++;
    this.#threads.push(t);
    worker.on('message', (m: WorkReply | 'ready') => {
      if (m === 'ready') {
        t.ready = true;
        this.#dispatch();
        return;
      }
      this.#answered(t, m);
    });
    worker.on('error', (e) => this.#lost(t, e));
    worker.on('exit', () => this.#lost(t, new Error('worker thread ended')));
  }

  #send(t: Thread, batch: Pending[]): void {
    let inSize = 0;
    let outSize = 0;
    for (const p of batch) {
      inSize += p.req.input.length + (p.req.signature?.length ?? 0);
      outSize += p.req.outputLength;
    }
    const input = new Uint8Array(inSize);
    const items: WorkItem[] = [];
    let inOff = 0;
    let outOff = 0;
    for (const p of batch) {
      const r = p.req;
      input.set(r.input, inOff);
      const item: WorkItem = { op: r.op, mechanism: r.mechanism, key: new Uint8Array(r.key), inputOffset: inOff, inputLength: r.input.length, outputOffset: outOff, outputLength: r.outputLength };
      inOff += r.input.length;
      if (r.signature) {
        input.set(r.signature, inOff);
        item.extraOffset = inOff;
        item.extraLength = r.signature.length;
        inOff += r.signature.length;
      }
      outOff += r.outputLength;
      items.push(item);
    }
    let slot: Handle;
    try {
      slot = this.#o.slot();
    } catch (e) {
      for (const p of batch) p.reject(e);
      return;
    }
    t.progress = new Int32Array(new SharedArrayBuffer(4));
    const msg: WorkBatch = { id: this.#nextId++, generation: this.#o.module.generation, slot: new Uint8Array(slot), input, outputSize: outSize, items, progress: t.progress };
    if (t.drop) msg.drop = t.drop;
    t.drop = undefined;
    t.batch = batch;
    t.batchId = msg.id;
    t.started = performance.now();
    t.worker.ref(); // a pending answer keeps the process alive
    this.stats.batches++;
    this.stats.items += batch.length;
    t.worker.postMessage(msg, [input.buffer]);
    this.#arm(t, 0);
  }

  /** Checks every callTimeoutMs that the thread's batch moved since the last look. */
  #arm(t: Thread, seen: number): void {
    t.watchdog = setTimeout(() => {
      t.watchdog = undefined;
      if (!t.batch) return;
      const done = Atomics.load(t.progress, 0);
      if (done > seen) this.#arm(t, done);
      else this.#abandon(t, done);
    }, this.#o.callTimeoutMs);
  }

  #answered(t: Thread, reply: WorkReply): void {
    const batch = t.batch;
    if (!batch || reply.id !== t.batchId) return;
    if (t.watchdog) clearTimeout(t.watchdog);
    t.watchdog = undefined;
    t.batch = undefined;
    t.session = reply.session ? Buffer.from(reply.session) : undefined;
    t.worker.unref();
    const ms = (performance.now() - t.started) / batch.length;
    this.#perItemMs = this.#perItemMs * 0.8 + ms * 0.2;
    const out = Buffer.from(reply.output);
    batch.forEach((p, i) => settle(p, reply.results[i], out));
    // the answers' callers queue their next calls in the microtasks that follow: let them, so
    // that the thread gets a full batch rather than the first of them alone
    t.draining = true;
    setImmediate(() => {
      t.draining = false;
      this.#dispatch();
    });
  }

  /** The thread's batch stopped moving: the item in progress times out, the rest is queued again. */
  #abandon(t: Thread, done: number): void {
    const batch = t.batch ?? [];
    t.batch = undefined;
    this.#threads = this.#threads.filter((x) => x !== t);
    this.stats.threadsAbandoned++;
    this.stats.timeouts++;
    this.#abandoned++;
    const hung = batch[done];
    const requeue = batch.filter((_, i) => i !== done);
    hung?.reject(new SealError('TIMEOUT', `${hung.req.op}: ${this.#o.what} did not answer within ${this.#o.callTimeoutMs} ms`));
    // the thread ends once the module lets go of it; until then the module stays loaded
    const ended = new Promise<void>((resolve) => {
      t.worker.once('exit', () => resolve());
      t.worker.once('message', () => t.worker.postMessage('close'));
    });
    ended.then(() => {
      this.#abandoned--;
    });
    this.#o.module.track(ended);
    t.worker.unref();
    this.#queue.unshift(...requeue);
    this.#dispatch();
  }

  /** A thread failed or ended on its own: its batch fails, another takes its place. */
  #lost(t: Thread, e: unknown): void {
    if (!this.#threads.includes(t)) return;
    this.#threads = this.#threads.filter((x) => x !== t);
    if (t.watchdog) clearTimeout(t.watchdog);
    const err = new SealError('INTERNAL', `${this.#o.what}: a worker thread failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    for (const p of t.batch ?? []) p.reject(err);
    t.batch = undefined;
    if (!t.ready) {
      // it never started: do not start another for the same reason over and over
      this.#failQueue(err);
      return;
    }
    this.#dispatch();
  }

  /**
   * The session pool dropped its sessions after a lost session or device: the threads' sessions
   * go too. An idle thread's session is closed here at once (a token keeps its login while any
   * session of the application is open); a busy thread closes its own before its next batch.
   */
  dropSessions(): void {
    for (const t of this.#threads) {
      if (t.batch) {
        t.drop = 'close';
      } else if (t.session) {
        try {
          this.#o.module.lib.C_CloseSession(t.session);
        } catch {
          // already gone with the device
        }
        t.drop = 'forget';
      }
      t.session = undefined;
    }
  }

  #failQueue(e: unknown): void {
    for (const p of this.#queue.splice(0)) p.reject(e);
  }

  /** Ends the threads (each closes its session first); a thread still inside the module ends when it returns. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#failQueue(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    const waits: Promise<unknown>[] = [];
    for (const t of this.#threads.splice(0)) {
      const exited = new Promise((resolve) => t.worker.once('exit', resolve));
      if (t.watchdog) clearTimeout(t.watchdog);
      for (const p of t.batch ?? []) p.reject(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
      t.worker.postMessage('close');
      if (t.batch) {
        this.#o.module.track(exited);
        t.worker.unref();
      } else {
        waits.push(exited);
      }
    }
    await Promise.all(waits);
  }
}

function settle(p: Pending, r: ItemResult | undefined, out: Buffer): void {
  if (!r) p.reject(new SealError('INTERNAL', 'worker thread gave no answer for a request'));
  else if ('error' in r) p.reject(moduleError(r.error));
  else if ('verified' in r) p.resolve(r.verified);
  else p.resolve(out.subarray(r.offset, r.offset + r.length));
}
