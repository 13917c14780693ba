/**
 * A PKCS#11 token as a SecureEnvironment: key generation with protected templates, lookup by
 * label/id/URI, derivation and unwrapping into new key objects that stay inside, sensitive
 * data objects (private CKO_DATA), random, and the environment's info and capabilities.
 */
import { randomBytes } from 'node:crypto';
import pkcs11 from 'pkcs11js';
import type { Handle, Mechanism, Template } from 'pkcs11js';
import { SealError } from '../../core/errors.js';
import {
  checkUsages,
  isAsymmetric,
  normalizeAlgorithm,
  type KeyAlgorithm,
  type KeyKind,
  type KeyUsage,
} from '../../core/algorithms.js';
import { SealUri } from '../../core/uri.js';
import type { ProtectionLevel } from '../../core/protection.js';
import type {
  Capability,
  DataObjectInfo,
  DeriveParams,
  DerivedKeySpec,
  EnvironmentInfo,
  GenerateKeySpec,
  ImportPublicKeySpec,
  KeyHandle,
  KeyProvenance,
  KeyQuery,
  ExtractionAttempt,
  SecureEnvironment,
  UnwrapSpec,
} from '../../core/types.js';
import { mapPkcs11Error } from './errors.js';
import {
  CK,
  CURVE_OID_DER,
  capabilitiesFor,
  keyGenMechanism,
  privateTemplate,
  publicTemplate,
  secretTemplate,
  HASH_MECH,
} from './mechanisms.js';
import { Pkcs11Key, type KeyRecord } from './key.js';
import { attributesFromSpki, spkiFromAttributes, wrapEcPoint } from '../../core/public-key.js';
import type { SessionPool } from './session-pool.js';
import { loadKdfShim, kdfShimUnavailableReason, encodeTemplate, type KdfMechanism } from './kdf-native.js';

const MAX_LABEL = 128;
const MAX_DATA_OBJECT = 1024 * 1024;
const MAX_RANDOM = 1024 * 1024;
const DATA_APPLICATION = 'seal-bridge';

const CLASS_OF: Record<KeyKind, number> = {
  private: pkcs11.CKO_PRIVATE_KEY,
  public: pkcs11.CKO_PUBLIC_KEY,
  secret: pkcs11.CKO_SECRET_KEY,
};

export interface Pkcs11EnvironmentParams {
  pool: SessionPool;
  modulePath: string;
  /** The URI the environment was opened with (secrets removed); key URIs derive from it. */
  baseUri: SealUri;
  info: EnvironmentInfo;
  mechanisms: ReadonlySet<number>;
  onClose: () => void;
}

function checkLabel(label: unknown, what = 'label'): asserts label is string {
  if (typeof label !== 'string' || label.length === 0) throw new SealError('INVALID_ARGUMENT', `${what} must be a non-empty string`);
  if (Buffer.byteLength(label) > MAX_LABEL) throw new SealError('INVALID_ARGUMENT', `${what} is longer than ${MAX_LABEL} bytes`);
}

const bool = (b: Buffer | undefined): boolean => b !== undefined && b.length > 0 && b[0] !== 0;
const ulong = (b: Buffer | undefined): number => (b && b.length >= 4 ? (b.length >= 8 ? Number(b.readBigUInt64LE(0)) : b.readUInt32LE(0)) : 0);

export class Pkcs11Environment implements SecureEnvironment {
  readonly pool: SessionPool;
  readonly info: EnvironmentInfo;
  readonly capabilities: readonly Capability[];
  readonly #p: Pkcs11EnvironmentParams;
  closed = false;

  constructor(p: Pkcs11EnvironmentParams) {
    this.#p = p;
    this.pool = p.pool;
    this.info = p.info;
    const caps = capabilitiesFor(p.mechanisms);
    this.capabilities = loadKdfShim() ? caps : caps.filter((c) => c.note !== 'native shim');
  }

  get uri(): string {
    return this.#p.baseUri.toString();
  }

  keyUri(rec: Pick<KeyRecord, 'label' | 'id' | 'kind'>): SealUri {
    return this.#p.baseUri.withPath({ object: rec.label, id: rec.id, type: rec.kind });
  }

  supports(mechanism: number): boolean {
    return this.#p.mechanisms.has(mechanism);
  }

  #requireMechanism(mechanism: number, what: string): void {
    if (!this.#p.mechanisms.has(mechanism)) {
      throw new SealError('NOT_SUPPORTED', `${this.info.label} does not offer ${what}`, { backendCode: 'CKR_MECHANISM_INVALID' });
    }
  }

  // ---- lookup ------------------------------------------------------------------------------

  #find(session: Handle, template: Template, max = 1000): Handle[] {
    const lib = this.pool.lib;
    lib.C_FindObjectsInit(session, template);
    try {
      return lib.C_FindObjects(session, max);
    } finally {
      lib.C_FindObjectsFinal(session);
    }
  }

  findHandle(session: Handle, kind: KeyKind, id: Buffer, label: string): Handle | undefined {
    const found = this.#find(session, [
      { type: pkcs11.CKA_CLASS, value: CLASS_OF[kind] },
      { type: pkcs11.CKA_ID, value: id },
      { type: pkcs11.CKA_LABEL, value: label },
    ], 2);
    return found[0];
  }

  /** Reads an object's attributes into a KeyRecord (never CKA_VALUE or other secret parts). */
  #record(session: Handle, h: Handle, expected?: KeyAlgorithm): KeyRecord {
    const lib = this.pool.lib;
    const get = (types: number[]): Map<number, Buffer> => {
      const out = new Map<number, Buffer>();
      for (const a of lib.C_GetAttributeValue(session, h, types.map((type) => ({ type })))) {
        if (a.value !== undefined) out.set(a.type, a.value as Buffer);
      }
      return out;
    };
    const base = get([pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE, pkcs11.CKA_LABEL, pkcs11.CKA_ID, pkcs11.CKA_TOKEN, pkcs11.CKA_LOCAL]);
    const cls = ulong(base.get(pkcs11.CKA_CLASS));
    const keyType = ulong(base.get(pkcs11.CKA_KEY_TYPE));
    const kind: KeyKind = cls === pkcs11.CKO_PRIVATE_KEY ? 'private' : cls === pkcs11.CKO_PUBLIC_KEY ? 'public' : 'secret';
    const label = base.get(pkcs11.CKA_LABEL)?.toString('utf8') ?? '';
    const id = base.get(pkcs11.CKA_ID) ?? Buffer.alloc(0);
    const usageTypes: Array<[number, KeyUsage]> =
      kind === 'private'
        ? [[pkcs11.CKA_SIGN, 'sign'], [pkcs11.CKA_DECRYPT, 'decrypt'], [pkcs11.CKA_UNWRAP, 'unwrapKey'], [pkcs11.CKA_DERIVE, 'deriveKey']]
        : kind === 'public'
          ? [[pkcs11.CKA_VERIFY, 'verify'], [pkcs11.CKA_ENCRYPT, 'encrypt'], [pkcs11.CKA_WRAP, 'wrapKey']]
          : [[pkcs11.CKA_SIGN, 'sign'], [pkcs11.CKA_VERIFY, 'verify'], [pkcs11.CKA_ENCRYPT, 'encrypt'], [pkcs11.CKA_DECRYPT, 'decrypt'], [pkcs11.CKA_WRAP, 'wrapKey'], [pkcs11.CKA_UNWRAP, 'unwrapKey'], [pkcs11.CKA_DERIVE, 'deriveKey']];
    const flags = get(usageTypes.map(([t]) => t));
    const usages = usageTypes.filter(([t]) => bool(flags.get(t))).map(([, u]) => u);
    const local = bool(base.get(pkcs11.CKA_LOCAL));
    let provenance: KeyProvenance;
    if (kind === 'public') {
      provenance = { origin: local ? 'generated-inside' : 'imported-public', local };
    } else {
      const prot = get([pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE]);
      const alwaysSensitive = bool(prot.get(pkcs11.CKA_ALWAYS_SENSITIVE));
      provenance = {
        origin: local ? 'generated-inside' : alwaysSensitive ? 'derived-inside' : 'imported',
        sensitive: bool(prot.get(pkcs11.CKA_SENSITIVE)),
        extractable: bool(prot.get(pkcs11.CKA_EXTRACTABLE)),
        alwaysSensitive,
        neverExtractable: bool(prot.get(pkcs11.CKA_NEVER_EXTRACTABLE)),
        local,
      };
    }
    let algorithm: KeyAlgorithm;
    let publicKey: Buffer | undefined;
    if (keyType === pkcs11.CKK_EC || keyType === CK.CKK_EC_EDWARDS) {
      const params = get([pkcs11.CKA_EC_PARAMS]).get(pkcs11.CKA_EC_PARAMS) ?? Buffer.alloc(0);
      if (params.equals(CURVE_OID_DER.Ed25519) || keyType === CK.CKK_EC_EDWARDS) algorithm = { name: 'Ed25519' };
      else {
        const curve = params.equals(CURVE_OID_DER['P-256']) ? 'P-256' : params.equals(CURVE_OID_DER['P-384']) ? 'P-384' : undefined;
        if (!curve) throw new SealError('NOT_SUPPORTED', `key ${label} is on a curve seal-bridge does not support`);
        const ecdh = usages.includes('deriveKey') && !usages.includes('sign') && !usages.includes('verify');
        algorithm = { name: ecdh ? 'ECDH' : 'ECDSA', namedCurve: curve };
      }
      if (kind === 'public') publicKey = spkiFromAttributes(algorithm, { ecPoint: get([pkcs11.CKA_EC_POINT]).get(pkcs11.CKA_EC_POINT) ?? Buffer.alloc(0) });
    } else if (keyType === pkcs11.CKK_RSA) {
      const a = get([pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT]);
      const modulus = a.get(pkcs11.CKA_MODULUS) ?? Buffer.alloc(0);
      let bits = modulus.length * 8;
      if (modulus[0] === 0) bits -= 8;
      if (bits !== 2048 && bits !== 3072 && bits !== 4096) throw new SealError('NOT_SUPPORTED', `RSA-${bits} key ${label} is not supported`);
      algorithm = { name: 'RSA', modulusLength: bits };
      publicKey = spkiFromAttributes(algorithm, { modulus, exponent: a.get(pkcs11.CKA_PUBLIC_EXPONENT) ?? Buffer.from([1, 0, 1]) });
    } else if (keyType === pkcs11.CKK_AES) {
      let len = ulong(get([pkcs11.CKA_VALUE_LEN]).get(pkcs11.CKA_VALUE_LEN)) * 8;
      // SoftHSM 2.6 leaves CKA_VALUE_LEN at 0 on unwrapped keys: trust the unwrap request, else say 256
      if (len === 0) len = expected?.name === 'AES' ? expected.length : 256;
      if (len !== 128 && len !== 192 && len !== 256) throw new SealError('NOT_SUPPORTED', `AES key ${label} has an unsupported length`);
      algorithm = { name: 'AES', length: len };
    } else if (keyType === pkcs11.CKK_GENERIC_SECRET || keyType === pkcs11.CKK_SHA256_HMAC) {
      const len = ulong(get([pkcs11.CKA_VALUE_LEN]).get(pkcs11.CKA_VALUE_LEN)) * 8;
      // 0: SoftHSM 2.6 keeps no CKA_VALUE_LEN on unwrapped keys; the length is then unknown
      algorithm = len === 256 || len === 0 ? { name: 'HMAC', hash: 'SHA-256' } : { name: 'HMAC', hash: 'SHA-256', length: len };
    } else {
      throw new SealError('NOT_SUPPORTED', `key ${label} has a key type seal-bridge does not support (0x${keyType.toString(16)})`);
    }
    return { kind, label, id, algorithm, usages, provenance, publicKey, token: bool(base.get(pkcs11.CKA_TOKEN)) };
  }

  /** A private key's record gains the SPKI (and verify/encrypt usages) of its public half. */
  #withPublicHalf(session: Handle, rec: KeyRecord): KeyRecord {
    if (rec.kind !== 'private') return rec;
    const pub = this.#find(session, [{ type: pkcs11.CKA_CLASS, value: pkcs11.CKO_PUBLIC_KEY }, { type: pkcs11.CKA_ID, value: rec.id }], 1)[0];
    if (!pub) return rec;
    const p = this.#record(session, pub);
    const usages = [...new Set([...rec.usages, ...p.usages])].filter((u) => u !== 'wrapKey' || rec.usages.includes('unwrapKey'));
    let algorithm = rec.algorithm;
    // an ECDH private key's public half has no usages; keep what the private key says
    if (rec.algorithm.name === 'ECDSA' && p.algorithm.name === 'ECDSA' && !rec.usages.includes('sign') && rec.usages.includes('deriveKey')) {
      algorithm = { name: 'ECDH', namedCurve: rec.algorithm.namedCurve };
    }
    return { ...rec, algorithm, usages, publicKey: p.publicKey ?? rec.publicKey };
  }

  #keyFromHandle(session: Handle, h: Handle, expected?: KeyAlgorithm): Pkcs11Key {
    return new Pkcs11Key(this, this.#withPublicHalf(session, this.#record(session, h, expected)), h);
  }

  async getKey(uriOrLabel: string, kind?: KeyKind): Promise<KeyHandle> {
    let query: KeyQuery;
    if (typeof uriOrLabel !== 'string' || uriOrLabel.length === 0) throw new SealError('INVALID_ARGUMENT', 'a key URI or label is required');
    if (uriOrLabel.startsWith('pkcs11:')) {
      const u = SealUri.parse(uriOrLabel);
      const token = u.get('token');
      if (token !== undefined && token !== this.info.label) {
        throw new SealError('KEY_NOT_FOUND', `key URI names token '${token}', this environment is token '${this.info.label}'`);
      }
      const type = u.get('type');
      if (type !== undefined && type !== 'private' && type !== 'public' && type !== 'secret') throw new SealError('INVALID_URI', `unknown object type '${type}'`);
      const label = u.get('object');
      const id = u.getBytes('id');
      if (label === undefined && id === undefined) throw new SealError('INVALID_URI', 'a key URI needs object= or id=');
      query = { kind: (type as KeyKind | undefined) ?? kind };
      if (label !== undefined) query.label = label;
      if (id !== undefined) query.id = id;
    } else {
      query = { label: uriOrLabel };
      if (kind) query.kind = kind;
    }
    const found = await this.listKeys(query);
    if (found.length === 0) throw new SealError('KEY_NOT_FOUND', `no key ${query.label ? `'${query.label}'` : `with id ${query.id?.toString('hex')}`} on token '${this.info.label}'`);
    if (found.length > 1) {
      throw new SealError('AMBIGUOUS_KEY', `${found.length} keys match '${query.label ?? query.id?.toString('hex')}' on token '${this.info.label}'; use the key's URI (with id=)`);
    }
    return found[0]!;
  }

  async listKeys(query: KeyQuery = {}): Promise<KeyHandle[]> {
    return this.pool.run('list keys', (s) => {
      const kinds: KeyKind[] = query.kind ? [query.kind] : ['private', 'secret', 'public'];
      const out: Pkcs11Key[] = [];
      const privateIds = new Set<string>();
      for (const kind of kinds) {
        const t: Template = [{ type: pkcs11.CKA_CLASS, value: CLASS_OF[kind] }];
        if (query.label !== undefined) t.push({ type: pkcs11.CKA_LABEL, value: query.label });
        if (query.id !== undefined) t.push({ type: pkcs11.CKA_ID, value: query.id });
        for (const h of this.#find(s, t)) {
          let rec: KeyRecord;
          try {
            rec = this.#record(s, h);
          } catch (e) {
            // foreign key types are not ours to list; an object whose key material cannot be read
            // (what a process killed inside C_GenerateKeyPair leaves) must not hide every other key
            if (e instanceof SealError && (e.code === 'NOT_SUPPORTED' || e.code === 'INVALID_ARGUMENT')) continue;
            throw e;
          }
          if (kind === 'private') privateIds.add(rec.id.toString('hex'));
          // the public half of a key pair is part of its private key's handle
          if (kind === 'public' && !query.kind && privateIds.has(rec.id.toString('hex'))) continue;
          out.push(new Pkcs11Key(this, this.#withPublicHalf(s, rec), h));
        }
      }
      return out;
    }, { idempotent: true });
  }

  // ---- creation ------------------------------------------------------------------------------

  async generateKey(spec: GenerateKeySpec): Promise<KeyHandle> {
    if (!spec || typeof spec !== 'object') throw new SealError('INVALID_ARGUMENT', 'a key spec is required');
    checkLabel(spec.label);
    const algorithm = normalizeAlgorithm(spec.algorithm);
    const usages = checkUsages(algorithm, spec.usages);
    if (algorithm.name === 'AES' && algorithm.length === 192) throw new SealError('NOT_SUPPORTED', 'AES-192 keys are not offered; use AES-128 or AES-256');
    // a generic secret does not record its hash: only HMAC SHA-256 keys read back as what they are
    if (algorithm.name === 'HMAC' && (algorithm.hash !== 'SHA-256' || (algorithm.length ?? 256) !== 256)) {
      throw new SealError('NOT_SUPPORTED', 'HMAC keys are offered as HMAC SHA-256 with 256-bit keys');
    }
    const mech = keyGenMechanism(algorithm);
    this.#requireMechanism(mech, `key generation for ${algorithm.name}`);
    const id = spec.id ?? randomBytes(16);
    const naming = { label: spec.label, id, token: true };
    const lib = this.pool.lib;
    return this.pool.run(`generate ${spec.label}`, async (s) => {
      const existing = this.#find(s, [{ type: pkcs11.CKA_LABEL, value: spec.label }], 1);
      if (existing.length) throw new SealError('KEY_EXISTS', `a key labelled '${spec.label}' already exists on token '${this.info.label}'`);
      if (isAsymmetric(algorithm)) {
        const kp = await lib.C_GenerateKeyPairAsync(s, { mechanism: mech }, publicTemplate(algorithm, usages, naming), privateTemplate(algorithm, usages, naming));
        return this.#keyFromHandle(s, kp.privateKey);
      }
      const h = await lib.C_GenerateKeyAsync(s, { mechanism: mech }, secretTemplate(algorithm, usages, naming));
      return this.#keyFromHandle(s, h);
    }, { slow: true });
  }

  async importPublicKey(spec: ImportPublicKeySpec): Promise<KeyHandle> {
    checkLabel(spec.label);
    const parsed = attributesFromSpki(spec.spki);
    const usages = spec.usages ?? (parsed.algorithm.name === 'RSA' ? ['verify', 'encrypt'] : ['verify']);
    const id = spec.id ?? randomBytes(16);
    const t = publicTemplate(parsed.algorithm, usages, { label: spec.label, id, token: true }).filter((a) => a.type !== pkcs11.CKA_MODULUS_BITS);
    if (parsed.ecPoint) t.push({ type: pkcs11.CKA_EC_POINT, value: wrapEcPoint(parsed.ecPoint) });
    if (parsed.modulus) t.push({ type: pkcs11.CKA_MODULUS, value: parsed.modulus });
    return this.pool.run(`import public key ${spec.label}`, (s) => this.#keyFromHandle(s, this.pool.lib.C_CreateObject(s, t)));
  }

  #targetTemplate(target: DerivedKeySpec, withLength: boolean): { template: Template; algorithm: KeyAlgorithm } {
    if (!target || typeof target !== 'object') throw new SealError('INVALID_ARGUMENT', 'a target key spec is required');
    if (target.label !== undefined) checkLabel(target.label);
    const algorithm = normalizeAlgorithm(target.algorithm);
    const usages = checkUsages(algorithm, target.usages);
    const naming = { label: target.label ?? `seal-session-${randomBytes(4).toString('hex')}`, id: target.id ?? randomBytes(16), token: target.label !== undefined };
    if (isAsymmetric(algorithm)) return { template: privateTemplate(algorithm, usages, naming), algorithm };
    return { template: secretTemplate(algorithm, usages, naming, withLength), algorithm };
  }

  /** C_DeriveKey into a new protected secret key object. */
  async deriveInto(base: Pkcs11Key, mech: Mechanism, target: DerivedKeySpec, what: string): Promise<KeyHandle> {
    this.#requireMechanism(mech.mechanism, what);
    const { template, algorithm } = this.#targetTemplate(target, true);
    if (isAsymmetric(algorithm)) throw new SealError('INVALID_ARGUMENT', 'derived keys are secret keys (AES or HMAC)');
    const lib = this.pool.lib;
    return this.pool.run(what, async (s) => {
      const h = await lib.C_DeriveKeyAsync(s, mech, await base.objectHandle(s), template);
      return this.#keyFromHandle(s, h);
    }, { anchored: target.label === undefined });
  }

  async deriveWithShim(base: Pkcs11Key, params: DeriveParams, target: DerivedKeySpec): Promise<KeyHandle> {
    const shim = loadKdfShim();
    if (!shim) throw new SealError('NOT_SUPPORTED', `${params.kdf} needs the pkcs11-kdf native shim: ${kdfShimUnavailableReason() ?? 'not built'}`);
    let mech: KdfMechanism;
    let mechanism: number;
    switch (params.kdf) {
      case 'AES-ECB-ENCRYPT-DATA':
        if (!Buffer.isBuffer(params.data) || params.data.length === 0 || params.data.length % 16 || params.data.length > 4096) {
          throw new SealError('INVALID_ARGUMENT', 'derivation data must be a non-empty multiple of 16 bytes');
        }
        mech = { kind: 'ecb-encrypt-data', data: params.data };
        mechanism = pkcs11.CKM_AES_ECB_ENCRYPT_DATA;
        break;
      case 'HKDF': {
        const h = HASH_MECH[params.hash];
        if (!h) throw new SealError('NOT_SUPPORTED', `HKDF hash ${String(params.hash)} is not supported`);
        mech = { kind: 'hkdf', prf: h.mech, extract: true, expand: true, ...(params.salt ? { salt: params.salt } : {}), ...(params.info ? { info: params.info } : {}) };
        mechanism = CK.CKM_HKDF_DERIVE;
        break;
      }
      case 'SP800-108-COUNTER': {
        const prf = ({ 'SHA-256': pkcs11.CKM_SHA256_HMAC, 'SHA-384': pkcs11.CKM_SHA384_HMAC, 'SHA-512': pkcs11.CKM_SHA512_HMAC } as Record<string, number>)[params.hash];
        if (!prf) throw new SealError('NOT_SUPPORTED', `SP 800-108 hash ${String(params.hash)} is not supported`);
        mech = { kind: 'sp800-108-counter', prf, counterBits: 32, ...(params.label ? { label: params.label } : {}), ...(params.context ? { context: params.context } : {}) };
        mechanism = CK.CKM_SP800_108_COUNTER_KDF;
        break;
      }
      default:
        throw new SealError('NOT_SUPPORTED', 'unknown derivation');
    }
    this.#requireMechanism(mechanism, params.kdf);
    const { template, algorithm } = this.#targetTemplate(target, true);
    if (isAsymmetric(algorithm)) throw new SealError('INVALID_ARGUMENT', 'derived keys are secret keys (AES or HMAC)');
    // [L]_32 follows the context, as TPM 2.0 KDFa lays it out; the module fills in L from CKA_VALUE_LEN
    if (mech.kind === 'sp800-108-counter') mech = { ...mech, dkmLengthBits: 32 };
    const encoded = encodeTemplate(template.map((a) => ({ type: a.type, value: a.value as boolean | number | Buffer | string })));
    return this.pool.run(`${params.kdf} derive`, async (s) => {
      const h = await shim.deriveKey(this.#p.modulePath, s, await base.objectHandle(s), mech, encoded);
      return this.#keyFromHandle(s, h);
    }, { anchored: target.label === undefined });
  }

  wrapMechanism(algorithm: 'AES-KW' | 'AES-KWP' | 'RSA-OAEP', keyAlg: KeyAlgorithm): Mechanism {
    let mech: Mechanism;
    if (algorithm === 'AES-KW' && keyAlg.name === 'AES') mech = { mechanism: pkcs11.CKM_AES_KEY_WRAP };
    else if (algorithm === 'AES-KWP' && keyAlg.name === 'AES') mech = { mechanism: pkcs11.CKM_AES_KEY_WRAP_PAD };
    else if (algorithm === 'RSA-OAEP' && keyAlg.name === 'RSA') {
      mech = {
        mechanism: pkcs11.CKM_RSA_PKCS_OAEP,
        parameter: { type: pkcs11.CK_PARAMS_RSA_OAEP, hashAlg: pkcs11.CKM_SHA_1, mgf: pkcs11.CKG_MGF1_SHA1, source: CK.CKZ_DATA_SPECIFIED } as pkcs11.RsaOAEP,
      };
    } else throw new SealError('INVALID_ARGUMENT', `${algorithm} does not go with a ${keyAlg.name} key`);
    this.#requireMechanism(mech.mechanism, algorithm);
    return mech;
  }

  async unwrapInto(unwrapping: Pkcs11Key, wrapped: Buffer, spec: UnwrapSpec): Promise<KeyHandle> {
    const mech = this.wrapMechanism(spec.wrapAlgorithm, unwrapping.algorithm);
    const { template, algorithm } = this.#targetTemplate(spec, false);
    if (algorithm.name === 'ECDSA' || algorithm.name === 'ECDH') template.push({ type: pkcs11.CKA_EC_PARAMS, value: CURVE_OID_DER[algorithm.namedCurve] });
    if (algorithm.name === 'Ed25519') template.push({ type: pkcs11.CKA_EC_PARAMS, value: CURVE_OID_DER.Ed25519 });
    const lib = this.pool.lib;
    try {
      return await this.pool.run(`unwrap into ${spec.label ?? 'a session key'}`, async (s) => {
        if (spec.label !== undefined && this.#find(s, [{ type: pkcs11.CKA_LABEL, value: spec.label }], 1).length) {
          throw new SealError('KEY_EXISTS', `a key labelled '${spec.label}' already exists on token '${this.info.label}'`);
        }
        const h = await lib.C_UnwrapKeyAsync(s, mech, await unwrapping.objectHandle(s), wrapped, template);
        return this.#keyFromHandle(s, h, algorithm);
      }, { anchored: spec.label === undefined });
    } catch (e) {
      // SoftHSM 2.6 answers a failed RFC 3394 integrity check or OAEP decoding with CKR_GENERAL_ERROR
      if (e instanceof SealError && (e.code === 'DECRYPTION_FAILED' || e.backendCode === 'CKR_FUNCTION_FAILED' || e.backendCode === 'CKR_GENERAL_ERROR')) {
        throw new SealError('DECRYPTION_FAILED', 'unwrapping failed', { backendCode: e.backendCode, backendStatus: e.backendStatus });
      }
      throw e;
    }
  }

  async destroyKey(key: Pkcs11Key, rec: Readonly<KeyRecord>): Promise<void> {
    const lib = this.pool.lib;
    await this.pool.run(`destroy ${rec.label}`, async (s) => {
      const h = await key.objectHandle(s);
      if (rec.kind === 'private') {
        for (const pub of this.#find(s, [{ type: pkcs11.CKA_CLASS, value: pkcs11.CKO_PUBLIC_KEY }, { type: pkcs11.CKA_ID, value: rec.id }], 10)) {
          lib.C_DestroyObject(s, pub);
        }
      }
      lib.C_DestroyObject(s, h);
    });
  }

  // ---- data objects and random ---------------------------------------------------------------

  #dataTemplate(label: string): Template {
    return [
      { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_DATA },
      { type: pkcs11.CKA_LABEL, value: label },
      { type: pkcs11.CKA_APPLICATION, value: DATA_APPLICATION },
    ];
  }

  async writeData(label: string, value: Buffer): Promise<DataObjectInfo> {
    checkLabel(label);
    if (!Buffer.isBuffer(value)) throw new SealError('INVALID_ARGUMENT', 'data must be a Buffer');
    if (value.length > MAX_DATA_OBJECT) throw new SealError('DATA_TOO_LARGE', `data objects hold at most ${MAX_DATA_OBJECT} bytes`);
    const lib = this.pool.lib;
    await this.pool.run(`write data ${label}`, (s) => {
      const old = this.#find(s, this.#dataTemplate(label), 10);
      lib.C_CreateObject(s, [
        ...this.#dataTemplate(label),
        { type: pkcs11.CKA_TOKEN, value: true },
        { type: pkcs11.CKA_PRIVATE, value: true },
        { type: pkcs11.CKA_MODIFIABLE, value: true },
        { type: pkcs11.CKA_VALUE, value },
      ]);
      // the new object exists before the old one goes: a crash leaves two copies, never none
      for (const h of old) lib.C_DestroyObject(s, h);
    });
    return { label, size: value.length, uri: this.#p.baseUri.withPath({ object: label, type: 'data' }).toString() };
  }

  async readData(label: string): Promise<Buffer> {
    checkLabel(label);
    return this.pool.run(`read data ${label}`, (s) => {
      const h = this.#find(s, this.#dataTemplate(label), 2);
      if (!h[0]) throw new SealError('OBJECT_NOT_FOUND', `no data object '${label}' on token '${this.info.label}'`);
      const [a] = this.pool.lib.C_GetAttributeValue(s, h[0], [{ type: pkcs11.CKA_VALUE }]);
      return Buffer.from((a?.value as Buffer | undefined) ?? Buffer.alloc(0));
    }, { idempotent: true });
  }

  async deleteData(label: string): Promise<void> {
    checkLabel(label);
    await this.pool.run(`delete data ${label}`, (s) => {
      const found = this.#find(s, this.#dataTemplate(label), 10);
      if (!found.length) throw new SealError('OBJECT_NOT_FOUND', `no data object '${label}' on token '${this.info.label}'`);
      for (const h of found) this.pool.lib.C_DestroyObject(s, h);
    });
  }

  async listData(): Promise<DataObjectInfo[]> {
    return this.pool.run('list data', (s) => {
      const out: DataObjectInfo[] = [];
      for (const h of this.#find(s, [{ type: pkcs11.CKA_CLASS, value: pkcs11.CKO_DATA }, { type: pkcs11.CKA_APPLICATION, value: DATA_APPLICATION }])) {
        const [l, v] = this.pool.lib.C_GetAttributeValue(s, h, [{ type: pkcs11.CKA_LABEL }, { type: pkcs11.CKA_VALUE }]);
        const label = (l?.value as Buffer | undefined)?.toString('utf8') ?? '';
        out.push({ label, size: (v?.value as Buffer | undefined)?.length ?? 0, uri: this.#p.baseUri.withPath({ object: label, type: 'data' }).toString() });
      }
      return out;
    }, { idempotent: true });
  }

  async random(length: number): Promise<Buffer> {
    if (!Number.isInteger(length) || length < 1 || length > MAX_RANDOM) throw new SealError('INVALID_ARGUMENT', `random length must be 1..${MAX_RANDOM} bytes`);
    const request = { op: 'random' as const, mechanism: { mechanism: 0 }, key: Buffer.alloc(0), input: Buffer.alloc(0), outputLength: length };
    return (await this.pool.work('random', () => request, { idempotent: true })) as Buffer;
  }

  async probeExtraction(key: KeyHandle): Promise<ExtractionAttempt[]> {
    if (!(key instanceof Pkcs11Key)) throw new SealError('INVALID_ARGUMENT', 'the key must live in this environment');
    if (key.kind === 'public') throw new SealError('INVALID_ARGUMENT', 'a public key has nothing to extract');
    const lib = this.pool.lib;
    const attempts: ExtractionAttempt[] = [];
    const secretAttrs = key.kind === 'private' ? (key.algorithm.name === 'RSA' ? [pkcs11.CKA_PRIVATE_EXPONENT, pkcs11.CKA_PRIME_1] : [pkcs11.CKA_VALUE]) : [pkcs11.CKA_VALUE];
    const names: Record<number, string> = { [pkcs11.CKA_VALUE]: 'CKA_VALUE', [pkcs11.CKA_PRIVATE_EXPONENT]: 'CKA_PRIVATE_EXPONENT', [pkcs11.CKA_PRIME_1]: 'CKA_PRIME_1' };
    await this.pool.run('probe extraction', async (s) => {
      const h = await key.objectHandle(s);
      for (const type of secretAttrs) {
        try {
          const [a] = lib.C_GetAttributeValue(s, h, [{ type }]);
          const value = a?.value as Buffer | undefined;
          const refused = !value || value.length === 0;
          if (value) value.fill(0); // never kept, never returned
          attempts.push({ route: `C_GetAttributeValue(${names[type]})`, refused });
        } catch (e) {
          attempts.push({ route: `C_GetAttributeValue(${names[type]})`, refused: true, backendCode: mapPkcs11Error(e, 'read').backendCode ?? 'refused' });
        }
      }
      // a wrapping key created for the occasion, as an attacker holding the session would
      let kek: Handle | undefined;
      try {
        kek = lib.C_GenerateKey(s, { mechanism: pkcs11.CKM_AES_KEY_GEN }, secretTemplate({ name: 'AES', length: 256 }, ['wrapKey'], { label: 'seal-probe-kek', id: randomBytes(8), token: false }));
        const mech = key.kind === 'private' ? pkcs11.CKM_AES_KEY_WRAP_PAD : pkcs11.CKM_AES_KEY_WRAP;
        try {
          const out = await lib.C_WrapKeyAsync(s, { mechanism: mech }, kek, h, Buffer.alloc(8192));
          out.fill(0);
          attempts.push({ route: 'C_WrapKey under a fresh AES key', refused: false });
        } catch (e) {
          attempts.push({ route: 'C_WrapKey under a fresh AES key', refused: true, backendCode: mapPkcs11Error(e, 'wrap').backendCode ?? 'refused' });
        }
      } finally {
        if (kek) lib.C_DestroyObject(s, kek);
      }
    });
    return attempts;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.pool.close();
    this.#p.onClose();
  }
}

export function protectionFor(manufacturer: string, model: string, hwSlot: boolean, override?: string): { level: ProtectionLevel; reason: string } {
  if (override !== undefined) {
    const n = Number(override);
    if (![0, 1, 2, 3].includes(n)) throw new SealError('INVALID_URI', 'protection-level must be 0..3');
    process.emitWarning(`protection level of ${model.trim()} set to ${n} by configuration, not by the module`, { code: 'SEAL_PROTECTION_OVERRIDE' });
    return { level: n as ProtectionLevel, reason: 'set by configuration (protection-level=), not reported by the module' };
  }
  const m = `${manufacturer} ${model}`;
  if (/softhsm/i.test(m)) return { level: 1, reason: 'SoftHSM2 is software only, on general-purpose hardware' };
  if (/mozilla|nss/i.test(m)) return { level: 1, reason: 'NSS softokn is software only' };
  if (hwSlot) return { level: 3, reason: 'the module reports a hardware slot (CKF_HW_SLOT): HSM or smart card' };
  return { level: 1, reason: 'the module does not report a hardware slot; treated as software' };
}

