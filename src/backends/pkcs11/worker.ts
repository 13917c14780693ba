/**
 * One thread of the PKCS#11 worker pool (workers.ts). It loads the same module the process
 * already initialized (dlopen hands back the same library; C_Initialize answers
 * CKR_CRYPTOKI_ALREADY_INITIALIZED), opens one session of its own on the environment's token and
 * runs batches of single-part operations on it with synchronous calls: Init and operation back to
 * back, no thread hop per call. The login is the application's, made by the main thread: a
 * session opened here is logged in with it.
 *
 * It never finalizes the module (that would end every session of the process) and never sees a
 * PIN. A status that ends a session (lost session, device error, lost login, module not
 * initialized) drops this thread's session; the next item opens another. So does any other
 * refusal, as on the pool's own sessions. Every item gets its own
 * answer: output bytes at an offset of the batch's reply buffer, a verification verdict, or the
 * module's status.
 *
 * Loaded as a file (built package) or as transpiled source text (tests run from TypeScript), so it
 * imports only Node built-ins and finds pkcs11js through `workerData.requireFrom`.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';
import type * as Pkcs11js from 'pkcs11js';
import type { WorkerInit, WorkBatch, WorkReply, ItemResult } from './worker-protocol.js';

const init = workerData as WorkerInit;
const pkcs11 = createRequire(init.requireFrom)('pkcs11js') as typeof Pkcs11js;
const lib = new pkcs11.PKCS11();

let session: Buffer | undefined;
let sessionGeneration = -1;

/** Structured clone turns Buffers into Uint8Arrays; pkcs11js wants Buffers. */
function buf(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

function revive(v: unknown): unknown {
  if (v instanceof Uint8Array) return buf(v);
  if (Array.isArray(v)) return v.map(revive);
  if (v && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) out[k] = revive(x);
    return out;
  }
  return v;
}

function statusOf(e: unknown): { code: number; method: string; message: string } {
  const err = e as { code?: unknown; method?: unknown; message?: unknown };
  const message = typeof err?.message === 'string' ? err.message : String(e);
  let code = typeof err?.code === 'number' ? err.code : 0;
  // some pkcs11js paths throw a plain Error "CKR_<NAME>:<value>"
  const m = code === 0 ? /^(CKR_[A-Z0-9_]+):(\d{1,10})$/.exec(message) : null;
  if (m) code = Number(m[2]);
  return { code, method: typeof err?.method === 'string' ? err.method : '', message: m ? m[1]! : message };
}

/**
 * An empty message as a zero-length view of a real allocation: a zero-length Buffer may carry a
 * NULL data pointer, which modules refuse as CKR_ARGUMENTS_BAD. (session-pool.ts does the same.)
 */
const EMPTY = Buffer.alloc(1).subarray(0, 0);
function nonNull(data: Buffer): Buffer {
  return data.length === 0 ? EMPTY : data;
}

/** The module's current initialization generation, published by the pool in shared memory. */
function liveGeneration(): number {
  return Atomics.load(init.progress, 2);
}

function dropSession(): void {
  // after a re-initialization the old number may already name someone else's session: forget it
  if (session && sessionGeneration === liveGeneration()) {
    try {
      lib.C_CloseSession(session);
    } catch {
      // a dead session cannot be closed
    }
  }
  session = undefined;
}

function sessionFor(batch: WorkBatch): Buffer {
  const generation = liveGeneration();
  if (session && sessionGeneration !== generation) session = undefined;
  if (!session) {
    session = lib.C_OpenSession(buf(batch.slot), pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
    sessionGeneration = generation;
  }
  return session;
}

function run(batch: WorkBatch): WorkReply {
  if (batch.drop === 'close') dropSession();
  else if (batch.drop === 'forget') session = undefined;
  const input = buf(batch.input);
  const output = Buffer.alloc(batch.outputSize);
  const results: ItemResult[] = [];
  for (const item of batch.items) {
    // abandoned by the pool (a call hung): what is left was handed to other threads
    if (Atomics.load(init.progress, 1) !== 0) break;
    try {
      const s = sessionFor(batch);
      const mech = revive(item.mechanism) as Pkcs11js.Mechanism;
      const key = buf(item.key);
      const data = input.subarray(item.inputOffset, item.inputOffset + item.inputLength);
      const out = output.subarray(item.outputOffset, item.outputOffset + item.outputLength);
      switch (item.op) {
        case 'sign': {
          lib.C_SignInit(s, mech, key);
          const sig = lib.C_Sign(s, nonNull(data), out);
          results.push({ offset: item.outputOffset, length: sig.length });
          break;
        }
        case 'verify': {
          lib.C_VerifyInit(s, mech, key);
          const signature = input.subarray(item.extraOffset ?? 0, (item.extraOffset ?? 0) + (item.extraLength ?? 0));
          results.push({ verified: lib.C_Verify(s, nonNull(data), signature) });
          break;
        }
        case 'encrypt': {
          lib.C_EncryptInit(s, mech, key);
          const ct = lib.C_Encrypt(s, nonNull(data), out);
          results.push({ offset: item.outputOffset, length: ct.length });
          break;
        }
        case 'decrypt': {
          lib.C_DecryptInit(s, mech, key);
          const pt = lib.C_Decrypt(s, data, out);
          results.push({ offset: item.outputOffset, length: pt.length });
          break;
        }
        case 'random':
          lib.C_GenerateRandom(s, out);
          results.push({ offset: item.outputOffset, length: out.length });
          break;
      }
    } catch (e) {
      // like the pool's sessions: a session that saw an error is not used again (a module may
      // leave an operation active after a refusal)
      dropSession();
      results.push({ error: statusOf(e) });
    }
    Atomics.add(init.progress, 0, 1);
  }
  input.fill(0); // plaintexts and messages do not linger in this thread's memory
  return { id: batch.id, session: session ? new Uint8Array(session) : undefined, sessionGeneration, results, output: output.buffer as ArrayBuffer };
}

function lowerPriority(nice: number): void {
  // Linux: this thread's id, so that the main thread (the event loop) wins the CPU when both want it
  try {
    const tid = Number(readlinkSync('/proc/thread-self').split('/').pop());
    if (Number.isInteger(tid) && tid > 0) setPriority(tid, nice);
  } catch {
    // not Linux, or not allowed: the thread keeps the process's priority
  }
}

function start(): void {
  lib.load(init.modulePath);
  try {
    lib.C_Initialize(init.libraryParameters ? { flags: pkcs11.CKF_OS_LOCKING_OK, libraryParameters: init.libraryParameters } : { flags: pkcs11.CKF_OS_LOCKING_OK });
  } catch (e) {
    // the expected answer: the main thread initialized the module for the process
    if (!statusOf(e).message.startsWith('CKR_CRYPTOKI_ALREADY_INITIALIZED')) throw e;
  }
  if (init.nice > 0) lowerPriority(init.nice);
  const port = parentPort!;
  port.on('message', (msg: WorkBatch | 'close') => {
    if (msg === 'close') {
      dropSession();
      port.close();
      return;
    }
    const reply = run(msg);
    port.postMessage(reply, [reply.output]);
  });
  port.postMessage('ready');
}

start();
