/**
 * Messages between the PKCS#11 worker pool (workers.ts) and its threads (worker.ts). Inputs of a
 * batch travel in one transferred buffer, outputs come back in another: no per-item copies of
 * pooled Buffers, one structured clone of small descriptors.
 */

export interface WorkerInit {
  modulePath: string;
  libraryParameters?: string;
  /** A file URL from which `pkcs11js` resolves (the pool's own module). */
  requireFrom: string;
  /**
   * Shared memory: [0] items finished (lets the pool tell a hung call from a long batch), [1] set
   * by the pool when it abandoned or closed the thread (the thread then skips what it still
   * holds), [2] the module's initialization generation (a change means every session number
   * opened before is stale: forgotten, never closed).
   */
  progress: Int32Array;
  /** Nice value for the thread (Linux): above the event loop's, so the loop is served first. */
  nice: number;
}

export type WorkOp = 'sign' | 'verify' | 'encrypt' | 'decrypt' | 'random';

export interface WorkItem {
  op: WorkOp;
  /** pkcs11js mechanism; Buffers inside arrive as Uint8Arrays and are revived. */
  mechanism: unknown;
  /** Object handle (8 bytes; empty for random). */
  key: Uint8Array;
  inputOffset: number;
  inputLength: number;
  /** verify: the signature, also in the input buffer. */
  extraOffset?: number;
  extraLength?: number;
  outputOffset: number;
  outputLength: number;
}

export interface WorkBatch {
  id: number;
  slot: Uint8Array;
  input: Uint8Array;
  outputSize: number;
  items: WorkItem[];
  /**
   * The pool dropped its sessions (a lost session or device): 'close' the thread's session, or
   * 'forget' it because the pool already closed it.
   */
  drop?: 'close' | 'forget';
}

export type ItemResult =
  | { offset: number; length: number }
  | { verified: boolean }
  | { error: { code: number; method: string; message: string } };

export interface WorkReply {
  id: number;
  /** The thread's session after the batch and its generation (the pool may close it while the thread is idle). */
  session: Uint8Array | undefined;
  sessionGeneration: number;
  results: ItemResult[];
  output: ArrayBuffer;
}
