/**
 * A key object inside a PKCS#11 token. Sensitive operations run in the module on a borrowed
 * session; public-key operations (verify, RSA encrypt) run on the host with the SPKI. There is
 * no method that returns private or secret key bytes.
 */
import { createHash, createPublicKey, publicEncrypt, randomBytes, verify as nodeVerify, constants } from 'node:crypto';
import pkcs11 from 'pkcs11js';
import type { Handle, Mechanism } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import { defaultHash, type KeyAlgorithm, type KeyKind, type KeyUsage } from '../../core/algorithms.js';
import { derToP1363, p1363ToDer, toPem } from '../../core/encoding.js';
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
import { CK, DIGEST_INFO, HASH_MECH, HMAC_MECH } from './mechanisms.js';
import { peerPoint } from '../../core/public-key.js';
import type { Pkcs11Environment } from './environment.js';
import type { WorkOp } from './worker-protocol.js';

const ECDSA: Mechanism = { mechanism: pkcs11.CKM_ECDSA };
const EDDSA: Mechanism = { mechanism: CK.CKM_EDDSA };
const RSA_PKCS: Mechanism = { mechanism: pkcs11.CKM_RSA_PKCS };

/** Largest input sent to the module in one single-part call. */
export const MAX_MODULE_INPUT = 16 * 1024 * 1024;

export interface KeyRecord {
  kind: KeyKind;
  label: string;
  id: Buffer;
  algorithm: KeyAlgorithm;
  usages: KeyUsage[];
  provenance: KeyProvenance;
  publicKey: Buffer | undefined;
  token: boolean;
}

function checkInput(data: unknown, what: string, max = MAX_MODULE_INPUT): asserts data is Buffer {
  if (!Buffer.isBuffer(data) && !(data instanceof Uint8Array)) throw new SealError('INVALID_ARGUMENT', `${what} must be a Buffer`);
  if (data.length > max) throw new SealError('DATA_TOO_LARGE', `${what} is ${data.length} bytes; at most ${max} bytes go to the module in one call`);
}

export class Pkcs11Key implements KeyHandle {
  readonly #env: Pkcs11Environment;
  readonly #rec: KeyRecord;
  #handle: { epoch: number; handle: Handle } | undefined;

  constructor(env: Pkcs11Environment, rec: KeyRecord, handle?: Handle) {
    this.#env = env;
    this.#rec = rec;
    if (handle) this.#handle = { epoch: env.pool.epoch, handle };
  }

  get uri(): string {
    return this.#env.keyUri(this.#rec).toString();
  }
  get label(): string {
    return this.#rec.label;
  }
  get id(): string {
    return this.#rec.id.toString('hex');
  }
  get kind(): KeyKind {
    return this.#rec.kind;
  }
  get algorithm(): KeyAlgorithm {
    return this.#rec.algorithm;
  }
  get usages(): readonly KeyUsage[] {
    return this.#rec.usages;
  }
  get provenance(): KeyProvenance {
    return this.#rec.provenance;
  }
  get publicKey(): Buffer | undefined {
    return this.#rec.publicKey ? Buffer.from(this.#rec.publicKey) : undefined;
  }
  get persistent(): boolean {
    return this.#rec.token;
  }

  publicKeyPem(): string {
    if (!this.#rec.publicKey) throw new SealError('NOT_SUPPORTED', `${this.#rec.label} has no public key`);
    return toPem(this.#rec.publicKey);
  }

  toJSON(): Record<string, unknown> {
    return {
      uri: this.uri,
      label: this.label,
      id: this.id,
      kind: this.kind,
      algorithm: this.algorithm,
      usages: this.usages,
      provenance: this.provenance,
    };
  }

  /** The module's handle of this object, looked up again after the pool lost its sessions. */
  async objectHandle(session: Handle): Promise<Handle> {
    if (this.#handle && this.#handle.epoch === this.#env.pool.epoch) return this.#handle.handle;
    if (!this.#rec.token) {
      if (this.#handle) throw new SealError('KEY_NOT_FOUND', `session key ${this.#rec.label} was lost with its session`);
    }
    const h = this.#env.findHandle(session, this.#rec.kind, this.#rec.id, this.#rec.label);
    if (!h) throw new SealError('KEY_NOT_FOUND', `key ${this.#rec.label} no longer exists on the token`);
    this.#handle = { epoch: this.#env.pool.epoch, handle: h };
    return h;
  }

  #need(usage: KeyUsage, op: string): void {
    if (this.#env.closed) throw new SealError('CLOSED', 'environment is closed');
    if (!this.#rec.usages.includes(usage)) {
      throw new SealError('USAGE_NOT_PERMITTED', `key ${this.#rec.label} was not created for ${op} (usage '${usage}')`);
    }
    if (this.#rec.kind === 'public' && usage !== 'verify' && usage !== 'encrypt' && usage !== 'wrapKey') {
      throw new SealError('USAGE_NOT_PERMITTED', `key ${this.#rec.label} is a public key`);
    }
  }

  #withKey<T>(what: string, fn: (s: Handle, h: Handle) => T | Promise<T>, idempotent = true): Promise<T> {
    return this.#env.pool.run(`${what} with ${this.#rec.label}`, async (s) => fn(s, await this.objectHandle(s)), { idempotent });
  }

  /**
   * A single-part operation with this key (sign, verify, encrypt, decrypt): the session pool runs
   * it on a worker thread, or on a borrowed session when it has none.
   */
  #work(what: string, op: WorkOp, mechanism: Mechanism, input: Buffer, outputLength: number, signature?: Buffer): Promise<Buffer | boolean> {
    const pool = this.#env.pool;
    return pool.work(
      `${what} with ${this.#rec.label}`,
      async (s) => ({ op, mechanism, input, outputLength, ...(signature ? { signature } : {}), key: s ? await this.objectHandle(s) : await this.#lookUp() }),
      { idempotent: true },
    );
  }

  async #workBytes(what: string, op: WorkOp, mechanism: Mechanism, input: Buffer, outputLength: number): Promise<Buffer> {
    return (await this.#work(what, op, mechanism, input, outputLength)) as Buffer;
  }

  /** The object handle, looked up on a pool session when the cached one is stale. */
  async #lookUp(): Promise<Handle> {
    if (this.#handle && this.#handle.epoch === this.#env.pool.epoch) return this.#handle.handle;
    return this.#env.pool.run(`look up ${this.#rec.label}`, (s) => this.objectHandle(s), { idempotent: true });
  }

  async sign(data: Buffer, options: SignOptions = {}): Promise<Buffer> {
    this.#need('sign', 'signing');
    const a = this.#rec.algorithm;
    switch (a.name) {
      case 'ECDSA': {
        checkInput(data, 'data', Number.MAX_SAFE_INTEGER);
        const hash = options.hash ?? defaultHash(a);
        const digest = createHash(HASH_MECH[hash].node).update(data).digest();
        const n = a.namedCurve === 'P-256' ? 32 : 48;
        const raw = await this.#workBytes('ECDSA sign', 'sign', ECDSA, digest, 2 * n);
        return options.format === 'p1363' ? raw : p1363ToDer(raw);
      }
      case 'Ed25519':
        checkInput(data, 'data');
        return this.#workBytes('Ed25519 sign', 'sign', EDDSA, data, 64);
      case 'RSA': {
        checkInput(data, 'data', Number.MAX_SAFE_INTEGER);
        const hash = options.hash ?? 'SHA-256';
        const digest = createHash(HASH_MECH[hash].node).update(data).digest();
        const size = a.modulusLength / 8;
        if (options.scheme === 'RSA-PSS') {
          const mech: Mechanism = {
            mechanism: pkcs11.CKM_RSA_PKCS_PSS,
            parameter: { type: pkcs11.CK_PARAMS_RSA_PSS, hashAlg: HASH_MECH[hash].mech, mgf: HASH_MECH[hash].mgf, saltLen: options.saltLength ?? HASH_MECH[hash].size } as pkcs11.RsaPSS,
          };
          return this.#workBytes('RSA-PSS sign', 'sign', mech, digest, size);
        }
        return this.#workBytes('RSA PKCS#1 sign', 'sign', RSA_PKCS, Buffer.concat([DIGEST_INFO[hash], digest]), size);
      }
      case 'HMAC':
        checkInput(data, 'data');
        return this.#workBytes('HMAC', 'sign', { mechanism: HMAC_MECH[a.hash] }, data, 64);
      default:
        throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not sign`);
    }
  }

  mac(data: Buffer): Promise<Buffer> {
    if (this.#rec.algorithm.name !== 'HMAC') return Promise.reject(new SealError('USAGE_NOT_PERMITTED', 'mac needs an HMAC key'));
    return this.sign(data);
  }

  async verify(data: Buffer, signature: Buffer, options: SignOptions = {}): Promise<boolean> {
    this.#need('verify', 'verification');
    checkInput(signature, 'signature', 64 * 1024);
    const a = this.#rec.algorithm;
    if (a.name === 'HMAC') {
      checkInput(data, 'data');
      try {
        return (await this.#work('HMAC verify', 'verify', { mechanism: HMAC_MECH[a.hash] }, data, 0, signature)) as boolean;
      } catch (e) {
        if (e instanceof SealError && (e.backendCode === 'CKR_SIGNATURE_INVALID' || e.backendCode === 'CKR_SIGNATURE_LEN_RANGE')) return false;
        throw e;
      }
    }
    const spki = this.#rec.publicKey;
    if (!spki) throw new SealError('NOT_SUPPORTED', `${this.#rec.label} has no public key to verify with`);
    const key = createPublicKey({ key: spki, format: 'der', type: 'spki' });
    checkInput(data, 'data', Number.MAX_SAFE_INTEGER);
    switch (a.name) {
      case 'ECDSA': {
        const hash = options.hash ?? defaultHash(a);
        const n = a.namedCurve === 'P-256' ? 32 : 48;
        let sig = signature;
        if (options.format !== 'p1363') {
          try {
            sig = derToP1363(signature, n);
          } catch {
            return false;
          }
        }
        return nodeVerify(HASH_MECH[hash].node, data, { key, dsaEncoding: 'ieee-p1363' }, sig);
      }
      case 'Ed25519':
        return nodeVerify(null, data, key, signature);
      case 'RSA': {
        const hash = options.hash ?? 'SHA-256';
        if (options.scheme === 'RSA-PSS') {
          return nodeVerify(HASH_MECH[hash].node, data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: options.saltLength ?? HASH_MECH[hash].size }, signature);
        }
        return nodeVerify(HASH_MECH[hash].node, data, { key, padding: constants.RSA_PKCS1_PADDING }, signature);
      }
      default:
        throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not verify`);
    }
  }

  async encrypt(data: Buffer, options: EncryptOptions = {}): Promise<EncryptResult> {
    this.#need('encrypt', 'encryption');
    checkInput(data, 'plaintext');
    const a = this.#rec.algorithm;
    if (a.name === 'AES') {
      if ((options.algorithm ?? 'AES-GCM') !== 'AES-GCM') throw new SealError('NOT_SUPPORTED', 'AES keys encrypt with AES-GCM');
      const iv = options.iv ?? randomBytes(12);
      const ciphertext = await this.#workBytes('AES-GCM encrypt', 'encrypt', this.#gcm(iv, options), data, data.length + 16);
      return { ciphertext, iv };
    }
    if (a.name === 'RSA') {
      if ((options.algorithm ?? 'RSA-OAEP') !== 'RSA-OAEP') throw new SealError('NOT_SUPPORTED', 'RSA keys encrypt with RSA-OAEP');
      const spki = this.#rec.publicKey;
      if (!spki) throw new SealError('NOT_SUPPORTED', `${this.#rec.label} has no public key`);
      const hash = options.hash ?? 'SHA-1';
      try {
        const ciphertext = publicEncrypt(
          { key: createPublicKey({ key: spki, format: 'der', type: 'spki' }), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: hash === 'SHA-1' ? 'sha1' : HASH_MECH[hash].node },
          data,
        );
        return { ciphertext };
      } catch (e) {
        throw new SealError('DATA_TOO_LARGE', `plaintext of ${data.length} bytes is too long for RSA-OAEP with this key`, { cause: e });
      }
    }
    throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not encrypt`);
  }

  #gcm(iv: Buffer, options: EncryptOptions): Mechanism {
    checkInput(iv, 'iv', 128);
    const tagBits = options.tagLength ?? 128;
    if (![96, 104, 112, 120, 128].includes(tagBits)) throw new SealError('INVALID_ARGUMENT', 'AES-GCM tag length must be 96..128 bits');
    const parameter: pkcs11.AesGCM = { type: pkcs11.CK_PARAMS_AES_GCM_v240, iv, ivBits: iv.length * 8, tagBits };
    if (options.additionalData !== undefined) checkInput(options.additionalData, 'additionalData');
    // SoftHSM 2.6 crashes on an empty AAD buffer: leave it out instead
    if (options.additionalData && options.additionalData.length > 0) parameter.aad = options.additionalData;
    return { mechanism: pkcs11.CKM_AES_GCM, parameter };
  }

  async decrypt(data: Buffer, options: EncryptOptions = {}): Promise<Buffer> {
    this.#need('decrypt', 'decryption');
    checkInput(data, 'ciphertext');
    const a = this.#rec.algorithm;
    let mech: Mechanism;
    let outLen: number;
    if (a.name === 'AES') {
      if (!options.iv) throw new SealError('INVALID_ARGUMENT', 'AES-GCM decryption needs the iv');
      if (data.length < 16) throw new SealError('DECRYPTION_FAILED', 'decryption failed');
      mech = this.#gcm(options.iv, options);
      outLen = data.length;
    } else if (a.name === 'RSA') {
      const hash = options.hash ?? 'SHA-1';
      const hm = HASH_MECH[hash];
      mech = {
        mechanism: pkcs11.CKM_RSA_PKCS_OAEP,
        parameter: { type: pkcs11.CK_PARAMS_RSA_OAEP, hashAlg: hm.mech, mgf: hm.mgf, source: CK.CKZ_DATA_SPECIFIED } as pkcs11.RsaOAEP,
      };
      outLen = a.modulusLength / 8;
    } else {
      throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not decrypt`);
    }
    try {
      return await this.#workBytes('decrypt', 'decrypt', mech, data, outLen);
    } catch (e) {
      // SoftHSM 2.6 answers a failed GCM tag check or OAEP decoding with CKR_GENERAL_ERROR
      const gcmRefusal = e instanceof SealError && e.backendCode === 'CKR_GENERAL_ERROR';
      if (e instanceof SealError && (gcmRefusal || e.code === 'DECRYPTION_FAILED' || e.backendCode === 'CKR_ENCRYPTED_DATA_INVALID' || e.backendCode === 'CKR_ENCRYPTED_DATA_LEN_RANGE' || e.backendCode === 'CKR_FUNCTION_FAILED')) {
        // one fixed message: no oracle on why the ciphertext was refused
        throw new SealError('DECRYPTION_FAILED', 'decryption failed', { backendCode: e.backendCode, backendStatus: e.backendStatus });
      }
      throw e;
    }
  }

  async sharedSecret(): Promise<Buffer> {
    throw new SealError('NOT_SUPPORTED', 'PKCS#11 keeps ECDH results inside the module: use agree()');
  }

  async agree(peerPublicKey: Buffer | string, target: DerivedKeySpec): Promise<KeyHandle> {
    this.#need('deriveKey', 'key agreement');
    const a = this.#rec.algorithm;
    if (a.name !== 'ECDH') throw new SealError('USAGE_NOT_PERMITTED', 'agree needs an ECDH key');
    const point = peerPoint(peerPublicKey, a.namedCurve);
    const mech: Mechanism = {
      mechanism: pkcs11.CKM_ECDH1_DERIVE,
      parameter: { type: pkcs11.CK_PARAMS_EC_DH, kdf: pkcs11.CKD_NULL, publicData: point } as pkcs11.ECDH1,
    };
    return this.#env.deriveInto(this, mech, target, 'ECDH agree');
  }

  async deriveKey(params: DeriveParams, target: DerivedKeySpec): Promise<KeyHandle> {
    this.#need('deriveKey', 'key derivation');
    const a = this.#rec.algorithm;
    if (!params || typeof params !== 'object') throw new SealError('INVALID_ARGUMENT', 'derivation parameters are required');
    switch (params.kdf) {
      case 'AES-CBC-ENCRYPT-DATA': {
        if (a.name !== 'AES') throw new SealError('USAGE_NOT_PERMITTED', 'AES-CBC-ENCRYPT-DATA needs an AES base key');
        checkInput(params.data, 'derivation data', 4096);
        if (params.data.length === 0 || params.data.length % 16) throw new SealError('INVALID_ARGUMENT', 'derivation data must be a non-empty multiple of 16 bytes');
        const iv = params.iv ?? Buffer.alloc(16);
        if (iv.length !== 16) throw new SealError('INVALID_ARGUMENT', 'iv must be 16 bytes');
        const mech: Mechanism = {
          mechanism: pkcs11.CKM_AES_CBC_ENCRYPT_DATA,
          parameter: { type: pkcs11.CK_PARAMS_AES_CBC, iv, data: params.data } as pkcs11.AesCBC,
        };
        return this.#env.deriveInto(this, mech, target, 'AES-CBC-ENCRYPT-DATA derive');
      }
      case 'AES-ECB-ENCRYPT-DATA':
      case 'HKDF':
      case 'SP800-108-COUNTER':
        return this.#env.deriveWithShim(this, params, target);
      default:
        throw new SealError('NOT_SUPPORTED', `unknown derivation '${String((params as { kdf?: unknown }).kdf).slice(0, 40)}'`);
    }
  }

  async wrapKey(key: KeyHandle, algorithm: 'AES-KW' | 'AES-KWP' | 'RSA-OAEP'): Promise<Buffer> {
    this.#need('wrapKey', 'wrapping');
    if (!(key instanceof Pkcs11Key)) throw new SealError('INVALID_ARGUMENT', 'the key to wrap must live in the same environment');
    const mech = this.#env.wrapMechanism(algorithm, this.#rec.algorithm);
    const lib = this.#env.pool.lib;
    return this.#withKey('wrap', async (s, h) => {
      const target = await key.objectHandle(s);
      return lib.C_WrapKeyAsync(s, mech, h, target, Buffer.alloc(8192));
    });
  }

  async unwrapKey(wrapped: Buffer, spec: UnwrapSpec): Promise<KeyHandle> {
    this.#need('unwrapKey', 'unwrapping');
    checkInput(wrapped, 'wrapped key', 64 * 1024);
    return this.#env.unwrapInto(this, wrapped, spec);
  }

  async destroy(): Promise<void> {
    await this.#env.destroyKey(this, this.#rec);
    this.#handle = undefined;
  }

  /** For the environment: the record behind this handle. */
  get record(): Readonly<KeyRecord> {
    return this.#rec;
  }

}
