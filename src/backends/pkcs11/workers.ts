/**
 * Worker threads for single-part operations (sign, verify, encrypt, decrypt) and random. Each
 * thread owns one session of the environment's token and runs batches of requests with
 * synchronous module calls (worker.ts); the event loop only packs requests and unpacks answers.
 * Under load the threads run back to back on every core, a batch per message; a lone call goes
 * out at once.
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
  /** Abandoned threads still inside the module beyond which nothing more is sent. */
  maxStuck: number;
}

/** Threads by default: one per core, at most 4 (the event loop needs a share of the CPU too). */
export function defaultWorkerCount(): number {
  return Math.min(4, Math.max(1, availableParallelism()));
}

/**
 * Most requests in one message. Batches are split evenly over the threads that can take one, so
 * a short queue still spreads; a long one goes out in messages of this size.
 */
const MAX_BATCH = 64;
/** …and at most this many bytes of input and output (at least one request). */
const MAX_BATCH_BYTES = 4 * 1024 * 1024;
/** Nice value of the threads (Linux): the event loop is served first when both want the CPU. */
const THREAD_NICE = 10;

interface Pending {
  req: WorkRequest;
  /** When it was submitted: a request that waited a whole call-timeout behind a hung call times out too. */
  since: number;
  resolve: (v: Buffer | boolean) => void;
  reject: (e: unknown) => void;
}

interface Batch {
  id: number;
  items: Pending[];
}

interface Thread {
  worker: Worker;
  ready: boolean;
  /** Batches sent and not answered, oldest first (at most PIPELINE). */
  inFlight: Batch[];
  /** Items the thread has finished since it started (counted by the thread, in shared memory). */
  progress: Int32Array;
  /** Items answered so far: progress beyond this belongs to the oldest batch in flight. */
  answered: number;
  /** progress at the watchdog's last look. */
  seen: number;
  watchdog: NodeJS.Timeout | undefined;
  /** Just answered: takes more once the answers' continuations have queued their next calls. */
  draining: boolean;
  /** Its session as of its last answer, and what its next batch must do about it. */
  session: Buffer | undefined;
  sessionGeneration: number;
  drop: 'close' | 'forget' | undefined;
}

/** Batches a thread may hold: the next one waits in its queue while it works on one. */
const PIPELINE = 2;

let workerSource: URL | undefined;

/** The thread's script: the built file, or worker.ts transpiled when running from sources. */
async function workerUrl(): Promise<URL> {
  if (workerSource) return workerSource;
  const js = new URL('./worker.js', import.meta.url);
  if (import.meta.url.endsWith('.js') && existsSync(fileURLToPath(js))) {
    workerSource = js;
  } else {
    const ts = (await import('typescript')).default;
    const file = fileURLToPath(new URL('./worker.ts', import.meta.url));
    const out = ts.transpileModule(readFileSync(file, 'utf8'), {
      fileName: file,
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, sourceMap: false },
    });
    workerSource = new URL(`data:text/javascript,${encodeURIComponent(out.outputText)}`);
  }
  return workerSource;
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
  #closed = false;
  readonly stats = { threadsStarted: 0, threadsAbandoned: 0, batches: 0, items: 0 };

  constructor(options: WorkerPoolOptions) {
    this.#o = options;
  }

  submit(req: WorkRequest): Promise<Buffer | boolean> {
    if (this.#closed) return Promise.reject(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
    return new Promise((resolve, reject) => {
      this.#queue.push({ req, since: performance.now(), resolve, reject });
      this.#dispatch();
    });
  }

  #dispatch(): void {
    if (this.#queue.length === 0) return;
    // idle threads first, then a second batch to queue behind a running one
    for (let depth = 0; depth < PIPELINE && this.#queue.length > 0; depth++) {
      const open = this.#threads.filter((t) => t.ready && !t.draining && t.inFlight.length === depth);
      if (depth > 0 && this.#queue.length > 0) this.#grow(); // more work than idle threads
      for (let i = 0; i < open.length && this.#queue.length > 0; i++) {
        this.#send(open[i]!, this.#queue.splice(0, this.#batchSize(Math.ceil(this.#queue.length / (open.length - i)))));
      }
    }
    if (this.#threads.length === 0) this.#grow();
  }

  /** How many requests from the head of the queue go in one batch: at most `want`, MAX_BATCH, MAX_BATCH_BYTES. */
  #batchSize(want: number): number {
    let n = 0;
    let bytes = 0;
    for (const p of this.#queue) {
      bytes += p.req.input.length + (p.req.signature?.length ?? 0) + p.req.outputLength;
      if (n >= Math.min(want, MAX_BATCH) || (n > 0 && bytes > MAX_BATCH_BYTES)) break;
      n++;
    }
    return n;
  }

  /**
   * Starts one more thread, up to the pool's size, when none is starting already: a process that
   * signs once (a CLI call) starts one thread, a loaded server all of them.
   */
  #grow(): void {
    if (this.#starting || this.#closed || this.#threads.length >= this.#o.size || this.#threads.some((t) => !t.ready)) return;
    this.#starting = workerUrl()
      .then((url) => this.#spawn(url))
      .catch((e) => this.#failQueue(new SealError('INTERNAL', `${this.#o.what}: worker threads could not start: ${e instanceof Error ? e.message : String(e)}`, { cause: e })))
      .finally(() => {
        this.#starting = undefined;
      });
  }

  #spawn(url: URL): void {
    if (this.#closed) return;
    const progress = new Int32Array(new SharedArrayBuffer(12));
    Atomics.store(progress, 2, this.#o.module.generation);
    const init: WorkerInit = {
      modulePath: this.#o.module.path,
      requireFrom: import.meta.url,
      progress,
      nice: process.platform === 'linux' ? THREAD_NICE : 0,
      ...(this.#o.libraryParameters ? { libraryParameters: this.#o.libraryParameters } : {}),
    };
    // referenced while it starts (a caller is waiting for it) and while it holds work
    const worker = new Worker(url, { workerData: init });
    const t: Thread = { worker, ready: false, inFlight: [], progress, answered: 0, seen: 0, watchdog: undefined, draining: false, session: undefined, sessionGeneration: -1, drop: undefined };
    this.stats.threadsStarted++;
    this.#threads.push(t);
    worker.on('message', (m: WorkReply | 'ready') => {
      if (m === 'ready') {
        t.ready = true;
        if (this.#closed) return; // close() sent it 'close' and waits for it to end
        this.#dispatch();
        if (t.inFlight.length === 0) worker.unref();
        return;
      }
      this.#answered(t, m);
    });
    worker.on('error', (e) => this.#lost(t, e));
    worker.on('exit', () => this.#lost(t, new Error('worker thread ended')));
  }

  #send(t: Thread, batch: Pending[]): void {
    let msg: WorkBatch;
    try {
      msg = this.#pack(batch);
    } catch (e) {
      // nothing was sent (the token's slot is gone): these requests fail
      for (const p of batch) p.reject(e);
      return;
    }
    if (t.drop) msg.drop = t.drop;
    Atomics.store(t.progress, 2, this.#o.module.generation);
    try {
      t.worker.postMessage(msg, [msg.input.buffer as ArrayBuffer]);
    } catch (e) {
      // a parameter structured clone cannot copy: nothing was sent, these requests fail
      const err = new SealError('INVALID_ARGUMENT', `a request could not be passed to a worker thread: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      for (const p of batch) p.reject(err);
      return;
    }
    t.drop = undefined;
    t.inFlight.push({ id: msg.id, items: batch });
    t.worker.ref(); // a pending answer keeps the process alive
    this.stats.batches++;
    this.stats.items += batch.length;
    if (!t.watchdog) {
      t.seen = Atomics.load(t.progress, 0);
      this.#arm(t);
    }
  }

  /** One message for a batch: inputs in one buffer (transferred), descriptors, the token's slot. */
  #pack(batch: Pending[]): WorkBatch {
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
    return { id: this.#nextId++, slot: new Uint8Array(this.#o.slot()), input, outputSize: outSize, items };
  }

  /** Looks every callTimeoutMs whether the thread finished anything since the last look. */
  #arm(t: Thread): void {
    t.watchdog = setTimeout(() => {
      t.watchdog = undefined;
      if (t.inFlight.length === 0) return;
      const done = Atomics.load(t.progress, 0);
      if (done === t.seen) {
        this.#abandon(t, done - t.answered);
        return;
      }
      t.seen = done;
      this.#arm(t);
    }, this.#o.callTimeoutMs);
  }

  #answered(t: Thread, reply: WorkReply): void {
    const batch = t.inFlight[0];
    if (!batch || reply.id !== batch.id) {
      new Uint8Array(reply.output).fill(0); // a late answer nobody waits for any more
      return;
    }
    t.inFlight.shift();
    t.answered += batch.items.length;
    if (t.inFlight.length === 0) {
      if (t.watchdog) clearTimeout(t.watchdog);
      t.watchdog = undefined;
      t.worker.unref();
    }
    t.session = reply.session ? Buffer.from(reply.session) : undefined;
    t.sessionGeneration = reply.sessionGeneration;
    const out = Buffer.from(reply.output);
    batch.items.forEach((p, i) => settle(p, reply.results[i], out));
    out.fill(0); // each caller got a copy of its own part (plaintexts among them)
    if (batch.items.length === 1) {
      // a lone call: its caller's next call may go out at once
      this.#dispatch();
      return;
    }
    // the answers' callers queue their next calls in the microtasks that follow: let them, so
    // that the thread gets a full batch rather than the first of them alone
    t.draining = true;
    setImmediate(() => {
      t.draining = false;
      this.#dispatch();
    });
  }

  /** The thread stopped making progress: the item in progress times out, the rest is queued again. */
  #abandon(t: Thread, index: number): void {
    const items = t.inFlight.flatMap((b) => b.items);
    t.inFlight = [];
    this.#threads = this.#threads.filter((x) => x !== t);
    this.stats.threadsAbandoned++;
    Atomics.store(t.progress, 1, 1); // the thread skips whatever it still holds
    const timeout = (p: Pending): void => p.reject(new SealError('TIMEOUT', `${p.req.op}: ${this.#o.what} did not answer within ${this.#o.callTimeoutMs} ms`));
    // the thread ends once the module lets go of it (it closes its session first); until then
    // the module stays loaded
    const ended = new Promise<void>((resolve) => t.worker.once('exit', () => resolve()));
    this.#o.module.track(ended);
    t.worker.postMessage('close');
    t.worker.unref();
    // the call in progress times out, and so does whatever already waited a whole call-timeout;
    // the rest goes back to the head of the queue
    const now = performance.now();
    const again: Pending[] = [];
    items.forEach((p, i) => (i === index || now - p.since >= this.#o.callTimeoutMs ? timeout(p) : again.push(p)));
    this.#queue.unshift(...again);
    if (this.#o.module.stuckCalls >= this.#o.maxStuck) {
      // a module that hangs thread after thread: stop feeding it (the session pool refuses new
      // calls the same way until the stuck ones return)
      this.#failQueue(new SealError('DEVICE_UNAVAILABLE', `${this.#o.module.stuckCalls} earlier calls to ${this.#o.what} have not returned; nothing more is sent until they do`));
      return;
    }
    this.#dispatch();
  }

  /** A thread failed or ended on its own: its batches fail, another takes its place. */
  #lost(t: Thread, e: unknown): void {
    if (!this.#threads.includes(t)) return;
    this.#threads = this.#threads.filter((x) => x !== t);
    if (t.watchdog) clearTimeout(t.watchdog);
    const err = new SealError('INTERNAL', `${this.#o.what}: a worker thread failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    for (const b of t.inFlight) for (const p of b.items) p.reject(err);
    t.inFlight = [];
    if (!t.ready && !this.#threads.some((x) => x.ready)) {
      // it never started and no other thread runs: do not start another for the same reason over and over
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
    const generation = this.#o.module.generation;
    for (const t of this.#threads) {
      Atomics.store(t.progress, 2, generation); // after a re-initialization: old numbers are forgotten
      if (t.inFlight.length > 0) {
        t.drop = 'close';
      } else if (t.session && t.sessionGeneration === generation) {
        try {
          this.#o.module.lib.C_CloseSession(t.session);
        } catch {
          // already gone with the device
        }
        t.drop = 'forget';
      } else {
        t.drop = 'forget'; // from before a re-initialization: the number may name another session now
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
      for (const b of t.inFlight) for (const p of b.items) p.reject(new SealError('CLOSED', `environment ${this.#o.what} is closed`));
      Atomics.store(t.progress, 1, 1); // a busy thread skips the rest of what it holds
      t.worker.postMessage('close');
      if (t.inFlight.length > 0) {
        this.#o.module.track(exited);
        t.worker.unref();
      } else {
        t.worker.ref(); // until it has closed its session and ended
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
  else {
    // a buffer of its own: a view would let one caller reach the others' results through .buffer
    const mine = Buffer.allocUnsafeSlow(r.length);
    out.copy(mine, 0, r.offset, r.offset + r.length);
    p.resolve(mine);
  }
}
