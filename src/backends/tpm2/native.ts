/**
 * Lazy loader and typed surface of the `tpm2_esys` native shim (native-shims/tpm2). Each
 * EsysContext owns one ESYS_CONTEXT on its own worker thread; every call returns a Promise and
 * queues FIFO behind the previous ones. TPM structures cross as their wire encoding (marshal.ts).
 * A process without libtss2 (or without the built shim) gets a reason instead of a crash.
 */
import path from 'node:path';
import { shimLoader } from '../../core/native-shim.js';

/** ESYS_TR values for sessions and hierarchies (tss2_esys.h). */
export const TR = {
  NONE: 0xfff,
  PASSWORD: 0x0ff,
  RH_OWNER: 0x101,
  RH_NULL: 0x107,
  RH_LOCKOUT: 0x10a,
  RH_ENDORSEMENT: 0x10b,
  RH_PLATFORM: 0x10c,
  PCR0: 0,
} as const;

export type Sessions = readonly number[];

export interface EsysContext {
  open(): Promise<object>;
  close(): Promise<object>;
  startup(type: number): Promise<object>;
  getCapability(cap: number, property: number, count: number): Promise<{ data: Buffer; more: number }>;
  getRandom(n: number, sessions?: Sessions): Promise<{ random: Buffer }>;
  trFromTpmPublic(tpmHandle: number, sessions?: Sessions): Promise<{ handle: number }>;
  trSetAuth(handle: number, auth: Buffer): Promise<object>;
  trGetName(handle: number): Promise<{ name: Buffer }>;
  trClose(handle: number): Promise<object>;
  flushContext(handle: number): Promise<object>;
  startAuthSession(tpmKey: number, bind: number, type: number, symmetric: Buffer, authHash: number): Promise<{ handle: number }>;
  sessionSetAttributes(handle: number, flags: number, mask: number): Promise<object>;
  createPrimary(hierarchy: number, sessions: Sessions, sensitive: Buffer, pub: Buffer): Promise<{ handle: number; public: Buffer }>;
  create(parent: number, sessions: Sessions, sensitive: Buffer, pub: Buffer): Promise<{ private: Buffer; public: Buffer }>;
  createLoaded(parent: number, sessions: Sessions, sensitive: Buffer, template: Buffer): Promise<{ handle: number; private: Buffer; public: Buffer }>;
  load(parent: number, sessions: Sessions, priv: Buffer, pub: Buffer): Promise<{ handle: number }>;
  readPublic(handle: number): Promise<{ public: Buffer; name: Buffer }>;
  evictControl(auth: number, object: number, sessions: Sessions, persistent: number): Promise<{ handle: number }>;
  sign(key: number, sessions: Sessions, digest: Buffer, scheme: Buffer): Promise<{ signature: Buffer }>;
  rsaDecrypt(key: number, sessions: Sessions, cipher: Buffer, scheme: Buffer, label: Buffer): Promise<{ message: Buffer }>;
  ecdhZGen(key: number, sessions: Sessions, point: Buffer): Promise<{ x: Buffer }>;
  hmac(key: number, sessions: Sessions, data: Buffer, hashAlg: number): Promise<{ mac: Buffer }>;
  encryptDecrypt2(key: number, sessions: Sessions, data: Buffer, decrypt: number, mode: number, iv: Buffer): Promise<{ data: Buffer; iv: Buffer }>;
  unseal(item: number, sessions: Sessions): Promise<{ data: Buffer }>;
  import(parent: number, sessions: Sessions, encryptionKey: Buffer, pub: Buffer, duplicate: Buffer, inSymSeed: Buffer, symmetric: Buffer): Promise<{ private: Buffer }>;
  certify(object: number, signer: number, sessions: Sessions, qualifying: Buffer, scheme: Buffer): Promise<{ attest: Buffer; signature: Buffer }>;
  quote(signer: number, sessions: Sessions, qualifying: Buffer, scheme: Buffer, pcrs: Buffer): Promise<{ attest: Buffer; signature: Buffer }>;
  pcrRead(selection: Buffer): Promise<{ updateCounter: number; selection: Buffer; values: Buffer }>;
  pcrExtend(pcr: number, sessions: Sessions, digests: Buffer): Promise<object>;
  policyPcr(session: number, digest: Buffer, pcrs: Buffer): Promise<object>;
  policyAuthValue(session: number): Promise<object>;
  policyGetDigest(session: number): Promise<{ digest: Buffer }>;
  nvDefineSpace(auth: number, sessions: Sessions, nvAuth: Buffer, pub: Buffer): Promise<{ handle: number }>;
  nvUndefineSpace(auth: number, nv: number, sessions: Sessions): Promise<object>;
  nvWrite(auth: number, nv: number, sessions: Sessions, data: Buffer, offset: number): Promise<object>;
  nvRead(auth: number, nv: number, sessions: Sessions, size: number, offset: number): Promise<{ data: Buffer }>;
  nvReadPublic(nv: number): Promise<{ public: Buffer; name: Buffer }>;
}

interface Shim {
  Context: new (tcti: string) => EsysContext;
}

/** The shim, or a thrown Error saying why it cannot be used. */
export const loadTpmShim = shimLoader<Shim>({
  relative: path.join('native-shims', 'tpm2', 'build', 'Release', 'tpm2_esys.node'),
  notBuilt: 'the TPM shim is not built: install libtss2-dev (Debian) and run `node scripts/build-shims.mjs`',
  loadHint: 'the TPM shim does not load (is libtss2-esys installed?)',
  // tpm2-tss logs errors to stderr by default; seal-bridge reports them as typed errors instead
  before: () => {
    process.env.TSS2_LOG ??= 'all+NONE';
  },
});
