/**
 * A TPM 2.0 as a SecureEnvironment. Keys are created inside the TPM under the storage root key
 * (fixedTPM|fixedParent|sensitiveDataOrigin), their encrypted blobs kept in a key store
 * directory; sensitive data is sealed to the TPM (optionally to PCR values); attestation keys
 * certify keys and quote PCRs; keys wrapped for this TPM's SRK are imported (TPM2_Import).
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import { checkUsages, normalizeAlgorithm, algorithmShortName, type KeyAlgorithm, type KeyKind, type KeyUsage } from '../../core/algorithms.js';
import { parseSecretSource, resolveSecretSource } from '../../core/secrets.js';
import { spkiFromAttributes } from '../../core/public-key.js';
import { SealUri } from '../../core/uri.js';
import type {
  Capability,
  DataObjectInfo,
  DeriveParams,
  DerivedKeySpec,
  EnvironmentInfo,
  ExtractionAttempt,
  GenerateKeySpec,
  ImportPublicKeySpec,
  KeyHandle,
  KeyQuery,
  SecureEnvironment,
} from '../../core/types.js';
import { TpmConnection, SRK_PERSISTENT_HANDLE, type Loadable } from './connection.js';
import { KeyStore, checkRecord, damageOf, damagedRecord, type StoredObject } from './keystore.js';
import { Tpm2Key } from './key.js';
import { TR } from './native.js';
import { tpmError } from './errors.js';
import {
  ALG,
  CURVE,
  HASH_ALG,
  OBJ,
  decodeDigestList,
  decodePublic,
  encodeDerivedTemplate,
  encodePcrSelection,
  encodePublic,
  encodeScheme,
  encodeSensitiveCreate,
  pcrPolicyDigest,
  type PublicArea,
} from './marshal.js';

const MAX_LABEL = 128;
const MAX_DATA = 1024 * 1024;
const DATA_KEY_BYTES = 32; // sealed inside the TPM; the value itself is AES-256-GCM under it
const OWNER_PARENT = 0x40000001;

export const TPM2_CAPABILITIES: readonly Capability[] = [
  ...(['P-256', 'P-384'] as const).flatMap((c): Capability[] => [
    { algorithm: `ECDSA ${c}`, operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'TPM2_Create (fixedTPM|fixedParent|sensitiveDataOrigin)' },
    { algorithm: `ECDSA ${c}`, operation: 'sign', variant: 'ECDSA (DER or P1363), hash on host', result: 'output', mechanism: 'TPM2_Sign' },
    { algorithm: `ECDSA ${c}`, operation: 'verify', variant: 'ECDSA', result: 'output', mechanism: 'host (public key)' },
  ]),
  { algorithm: 'ECDH P-256', operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'TPM2_Create' },
  { algorithm: 'ECDH P-256', operation: 'agree', variant: 'ECDH (shared x-coordinate)', result: 'secret-leaves', mechanism: 'TPM2_ECDH_ZGen', note: 'the shared point is returned to the host (sharedSecret)' },
  { algorithm: 'RSA-2048', operation: 'generate', variant: 'key pair', result: 'key-inside', mechanism: 'TPM2_Create' },
  { algorithm: 'RSA-2048', operation: 'sign', variant: 'RSASSA-PKCS1-v1_5', result: 'output', mechanism: 'TPM2_Sign (TPM_ALG_RSASSA)' },
  { algorithm: 'RSA-2048', operation: 'sign', variant: 'RSA-PSS', result: 'output', mechanism: 'TPM2_Sign (TPM_ALG_RSAPSS, salt = hash length)' },
  { algorithm: 'RSA-2048', operation: 'verify', variant: 'PKCS1-v1_5 / PSS', result: 'output', mechanism: 'host (public key)' },
  { algorithm: 'RSA-2048', operation: 'encrypt', variant: 'RSA-OAEP', result: 'output', mechanism: 'host (public key)' },
  { algorithm: 'RSA-2048', operation: 'decrypt', variant: 'RSA-OAEP', result: 'output', mechanism: 'TPM2_RSA_Decrypt (TPM_ALG_OAEP)' },
  { algorithm: 'HMAC SHA-256', operation: 'generate', variant: 'keyed hash', result: 'key-inside', mechanism: 'TPM2_Create (keyedHash, HMAC)' },
  { algorithm: 'HMAC SHA-256', operation: 'sign', variant: 'HMAC-SHA-256', result: 'output', mechanism: 'TPM2_HMAC' },
  { algorithm: 'HMAC SHA-256', operation: 'verify', variant: 'HMAC-SHA-256', result: 'output', mechanism: 'TPM2_HMAC' },
  ...([128, 256] as const).flatMap((bits): Capability[] => [
    { algorithm: `AES-${bits}`, operation: 'generate', variant: 'secret key', result: 'key-inside', mechanism: 'TPM2_Create (symCipher)' },
    { algorithm: `AES-${bits}`, operation: 'encrypt', variant: 'AES-CFB (no integrity)', result: 'output', mechanism: 'TPM2_EncryptDecrypt2', note: 'no AES-GCM in TPMs: authenticate the ciphertext separately, e.g. with an HMAC key' },
    { algorithm: `AES-${bits}`, operation: 'decrypt', variant: 'AES-CFB (no integrity)', result: 'output', mechanism: 'TPM2_EncryptDecrypt2' },
  ]),
  ...['ECDSA P-256', 'ECDSA P-384', 'RSA-2048', 'HMAC SHA-256'].map((algorithm): Capability => ({
    algorithm,
    operation: 'unwrap',
    variant: 'TPM2_Import of a duplication blob made for this SRK (wrapForTpm)',
    result: 'key-inside',
    mechanism: 'TPM2_Import',
    ...(algorithm === 'HMAC SHA-256' ? { note: 'as a derivation parent whose secret the provisioning server keeps' } : {}),
  })),
  {
    algorithm: 'HMAC SHA-256',
    operation: 'derive',
    variant: 'TPM-DERIVED-OBJECT (label, context) into HMAC or ECC keys',
    result: 'key-inside',
    mechanism: 'TPM2_CreateLoaded under a derivation parent',
    note: 'an HMAC key created with the single usage deriveKey is a derivation parent',
  },
];

export interface Tpm2EnvironmentParams {
  conn: TpmConnection;
  store: KeyStore;
  baseUri: SealUri;
  info: EnvironmentInfo;
}

/** Key-creation options specific to the TPM (binding to PCRs, an auth value from a secret source). */
export interface Tpm2KeyOptions {
  /** Bind the key to the current values of these SHA-256 PCRs: it stops working when one changes. */
  pcrs?: number[];
  /** Secret source (`env:NAME` / `file:PATH`) of the key's auth value. */
  authSource?: string;
  /** Also keep the key loaded at this persistent handle (0x81000002–0x817FFFFF; owner authorization). */
  persistentHandle?: number;
}

export class Tpm2Environment implements SecureEnvironment {
  readonly info: EnvironmentInfo;
  readonly capabilities: readonly Capability[] = TPM2_CAPABILITIES;
  readonly conn: TpmConnection;
  readonly store: KeyStore;
  readonly #p: Tpm2EnvironmentParams;
  #closed = false;

  constructor(p: Tpm2EnvironmentParams) {
    this.#p = p;
    this.conn = p.conn;
    this.store = p.store;
    this.info = p.info;
  }

  get uri(): string {
    return this.#p.baseUri.toString();
  }

  #check(): void {
    if (this.#closed) throw new SealError('CLOSED', 'the TPM environment is closed');
  }

  /** A key of the store; a damaged record fails here (DEVICE_ERROR), before the TPM sees any of it. */
  #handle(meta: StoredObject, blobs = this.store.blobs(meta.id, meta), persistent = true): Tpm2Key {
    const pub = checkRecord(meta, blobs);
    let spki: Buffer | undefined;
    try {
      spki = meta.algorithm ? spkiOf(meta.algorithm, pub) : undefined;
    } catch {
      throw damagedRecord(meta, 'its public key is not a valid key of its algorithm');
    }
    const authSource = meta.authSource;
    let derivation: { parent: Loadable; template: Buffer } | undefined;
    if (meta.derivation) {
      const parentMeta = this.store.list().find((o) => o.id === meta.derivation!.parentId);
      if (!parentMeta) throw new SealError('KEY_NOT_FOUND', `the derivation parent of '${meta.label}' is missing from the key store`);
      derivation = { parent: this.#handle(parentMeta), template: Buffer.from(meta.derivation.template, 'hex') };
    }
    const key: Tpm2Key = new Tpm2Key({
      conn: this.conn,
      meta,
      ...blobs,
      spki,
      derivation,
      uri: this.#p.baseUri.withPath({ object: meta.label, id: Buffer.from(meta.id, 'hex'), type: meta.kind === 'secret' ? 'secret' : 'private' }).toString(),
      auth: () => (authSource ? Buffer.from(resolveSecretSource(parseSecretSource(authSource)), 'utf8') : Buffer.alloc(0)),
      derive: (params, target) => this.#derive(key, params, target),
      onDestroy: async () => {
        const ph = meta.persistentHandle;
        await this.conn.run('flush', (ctx) => (ph !== undefined ? this.conn.unpersist(ctx, meta.id, ph) : this.conn.evict(ctx, meta.id)), false);
        if (persistent) this.store.remove(meta.id);
      },
    });
    return key;
  }

  /** TPM2_CreateLoaded under a derivation parent: the new key is derived inside the TPM. */
  async #derive(parent: Tpm2Key, params: DeriveParams, target: DerivedKeySpec): Promise<Tpm2Key> {
    if (!parent.meta.derivationParent) throw new SealError('USAGE_NOT_PERMITTED', `key '${parent.label}' is not a derivation parent (create an HMAC key with the single usage deriveKey)`);
    if (params.kdf !== 'TPM-DERIVED-OBJECT') throw new SealError('NOT_SUPPORTED', `the TPM derives keys as derived objects (kdf 'TPM-DERIVED-OBJECT'), not with ${String(params.kdf).slice(0, 30)}`);
    if (!Buffer.isBuffer(params.label) || !Buffer.isBuffer(params.context)) throw new SealError('INVALID_ARGUMENT', 'derivation needs label and context buffers');
    const algorithm = normalizeAlgorithm(target.algorithm);
    const usages = checkUsages(algorithm, target.usages);
    if (!(['HMAC', 'ECDSA', 'ECDH'] as const).includes(algorithm.name as 'HMAC') || (algorithm.name === 'HMAC' && usages.includes('deriveKey'))) {
      throw new SealError('NOT_SUPPORTED', 'the TPM derives HMAC (sign/verify), ECDSA and ECDH keys');
    }
    if (target.label !== undefined) checkLabel(target.label);
    // derived objects take their key bits from the parent's KDF: no sensitiveDataOrigin
    const area = keyTemplate(algorithm, usages, true);
    area.attributes &= ~OBJ.sensitiveDataOrigin;
    // fixedTPM only under a fixedTPM parent (an imported derivation parent is not)
    if ((decodePublic(parent.public).area.attributes & OBJ.fixedTPM) === 0) area.attributes &= ~OBJ.fixedTPM;
    const template = encodeDerivedTemplate(area, params.label, params.context);
    const out = await this.conn.run('TPM2_CreateLoaded (derived object)', async (ctx) => {
      const p = await this.conn.loaded(ctx, parent);
      const r = await ctx.createLoaded(p, [await this.conn.authSession(ctx, true, false)], encodeSensitiveCreate(), template);
      await ctx.flushContext(r.handle);
      return r;
    }, false);
    const meta = this.#record(target.label ?? `derived-${randomBytes(6).toString('hex')}`, algorithm.name === 'HMAC' ? 'secret' : 'private', 'derived-inside', algorithm, usages, {
      parent: 0, // re-created under its derivation parent, never loaded from the key file
      derivation: { parentId: parent.meta.id, template: template.toString('hex') },
    });
    const blobs = { public: out.public, private: out.private };
    if (target.label !== undefined) {
      this.store.save(meta, blobs);
      return this.#handle(meta);
    }
    return this.#handle(meta, blobs, false);
  }

  async generateKey(spec: GenerateKeySpec & { tpm?: Tpm2KeyOptions }): Promise<Tpm2Key> {
    this.#check();
    checkLabel(spec.label);
    const algorithm = normalizeAlgorithm(spec.algorithm);
    const usages = checkUsages(algorithm, spec.usages);
    const short = algorithmShortName(algorithm);
    if (!this.capabilities.some((c) => c.operation === 'generate' && c.algorithm === capabilityName(algorithm))) {
      throw new SealError('NOT_SUPPORTED', `the TPM backend does not generate ${short} keys`);
    }
    if (this.store.list().some((o) => o.label === spec.label && o.kind !== 'data')) {
      throw new SealError('KEY_EXISTS', `a key labelled '${spec.label}' already exists`);
    }
    const options = spec.tpm ?? {};
    const authValue = options.authSource ? Buffer.from(resolveSecretSource(parseSecretSource(options.authSource)), 'utf8') : Buffer.alloc(0);
    const policy = options.pcrs?.length ? await this.#pcrPolicy(options.pcrs) : undefined;
    const template = keyTemplate(algorithm, usages, authValue.length === 0, policy?.digest);
    const derivationParent = algorithm.name === 'HMAC' && usages.includes('deriveKey');
    const persistent = options.persistentHandle;
    if (persistent !== undefined) {
      if (!Number.isInteger(persistent) || persistent <= SRK_PERSISTENT_HANDLE || persistent > 0x817fffff) {
        throw new SealError('INVALID_ARGUMENT', 'persistentHandle must be in 0x81000002..0x817FFFFF');
      }
      if (this.store.list().some((o) => o.persistentHandle === persistent)) throw new SealError('KEY_EXISTS', `persistent handle 0x${persistent.toString(16)} is already used by a key of this store`);
    }
    const blobs = await this.conn.run('TPM2_Create', async (ctx) => {
      const srk = await this.conn.srk(ctx);
      const s = await this.conn.authSession(ctx, true, false);
      return ctx.create(srk, [s], encodeSensitiveCreate(authValue), encodePublic(template));
    }, false);
    authValue.fill(0);
    if (persistent !== undefined) {
      const transient: Loadable = { cacheKey: `persist-${persistent}`, ...blobs, auth: () => Buffer.alloc(0) };
      await this.conn.run('TPM2_EvictControl', (ctx) => this.conn.persist(ctx, transient, persistent), false);
    }
    const meta = this.#record(spec.label, algorithm.name === 'HMAC' || algorithm.name === 'AES' ? 'secret' : 'private', 'generated-inside', algorithm, usages, {
      ...(policy ? { pcrPolicy: policy.record } : {}),
      ...(options.authSource ? { authSource: options.authSource } : {}),
      ...(derivationParent ? { derivationParent } : {}),
      ...(persistent !== undefined ? { persistentHandle: persistent } : {}),
    });
    this.store.save(meta, blobs);
    return this.#handle(meta);
  }

  /** A new key-store record under the SRK; `extra` adds what is particular to the object. */
  #record(label: string, kind: StoredObject['kind'], origin: StoredObject['origin'], algorithm: KeyAlgorithm | undefined, usages: KeyUsage[], extra: Partial<StoredObject> = {}): StoredObject {
    return {
      version: 1,
      id: this.store.newId(),
      label,
      kind,
      ...(algorithm ? { algorithm } : {}),
      usages,
      origin,
      created: new Date().toISOString(),
      parent: this.conn.srkIsPersistent ? SRK_PERSISTENT_HANDLE : OWNER_PARENT,
      ...extra,
    };
  }

  /** The PolicyPCR digest for the current values of `pcrs` (SHA-256 bank). */
  async #pcrPolicy(pcrs: number[]): Promise<{ digest: Buffer; record: NonNullable<StoredObject['pcrPolicy']> }> {
    const selection = encodePcrSelection(ALG.SHA256, pcrs);
    const values = await this.readPcrs(pcrs);
    const digest = pcrPolicyDigest(ALG.SHA256, selection, values);
    return { digest, record: { hash: 'SHA-256', pcrs: [...pcrs], digest: digest.toString('hex') } };
  }

  /** Current SHA-256 PCR values, in index order. */
  async readPcrs(pcrs: number[]): Promise<Buffer[]> {
    const sorted = [...new Set(pcrs)].sort((a, b) => a - b);
    return this.conn.run('TPM2_PCR_Read', async (ctx) => decodeDigestList((await ctx.pcrRead(encodePcrSelection(ALG.SHA256, sorted))).values));
  }

  async importPublicKey(_spec: ImportPublicKeySpec): Promise<KeyHandle> {
    throw new SealError('NOT_SUPPORTED', 'the TPM backend verifies with public keys on the host; it stores no public-only keys');
  }

  /**
   * Imports a key wrapped for this TPM's storage key (a duplication blob from `wrapForTpm` on a
   * provisioning server): TPM2_Import re-encrypts it under the SRK; the private key is never in
   * the clear on this machine.
   */
  async importWrapped(blob: WrappedTpmKey, spec: { label: string; usages: KeyUsage[] }): Promise<Tpm2Key> {
    this.#check();
    checkLabel(spec.label);
    const pub = decodePublic(blob.public).area;
    const algorithm = algorithmOf(pub);
    const usages = checkUsages(algorithm, spec.usages);
    const priv = await this.conn.run('TPM2_Import', async (ctx) => {
      const srk = await this.conn.srk(ctx);
      const s = await this.conn.authSession(ctx, false, false);
      return (await ctx.import(srk, [s], Buffer.alloc(0), blob.public, blob.duplicate, blob.seed, encodeScheme(ALG.NULL))).private;
    }, false);
    const meta = this.#record(spec.label, algorithm.name === 'HMAC' ? 'secret' : 'private', 'imported', algorithm, usages,
      pub.type === 'keyedhash' && pub.scheme.alg === ALG.XOR ? { derivationParent: true } : {});
    this.store.save(meta, { public: blob.public, private: priv });
    return this.#handle(meta);
  }

  /** The SRK's TPM2B_PUBLIC: what a provisioning server needs to wrap keys for this TPM. */
  async storageKeyPublic(): Promise<Buffer> {
    return this.conn.srkPublic();
  }

  /** Creates an attestation key: a restricted ECDSA P-256 signing key that signs only TPM-made structures. */
  async createAttestationKey(label: string): Promise<Tpm2Key> {
    this.#check();
    checkLabel(label);
    const template: PublicArea = {
      type: 'ecc',
      nameAlg: ALG.SHA256,
      attributes: OBJ.fixedTPM | OBJ.fixedParent | OBJ.sensitiveDataOrigin | OBJ.userWithAuth | OBJ.noDA | OBJ.restricted | OBJ.sign,
      authPolicy: Buffer.alloc(0),
      symmetric: { alg: ALG.NULL },
      scheme: { alg: ALG.ECDSA, hash: ALG.SHA256 },
      curve: CURVE['P-256'],
      kdf: { alg: ALG.NULL },
      x: Buffer.alloc(0),
      y: Buffer.alloc(0),
    };
    const blobs = await this.conn.run('TPM2_Create (attestation key)', async (ctx) => {
      const srk = await this.conn.srk(ctx);
      return ctx.create(srk, [await this.conn.authSession(ctx, true, false)], encodeSensitiveCreate(), encodePublic(template));
    }, false);
    const meta = this.#record(label, 'private', 'generated-inside', { name: 'ECDSA', namedCurve: 'P-256' }, ['verify'], { attestation: true });
    this.store.save(meta, blobs);
    return this.#handle(meta);
  }

  /** TPM2_Quote of SHA-256 PCRs with a caller nonce, signed by an attestation key. */
  async quote(ak: Tpm2Key, pcrs: number[], nonce: Buffer): Promise<{ attest: Buffer; signature: Buffer }> {
    if (!ak.meta.attestation) throw new SealError('USAGE_NOT_PERMITTED', `${ak.label} is not an attestation key`);
    if (nonce.length > 64) throw new SealError('INVALID_ARGUMENT', 'a quote nonce is at most 64 bytes');
    const selection = encodePcrSelection(ALG.SHA256, pcrs);
    return this.conn.run('TPM2_Quote', async (ctx) => {
      const h = await this.conn.loaded(ctx, ak);
      return ctx.quote(h, [await this.conn.authSession(ctx, false, false)], nonce, encodeScheme(ALG.ECDSA, ALG.SHA256), selection);
    });
  }

  /** TPM2_PCR_Extend of one SHA-256 PCR (platform-auth PCRs refuse). */
  async extendPcr(pcr: number, data: Buffer): Promise<void> {
    const digest = createHash('sha256').update(data).digest();
    const values = Buffer.concat([u32(1), u16(ALG.SHA256), digest]);
    await this.conn.run('TPM2_PCR_Extend', (ctx) => ctx.pcrExtend(TR.PCR0 + pcr, [TR.PASSWORD], values), false);
  }

  async getKey(uriOrLabel: string, kind?: KeyKind): Promise<Tpm2Key> {
    this.#check();
    let label: string | undefined = uriOrLabel;
    let id: string | undefined;
    let wanted = kind;
    if (uriOrLabel.startsWith('tpm2:')) {
      const u = SealUri.parse(uriOrLabel);
      label = u.get('object');
      id = u.getBytes('id')?.toString('hex');
      const t = u.get('type');
      if (t === 'private' || t === 'secret') wanted ??= t;
      if (label === undefined && id === undefined) throw new SealError('INVALID_URI', 'a key URI needs object= or id=');
    }
    const found = this.store
      .list()
      .filter((o) => o.kind !== 'data')
      .filter((o) => (label === undefined || o.label === label) && (id === undefined || o.id === id))
      .filter((o) => wanted === undefined || o.kind === wanted || (wanted === 'public' && o.kind === 'private'));
    const what = label !== undefined ? `labelled '${label.slice(0, MAX_LABEL)}'` : 'with that id';
    if (found.length === 0) throw new SealError('KEY_NOT_FOUND', `no key ${what} in the TPM key store`);
    if (found.length > 1) throw new SealError('AMBIGUOUS_KEY', `several keys ${what}`);
    return this.#handle(found[0]!);
  }

  async listKeys(query: KeyQuery = {}): Promise<KeyHandle[]> {
    this.#check();
    return this.store
      .list()
      .filter((o) => o.kind !== 'data')
      .filter((o) => query.label === undefined || o.label === query.label)
      .filter((o) => query.kind === undefined || o.kind === query.kind || (query.kind === 'public' && o.kind === 'private'))
      .filter((o) => query.id === undefined || o.id === query.id.toString('hex'))
      .flatMap((o) => {
        // a damaged record is not listed (as unreadable metadata is not): getKey and doctor name it
        try {
          return [this.#handle(o)];
        } catch (e) {
          if (damageOf(e) !== undefined) return [];
          throw e;
        }
      });
  }

  async random(length: number): Promise<Buffer> {
    this.#check();
    if (!Number.isInteger(length) || length < 1 || length > 1024 * 1024) throw new SealError('INVALID_ARGUMENT', 'random length must be 1..1048576');
    const parts: Buffer[] = [];
    let left = length;
    while (left > 0) {
      const n = Math.min(left, 32);
      const r = await this.conn.run('TPM2_GetRandom', async (ctx) => (await ctx.getRandom(n, [await this.conn.authSession(ctx, false, true)])).random);
      parts.push(r);
      left -= r.length;
    }
    return Buffer.concat(parts).subarray(0, length);
  }

  // ---- sealed data ----------------------------------------------------------------------------------

  /**
   * Seals `value` to this TPM (optionally to PCR values): a fresh 256-bit data key is sealed in a
   * TPM object (only this TPM can unseal it, and only while the PCRs match), the value is
   * AES-256-GCM encrypted under it in the key store.
   */
  async writeData(label: string, value: Buffer, options: { pcrs?: number[] } = {}): Promise<DataObjectInfo> {
    this.#check();
    checkLabel(label);
    if (!Buffer.isBuffer(value) || value.length > MAX_DATA) throw new SealError('DATA_TOO_LARGE', `sealed data must be at most ${MAX_DATA} bytes`);
    const dataKey = randomBytes(DATA_KEY_BYTES);
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', dataKey, iv);
    cipher.setAAD(Buffer.from(label, 'utf8'));
    const envelope = Buffer.concat([iv, cipher.update(value), cipher.final(), cipher.getAuthTag()]).toString('base64');
    const policy = options.pcrs?.length ? await this.#pcrPolicy(options.pcrs) : undefined;
    const template: PublicArea = {
      type: 'keyedhash',
      nameAlg: ALG.SHA256,
      attributes: OBJ.fixedTPM | OBJ.fixedParent | OBJ.noDA | (policy ? 0 : OBJ.userWithAuth),
      authPolicy: policy?.digest ?? Buffer.alloc(0),
      scheme: { alg: ALG.NULL },
      unique: Buffer.alloc(0),
    };
    const existing = this.store.list().find((o) => o.kind === 'data' && o.label === label);
    const blobs = await this.conn.run('TPM2_Create (sealed data)', async (ctx) => {
      const srk = await this.conn.srk(ctx);
      return ctx.create(srk, [await this.conn.authSession(ctx, true, false)], encodeSensitiveCreate(Buffer.alloc(0), dataKey), encodePublic(template));
    }, false);
    dataKey.fill(0);
    if (existing) this.store.remove(existing.id);
    const meta = this.#record(label, 'data', 'generated-inside', undefined, [], {
      size: value.length,
      envelope,
      ...(policy ? { pcrPolicy: policy.record } : {}),
    });
    this.store.save(meta, blobs);
    return { label, size: value.length, uri: this.#dataUri(label) };
  }

  async readData(label: string): Promise<Buffer> {
    this.#check();
    const meta = this.store.list().find((o) => o.kind === 'data' && o.label === label);
    if (!meta) throw new SealError('OBJECT_NOT_FOUND', `no sealed data labelled '${label.slice(0, MAX_LABEL)}'`);
    const blobs = this.store.blobs(meta.id, meta);
    checkRecord(meta, blobs);
    const obj: Loadable = { cacheKey: meta.id, ...blobs, auth: () => Buffer.alloc(0) };
    const dataKey = await this.conn.run('TPM2_Unseal', async (ctx) => {
      const h = await this.conn.loaded(ctx, obj);
      if (meta.pcrPolicy) {
        const sel = encodePcrSelection(ALG.SHA256, meta.pcrPolicy.pcrs);
        const s = await this.conn.policySession(ctx, (session) => ctx.policyPcr(session, Buffer.alloc(0), sel).then(() => undefined));
        try {
          return (await ctx.unseal(h, [s])).data;
        } finally {
          await ctx.flushContext(s).catch(() => undefined);
        }
      }
      return (await ctx.unseal(h, [await this.conn.authSession(ctx, false, true)])).data;
    });
    const env = Buffer.from(meta.envelope ?? '', 'base64');
    if (env.length < 28) throw new SealError('DEVICE_ERROR', 'sealed data record is damaged');
    try {
      const d = createDecipheriv('aes-256-gcm', dataKey, env.subarray(0, 12));
      d.setAAD(Buffer.from(label, 'utf8'));
      d.setAuthTag(env.subarray(env.length - 16));
      return Buffer.concat([d.update(env.subarray(12, env.length - 16)), d.final()]);
    } catch (e) {
      throw new SealError('DECRYPTION_FAILED', 'sealed data record does not authenticate (damaged or replaced)', { cause: e });
    } finally {
      dataKey.fill(0);
    }
  }

  async deleteData(label: string): Promise<void> {
    this.#check();
    const meta = this.store.list().find((o) => o.kind === 'data' && o.label === label);
    if (!meta) throw new SealError('OBJECT_NOT_FOUND', `no sealed data labelled '${label.slice(0, MAX_LABEL)}'`);
    await this.conn.run('flush', (ctx) => this.conn.evict(ctx, meta.id));
    this.store.remove(meta.id);
  }

  async listData(): Promise<DataObjectInfo[]> {
    this.#check();
    return this.store.list().filter((o) => o.kind === 'data').map((o) => ({ label: o.label, size: o.size ?? 0, uri: this.#dataUri(o.label) }));
  }

  #dataUri(label: string): string {
    return this.#p.baseUri.withPath({ object: label, type: 'data' }).toString();
  }

  // ---- NV ---------------------------------------------------------------------------------------------

  /** Defines (when absent) an owner-authorized NV index of `size` bytes and writes `data` at offset 0. */
  async nvWrite(index: number, data: Buffer, size = data.length): Promise<void> {
    if (index < 0x01000000 || index > 0x01ffffff) throw new SealError('INVALID_ARGUMENT', 'NV index must be 0x01000000..0x01FFFFFF');
    if (data.length > size || size > 2048) throw new SealError('DATA_TOO_LARGE', 'NV data too large');
    await this.conn.run('TPM2_NV_Write', async (ctx) => {
      let nv: number;
      try {
        nv = (await ctx.trFromTpmPublic(index)).handle;
      } catch {
        // TPMA_NV_OWNERWRITE | OWNERREAD | AUTHWRITE | AUTHREAD | NO_DA
        const attrs = 0x00000002 | 0x00020000 | 0x00000004 | 0x00040000 | 0x02000000;
        const pub = Buffer.concat([u16(4 + 2 + 4 + 2 + 2), u32(index), u16(ALG.SHA256), u32(attrs), u16(0), u16(size)]);
        nv = (await ctx.nvDefineSpace(TR.RH_OWNER, [TR.PASSWORD], Buffer.alloc(0), pub)).handle;
      }
      await ctx.nvWrite(nv, nv, [await this.conn.authSession(ctx, true, false)], data, 0);
    }, false);
  }

  async nvRead(index: number, size: number): Promise<Buffer> {
    return this.conn.run('TPM2_NV_Read', async (ctx) => {
      const nv = (await ctx.trFromTpmPublic(index)).handle;
      return (await ctx.nvRead(nv, nv, [await this.conn.authSession(ctx, false, true)], size, 0)).data;
    });
  }

  async nvDelete(index: number): Promise<void> {
    await this.conn.run('TPM2_NV_UndefineSpace', async (ctx) => {
      const nv = (await ctx.trFromTpmPublic(index)).handle;
      await ctx.nvUndefineSpace(TR.RH_OWNER, nv, [TR.PASSWORD]);
    }, false);
  }

  /**
   * The TPM's routes out for a key, each checked against what the TPM enforces: TPM2_Duplicate
   * needs fixedParent CLEAR and a DUP-role policy matching the key's authPolicy (an empty policy
   * can never be satisfied); the private blob in the key store is encrypted under this TPM's
   * storage key; no TPM command returns a TPMT_SENSITIVE in clear.
   */
  async probeExtraction(key: KeyHandle): Promise<ExtractionAttempt[]> {
    const k = key instanceof Tpm2Key ? key : await this.getKey(key.uri);
    const pub = decodePublic(k.public).area;
    const fixedParent = (pub.attributes & OBJ.fixedParent) !== 0;
    const noPolicy = pub.authPolicy.length === 0;
    const attempts: ExtractionAttempt[] = [
      {
        route: 'TPM2_Duplicate to a parent the attacker controls',
        refused: fixedParent || noPolicy,
        backendCode: fixedParent ? 'TPMA_OBJECT_FIXEDPARENT (TPM_RC_ATTRIBUTES)' : noPolicy ? 'empty authPolicy: no DUP-role policy can match' : 'DUPLICABLE under its policy',
      },
      {
        route: 'load the key-store blob into another TPM',
        refused: true,
        backendCode: 'TPM2B_PRIVATE encrypted under this TPM\'s storage key (TPM_RC_INTEGRITY elsewhere)',
      },
    ];
    try {
      // the key is usable here, yet no TPM answer carries its private part
      await this.conn.run('TPM2_ReadPublic', async (ctx) => ctx.readPublic(await this.conn.loaded(ctx, k)));
      attempts.push({ route: 'TPM2_ReadPublic / any TPM response', refused: true, backendCode: 'no command returns TPMT_SENSITIVE' });
    } catch (e) {
      attempts.push({ route: 'TPM2_ReadPublic', refused: true, backendCode: tpmError(e, 'probe').backendCode ?? 'error' });
    }
    return attempts;
  }

  /** Key-store consistency after crashes (`seal doctor`): files, and every key loads in this TPM. */
  async check(): Promise<string[]> {
    const problems = this.store.check();
    for (const meta of this.store.list()) {
      try {
        let obj: Loadable;
        if (meta.kind === 'data') {
          const blobs = this.store.blobs(meta.id, meta);
          checkRecord(meta, blobs);
          obj = { cacheKey: meta.id, ...blobs, auth: () => Buffer.alloc(0) };
        } else obj = this.#handle(meta);
        await this.conn.run('load check', async (ctx) => {
          await this.conn.loaded(ctx, obj);
          await this.conn.evict(ctx, meta.id);
        });
      } catch (e) {
        const what = damageOf(e);
        if (what !== undefined) {
          problems.push(`${meta.id}.json ('${meta.label}'): damaged record (${what}) — never loaded; delete ${meta.id}.json and ${meta.id}.pem`);
          continue;
        }
        const code = e instanceof SealError ? (e.backendCode ?? e.code) : 'error';
        problems.push(`${meta.id}.json ('${meta.label}'): does not load in this TPM (${code}) — made under another TPM or storage key; delete ${meta.id}.json and ${meta.id}.pem`);
      }
    }
    return problems;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.conn.close();
  }
}

/** The duplication blob a provisioning server makes for a TPM (see wrapForTpm). */
export interface WrappedTpmKey {
  /** TPM2B_PUBLIC of the wrapped key. */
  public: Buffer;
  /** TPM2B_PRIVATE: outer-wrapped sensitive area. */
  duplicate: Buffer;
  /** TPM2B_ENCRYPTED_SECRET: the seed, encrypted to the SRK. */
  seed: Buffer;
}

function checkLabel(label: unknown): asserts label is string {
  if (typeof label !== 'string' || label.length === 0) throw new SealError('INVALID_ARGUMENT', 'label must be a non-empty string');
  if (Buffer.byteLength(label) > MAX_LABEL) throw new SealError('INVALID_ARGUMENT', `label is longer than ${MAX_LABEL} bytes`);
}

function capabilityName(a: KeyAlgorithm): string {
  switch (a.name) {
    case 'ECDSA':
    case 'ECDH':
      return `${a.name} ${a.namedCurve}`;
    case 'RSA':
      return `RSA-${a.modulusLength}`;
    case 'HMAC':
      return `HMAC ${a.hash}`;
    case 'AES':
      return `AES-${a.length}`;
    default:
      return a.name;
  }
}

/** Object template of a new key: always fixedTPM|fixedParent|sensitiveDataOrigin. */
export function keyTemplate(a: KeyAlgorithm, usages: readonly KeyUsage[], noAuth: boolean, policy?: Buffer): PublicArea {
  const base = OBJ.fixedTPM | OBJ.fixedParent | OBJ.sensitiveDataOrigin | (policy ? 0 : OBJ.userWithAuth) | (noAuth ? OBJ.noDA : 0);
  const authPolicy = policy ?? Buffer.alloc(0);
  const has = (u: KeyUsage): boolean => usages.includes(u);
  switch (a.name) {
    case 'ECDSA':
      // a TPM ECC key needs sign or decrypt: a verify-only key gets decrypt, so the TPM refuses to sign with it
      return { type: 'ecc', nameAlg: ALG.SHA256, attributes: base | (has('sign') ? OBJ.sign : OBJ.decrypt), authPolicy, symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.NULL }, curve: CURVE[a.namedCurve], kdf: { alg: ALG.NULL }, x: Buffer.alloc(0), y: Buffer.alloc(0) };
    case 'ECDH':
      return { type: 'ecc', nameAlg: ALG.SHA256, attributes: base | OBJ.decrypt, authPolicy, symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.NULL }, curve: CURVE[a.namedCurve], kdf: { alg: ALG.NULL }, x: Buffer.alloc(0), y: Buffer.alloc(0) };
    case 'RSA': {
      const attrs = base | (has('sign') ? OBJ.sign : 0) | (has('decrypt') || has('unwrapKey') ? OBJ.decrypt : 0);
      return { type: 'rsa', nameAlg: ALG.SHA256, attributes: attrs, authPolicy, symmetric: { alg: ALG.NULL }, scheme: { alg: ALG.NULL }, keyBits: a.modulusLength, exponent: 0, modulus: Buffer.alloc(0) };
    }
    case 'AES':
      if (has('wrapKey') || has('unwrapKey') || has('deriveKey')) throw new SealError('NOT_SUPPORTED', 'TPM AES keys encrypt and decrypt (AES-CFB) only');
      // symCipher: decrypt and sign (= encrypt) as the usages ask; the mode is chosen per command
      return { type: 'symcipher', nameAlg: ALG.SHA256, attributes: base | (has('decrypt') ? OBJ.decrypt : 0) | (has('encrypt') ? OBJ.sign : 0), authPolicy, symmetric: { alg: ALG.AES, keyBits: a.length, mode: ALG.NULL }, unique: Buffer.alloc(0) };
    case 'HMAC':
      if (has('deriveKey')) {
        if (has('sign') || has('verify')) throw new SealError('NOT_SUPPORTED', 'a TPM derivation parent cannot also sign: create two keys');
        // derivation parent (TPM 2.0 Part 1, derived objects): restricted|decrypt keyedHash, KDF1_SP800_108
        return { type: 'keyedhash', nameAlg: ALG.SHA256, attributes: base | OBJ.restricted | OBJ.decrypt, authPolicy, scheme: { alg: ALG.XOR, hash: ALG.SHA256, kdf: ALG.KDF1_SP800_108 }, unique: Buffer.alloc(0) };
      }
      return { type: 'keyedhash', nameAlg: ALG.SHA256, attributes: base | (has('sign') || has('verify') ? OBJ.sign : 0), authPolicy, scheme: { alg: ALG.HMAC, hash: HASH_ALG[a.hash] }, unique: Buffer.alloc(0) };
    default:
      throw new SealError('NOT_SUPPORTED', `the TPM backend does not generate ${a.name} keys`);
  }
}

function algorithmOf(p: PublicArea): KeyAlgorithm {
  if (p.type === 'ecc') {
    const curve = p.curve === CURVE['P-256'] ? 'P-256' : p.curve === CURVE['P-384'] ? 'P-384' : undefined;
    if (!curve) throw new SealError('NOT_SUPPORTED', 'unsupported curve');
    return (p.attributes & OBJ.sign) !== 0 ? { name: 'ECDSA', namedCurve: curve } : { name: 'ECDH', namedCurve: curve };
  }
  if (p.type === 'rsa' && p.keyBits === 2048) return { name: 'RSA', modulusLength: 2048 };
  if (p.type === 'keyedhash' && (p.scheme.alg === ALG.HMAC || p.scheme.alg === ALG.XOR)) return { name: 'HMAC', hash: 'SHA-256' };
  throw new SealError('NOT_SUPPORTED', 'unsupported key type in the wrapped blob');
}

/** SPKI of a TPM public area. */
export function spkiOf(a: KeyAlgorithm, p: PublicArea): Buffer | undefined {
  if (p.type === 'ecc') return spkiFromAttributes(a, { ecPoint: Buffer.concat([Buffer.from([4]), p.x, p.y]) });
  if (p.type === 'rsa') {
    const e = Buffer.alloc(4);
    e.writeUInt32BE(p.exponent === 0 ? 65537 : p.exponent);
    return spkiFromAttributes(a, { modulus: p.modulus, exponent: e });
  }
  return undefined;
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
