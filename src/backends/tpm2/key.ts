/**
 * A key inside the TPM: its blobs live in the key store, the TPM loads it on demand under the
 * SRK. Signing hashes on the host and has the TPM sign the digest; decryption, ECDH (ZGen) and
 * HMAC run in the TPM; verification and public-key encryption use the public key on the host.
 */
import { createHash, createPublicKey, publicEncrypt, constants, randomBytes, timingSafeEqual, verify as nodeVerify } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import { defaultHash, type HashName, type KeyAlgorithm, type KeyKind, type KeyUsage } from '../../core/algorithms.js';
import { toPem, p1363ToDer, derToP1363 } from '../../core/encoding.js';
import { peerPoint } from '../../core/public-key.js';
import type {
  DeriveParams,
  DerivedKeySpec,
  EncryptOptions,
  EncryptResult,
  KeyHandle,
  KeyProvenance,
  SignOptions,
  UnwrapSpec,
} from '../../core/types.js';
import { TpmConnection, type Loadable } from './connection.js';
import type { StoredObject } from './keystore.js';
import { ALG, COORDINATE, HASH_ALG, decodeSignature, encodeEccPoint, encodePcrSelection, encodeScheme } from './marshal.js';
import { TR } from './native.js';

const MAX_HMAC_INPUT = 1024; // TPM2B_MAX_BUFFER on common TPMs
const MAX_CIPHER_CHUNK = 1024; // TPM2B_MAX_BUFFER: one TPM2_EncryptDecrypt2 call
const MAX_MODULE_INPUT = 16 * 1024 * 1024;

export interface Tpm2KeyParams {
  conn: TpmConnection;
  meta: StoredObject;
  public: Buffer;
  private: Buffer;
  spki: Buffer | undefined;
  uri: string;
  /** Auth value of the key, read from its secret source when needed. */
  auth: () => Buffer;
  /** Set for derived objects: re-created under their derivation parent instead of loaded. */
  derivation: { parent: Loadable; template: Buffer } | undefined;
  derive: (params: DeriveParams, target: DerivedKeySpec) => Promise<Tpm2Key>;
  onDestroy: () => Promise<void>;
}

export class Tpm2Key implements KeyHandle, Loadable {
  readonly #p: Tpm2KeyParams;
  #destroyed = false;

  constructor(p: Tpm2KeyParams) {
    this.#p = p;
  }

  get cacheKey(): string {
    return this.#p.meta.id;
  }
  get public(): Buffer {
    return this.#p.public;
  }
  get private(): Buffer {
    return this.#p.private;
  }
  auth(): Buffer {
    return this.#p.auth();
  }
  get derivation(): { parent: Loadable; template: Buffer } | undefined {
    return this.#p.derivation;
  }
  get persistentHandle(): number | undefined {
    return this.#p.meta.persistentHandle;
  }
  get meta(): StoredObject {
    return this.#p.meta;
  }

  get uri(): string {
    return this.#p.uri;
  }
  get label(): string {
    return this.#p.meta.label;
  }
  get id(): string {
    return this.#p.meta.id;
  }
  get kind(): KeyKind {
    return this.#p.meta.kind === 'secret' ? 'secret' : 'private';
  }
  get algorithm(): KeyAlgorithm {
    return this.#p.meta.algorithm as KeyAlgorithm;
  }
  get usages(): readonly KeyUsage[] {
    return this.#p.meta.usages;
  }
  get provenance(): KeyProvenance {
    const inside = this.#p.meta.origin === 'generated-inside';
    // fixedTPM|fixedParent|sensitiveDataOrigin: the TPM made it and will never let it out
    return { origin: this.#p.meta.origin, sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: inside, local: inside };
  }
  get publicKey(): Buffer | undefined {
    return this.#p.spki;
  }
  publicKeyPem(): string {
    if (!this.#p.spki) throw new SealError('NOT_SUPPORTED', `${this.label} has no public key`);
    return toPem(this.#p.spki);
  }

  #require(usage: KeyUsage): void {
    if (!this.usages.includes(usage)) throw new SealError('USAGE_NOT_PERMITTED', `key '${this.label}' does not allow '${usage}'`);
  }

  /** Runs `fn` with the key loaded and its authorization session (policy or auth value). */
  async #withKey<T>(what: string, decrypt: boolean, encrypt: boolean, fn: (ctx: import('./native.js').EsysContext, handle: number, session: number) => Promise<T>, idempotent = true): Promise<T> {
    if (this.#destroyed) throw new SealError('KEY_NOT_FOUND', `key '${this.label}' was destroyed`);
    const conn = this.#p.conn;
    if (idempotent && this.#p.meta.authSource === undefined && !this.#p.meta.pcrPolicy) {
      const fast = conn.tryFast(this.cacheKey, decrypt, encrypt, fn);
      if (fast) {
        try {
          return await fast;
        } catch (e) {
          if (!TpmConnection.retryOnSlowPath(e)) throw await conn.describe(e, what);
          // stale handle or lost connection: the slow path reconnects, reloads and repeats once
        }
      }
    }
    return conn.run(what, async (ctx) => {
      const handle = await conn.loaded(ctx, this);
      if (this.#p.meta.authSource !== undefined) {
        // read from its secret source at each use: a corrected value takes effect at once
        const auth = this.#p.auth();
        try {
          await ctx.trSetAuth(handle, auth);
        } finally {
          auth.fill(0);
        }
      }
      const policy = this.#p.meta.pcrPolicy;
      if (!policy) return fn(ctx, handle, await conn.authSession(ctx, decrypt, encrypt));
      const sel = encodePcrSelection(ALG.SHA256, policy.pcrs);
      const session = await conn.policySession(ctx, (s) => ctx.policyPcr(s, Buffer.alloc(0), sel).then(() => undefined));
      try {
        return await fn(ctx, handle, session);
      } finally {
        await ctx.flushContext(session).catch(() => undefined);
      }
    }, idempotent);
  }

  async sign(data: Buffer, options: SignOptions = {}): Promise<Buffer> {
    this.#require('sign');
    const a = this.algorithm;
    if (a.name === 'HMAC') return this.mac(data);
    const hash: HashName = options.hash ?? defaultHash(a);
    const digest = createHash(hash.replace('-', '').toLowerCase()).update(data).digest();
    let scheme: Buffer;
    if (a.name === 'ECDSA') scheme = encodeScheme(ALG.ECDSA, HASH_ALG[hash]);
    else if (a.name === 'RSA') {
      const pss = options.scheme === 'RSA-PSS';
      if (pss && options.saltLength !== undefined && options.saltLength !== digest.length) {
        throw new SealError('NOT_SUPPORTED', 'the TPM signs RSA-PSS with a salt as long as the hash');
      }
      scheme = encodeScheme(pss ? ALG.RSAPSS : ALG.RSASSA, HASH_ALG[hash]);
    } else throw new SealError('NOT_SUPPORTED', `${a.name} keys do not sign`);
    const raw = await this.#withKey('TPM2_Sign', false, false, (ctx, h, s) => ctx.sign(h, [s], digest, scheme));
    const sig = decodeSignature(raw.signature);
    if (sig.alg === 'ecdsa') {
      const n = COORDINATE[(a as { namedCurve: 'P-256' | 'P-384' }).namedCurve];
      const p1363 = Buffer.concat([pad(sig.r, n), pad(sig.s, n)]);
      return options.format === 'p1363' ? p1363 : p1363ToDer(p1363);
    }
    if (sig.alg === 'rsassa' || sig.alg === 'rsapss') return sig.sig;
    throw new SealError('DEVICE_ERROR', 'unexpected signature type from the TPM');
  }

  async verify(data: Buffer, signature: Buffer, options: SignOptions = {}): Promise<boolean> {
    this.#require('verify');
    const a = this.algorithm;
    if (a.name === 'HMAC') {
      const mac = await this.mac(data);
      return mac.length === signature.length && timingSafeEqual(mac, signature);
    }
    const spki = this.#p.spki;
    if (!spki) throw new SealError('NOT_SUPPORTED', `${this.label} has no public key`);
    const key = createPublicKey({ key: spki, format: 'der', type: 'spki' });
    const hash = (options.hash ?? defaultHash(a)).replace('-', '').toLowerCase();
    if (a.name === 'ECDSA') {
      let der = signature;
      if (options.format === 'p1363') der = p1363ToDer(signature);
      else {
        try {
          derToP1363(signature, COORDINATE[a.namedCurve]); // strict DER: a malleated encoding does not verify
        } catch {
          return false;
        }
      }
      return nodeVerify(hash, data, key, der);
    }
    if (a.name === 'RSA') {
      const pss = options.scheme === 'RSA-PSS';
      return nodeVerify(hash, data, pss ? { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_AUTO } : key, signature);
    }
    throw new SealError('NOT_SUPPORTED', `${a.name} keys do not verify`);
  }

  /** AES-CFB through TPM2_EncryptDecrypt2, in chunks the TPM takes, chaining the IV. */
  async #aesCfb(data: Buffer, decrypt: boolean, options: EncryptOptions): Promise<EncryptResult> {
    if (data.length > MAX_MODULE_INPUT) throw new SealError('DATA_TOO_LARGE', `at most ${MAX_MODULE_INPUT} bytes per call`);
    const algorithm = options.algorithm ?? 'AES-GCM';
    if (algorithm !== 'AES-CFB') throw new SealError('NOT_SUPPORTED', `TPMs have no ${algorithm}: ask for algorithm 'AES-CFB' (no integrity) explicitly`);
    if (options.additionalData !== undefined) throw new SealError('NOT_SUPPORTED', 'AES-CFB takes no additional data');
    if (decrypt && options.iv === undefined) throw new SealError('INVALID_ARGUMENT', 'AES-CFB decryption needs the IV');
    const iv0 = options.iv ?? randomBytes(16);
    if (iv0.length !== 16) throw new SealError('INVALID_ARGUMENT', 'the AES-CFB IV is 16 bytes');
    const parts: Buffer[] = [];
    let iv = iv0;
    for (let off = 0; off < data.length || (off === 0 && data.length === 0); off += MAX_CIPHER_CHUNK) {
      const chunk = data.subarray(off, off + MAX_CIPHER_CHUNK);
      const r = await this.#withKey('TPM2_EncryptDecrypt2', true, true, (ctx, h, s) => ctx.encryptDecrypt2(h, [s], chunk, decrypt ? 1 : 0, ALG.CFB, iv));
      parts.push(r.data);
      iv = r.iv;
      if (data.length === 0) break;
    }
    return { ciphertext: Buffer.concat(parts), iv: iv0 };
  }

  async encrypt(data: Buffer, options: EncryptOptions = {}): Promise<EncryptResult> {
    this.#require('encrypt');
    if (this.algorithm.name === 'AES') return this.#aesCfb(data, false, options);
    if (this.algorithm.name !== 'RSA' || !this.#p.spki) throw new SealError('NOT_SUPPORTED', 'the TPM backend encrypts with AES-CFB keys and RSA-OAEP public keys');
    if ((options.algorithm ?? 'RSA-OAEP') !== 'RSA-OAEP') throw new SealError('NOT_SUPPORTED', 'RSA keys encrypt with RSA-OAEP');
    const hash = (options.hash ?? 'SHA-1').replace('-', '').toLowerCase();
    const key = createPublicKey({ key: this.#p.spki, format: 'der', type: 'spki' });
    return { ciphertext: publicEncrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: hash }, data) };
  }

  async decrypt(data: Buffer, options: EncryptOptions = {}): Promise<Buffer> {
    this.#require('decrypt');
    if (this.algorithm.name === 'AES') return (await this.#aesCfb(data, true, options)).ciphertext;
    if (this.algorithm.name !== 'RSA') throw new SealError('NOT_SUPPORTED', 'the TPM backend decrypts with AES-CFB and RSA-OAEP keys');
    if ((options.algorithm ?? 'RSA-OAEP') !== 'RSA-OAEP') throw new SealError('NOT_SUPPORTED', 'RSA keys decrypt with RSA-OAEP');
    const hash = options.hash ?? 'SHA-1';
    if (data.length !== 256) throw new SealError('INVALID_ARGUMENT', 'RSA-2048 ciphertext must be 256 bytes');
    try {
      const r = await this.#withKey('TPM2_RSA_Decrypt', true, true, (ctx, h, s) =>
        ctx.rsaDecrypt(h, [s], data, encodeScheme(ALG.OAEP, HASH_ALG[hash]), Buffer.alloc(0)));
      return r.message;
    } catch (e) {
      // a bad OAEP padding is TPM_RC_VALUE (libtpms answers TPM_RC_FAILURE): the ciphertext, not the device
      if (e instanceof SealError && (e.backendCode === 'TPM_RC_VALUE' || e.backendCode === 'TPM_RC_FAILURE' || e.backendCode === 'TPM_RC_SIZE')) {
        throw new SealError('DECRYPTION_FAILED', 'decryption failed', { backendCode: e.backendCode, ...(e.backendStatus !== undefined ? { backendStatus: e.backendStatus } : {}) });
      }
      throw e;
    }
  }

  async agree(): Promise<KeyHandle> {
    throw new SealError('NOT_SUPPORTED', 'TPM2_ECDH_ZGen returns the shared secret to the host: use sharedSecret(peer, "secret-leaves-module")');
  }

  async sharedSecret(peerPublicKey: Buffer | string, acknowledge: 'secret-leaves-module'): Promise<Buffer> {
    if (acknowledge !== 'secret-leaves-module') throw new SealError('INVALID_ARGUMENT', "sharedSecret needs the acknowledgement 'secret-leaves-module'");
    this.#require('deriveKey');
    const a = this.algorithm;
    if (a.name !== 'ECDH') throw new SealError('NOT_SUPPORTED', 'only ECDH keys agree');
    const point = encodeEccPoint(peerPoint(peerPublicKey, a.namedCurve), COORDINATE[a.namedCurve]);
    const r = await this.#withKey('TPM2_ECDH_ZGen', true, true, (ctx, h, s) => ctx.ecdhZGen(h, [s], point));
    return r.x;
  }

  async deriveKey(params: DeriveParams, target: DerivedKeySpec): Promise<KeyHandle> {
    this.#require('deriveKey');
    if (this.#destroyed) throw new SealError('KEY_NOT_FOUND', `key '${this.label}' was destroyed`);
    return this.#p.derive(params, target);
  }

  async mac(data: Buffer): Promise<Buffer> {
    this.#require('sign');
    const a = this.algorithm;
    if (a.name !== 'HMAC') throw new SealError('NOT_SUPPORTED', 'only HMAC keys compute MACs');
    if (data.length > MAX_HMAC_INPUT) throw new SealError('DATA_TOO_LARGE', `the TPM HMACs at most ${MAX_HMAC_INPUT} bytes in one command`);
    const r = await this.#withKey('TPM2_HMAC', true, false, (ctx, h, s) => ctx.hmac(h, [s], data, HASH_ALG[a.hash]));
    return r.mac;
  }

  async wrapKey(): Promise<Buffer> {
    this.#require('wrapKey');
    throw new SealError('EXPORT_REFUSED', 'TPM keys are fixedTPM|fixedParent: they cannot be wrapped out');
  }

  async unwrapKey(_wrapped: Buffer, _spec: UnwrapSpec): Promise<KeyHandle> {
    throw new SealError('NOT_SUPPORTED', 'the TPM imports keys wrapped for its storage key: use importWrapped()');
  }

  async destroy(): Promise<void> {
    if (this.#destroyed) throw new SealError('KEY_NOT_FOUND', `key '${this.label}' was destroyed`);
    await this.#p.onDestroy();
    this.#destroyed = true;
  }

  /**
   * Audit probe: asks the TPM itself to sign with this key, bypassing seal-bridge's usage check, and
   * returns the TPM's answer (`accepted` or its TPM_RC name). Proof that the refusal is the module's.
   */
  async probeModuleSign(): Promise<string> {
    const digest = createHash('sha256').update('probe').digest();
    try {
      await this.#withKey('TPM2_Sign probe', false, false, (ctx, h, s) => ctx.sign(h, [s], digest, encodeScheme(ALG.ECDSA, ALG.SHA256)));
      return 'accepted';
    } catch (e) {
      return e instanceof SealError ? (e.backendCode ?? e.code) : 'error';
    }
  }

  /** Certifies this key with an attestation key (TPM2_Certify): proof that it lives in this TPM. */
  async certifyWith(ak: Tpm2Key, nonce: Buffer): Promise<{ attest: Buffer; signature: Buffer }> {
    if (!ak.meta.attestation) throw new SealError('USAGE_NOT_PERMITTED', `${ak.label} is not an attestation key`);
    const conn = this.#p.conn;
    return conn.run('TPM2_Certify', async (ctx) => {
      // both keys loaded at once: the cache keeps the two most recent
      const obj = await conn.loaded(ctx, this);
      const signer = await conn.loaded(ctx, ak);
      const objHandle = await conn.loaded(ctx, this);
      if (objHandle !== obj) throw new SealError('DEVICE_ERROR', 'key cache too small to certify (max-loaded must be at least 2)');
      const s1 = await conn.authSession(ctx, false, false);
      // two authorizations: the object's through the (salted) session, the signer's by password
      return ctx.certify(obj, signer, [s1, TR.PASSWORD], nonce, encodeScheme(ALG.ECDSA, ALG.SHA256));
    });
  }
}

function pad(b: Buffer, n: number): Buffer {
  if (b.length === n) return b;
  if (b.length > n) return b.subarray(b.length - n);
  return Buffer.concat([Buffer.alloc(n - b.length), b]);
}
