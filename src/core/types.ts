/**
 * The contract every backend implements: a SecureEnvironment that holds keys, and KeyHandles
 * whose sensitive operations run inside the module. Optional powers are methods that fail with
 * NOT_SUPPORTED and are described in `capabilities`, so callers and tests gate on data.
 */
import type { KeyAlgorithm, KeyAlgorithmInput, KeyKind, KeyUsage, HashName } from './algorithms.js';
import type { ProtectionLevel } from './protection.js';
import type { PinOptions } from './secrets.js';

export type Operation =
  | 'generate'
  | 'sign'
  | 'verify'
  | 'encrypt'
  | 'decrypt'
  | 'agree'
  | 'derive'
  | 'wrap'
  | 'unwrap'
  | 'import-public';

/**
 * What happens to the result of an operation:
 * - `key-inside`: the result is a key object that stays inside the module;
 * - `output`: the result is the non-secret or requested output (signature, ciphertext, plaintext);
 * - `secret-leaves`: a secret (e.g. an ECDH shared point) is returned to the host.
 */
export type ResultPlacement = 'key-inside' | 'output' | 'secret-leaves';

export interface Capability {
  /** Key algorithm label, e.g. `ECDSA P-256`, `AES-256`. */
  algorithm: string;
  operation: Operation;
  /** The scheme or mechanism variant, e.g. `RSA-PSS`, `AES-GCM`, `CKM_ECDH1_DERIVE`. */
  variant: string;
  result: ResultPlacement;
  /** The module's own mechanism name. */
  mechanism?: string;
  note?: string;
}

export interface EnvironmentInfo {
  backend: string;
  manufacturer: string;
  model: string;
  serial: string;
  firmware: string;
  label: string;
  protectionLevel: ProtectionLevel;
  /** Why this level was chosen (e.g. "SoftHSM2 is software only"). */
  protectionReason: string;
}

export type KeyOrigin = 'generated-inside' | 'imported' | 'derived-inside' | 'imported-public' | 'unknown';

export interface KeyProvenance {
  origin: KeyOrigin;
  /** As the module reports it (PKCS#11 CKA_ALWAYS_SENSITIVE / CKA_NEVER_EXTRACTABLE, CKA_LOCAL). */
  sensitive?: boolean;
  extractable?: boolean;
  alwaysSensitive?: boolean;
  neverExtractable?: boolean;
  local?: boolean;
}

export interface GenerateKeySpec {
  label: string;
  algorithm: KeyAlgorithmInput;
  usages: KeyUsage[];
  /** Opaque key id; a random 16-byte id when omitted. */
  id?: Buffer;
  /**
   * Modules with fixed key containers (`traits.fixedContainers`): allow replacing the key the
   * named container holds (the old key is destroyed for good). Ignored elsewhere.
   */
  replace?: boolean;
}

/**
 * How an environment's key model differs from the PKCS#11/TPM norm (labels chosen freely, keys
 * destroyable, usages enforced by the module, data objects under any label). Absent = the norm.
 */
export interface EnvironmentTraits {
  /** Keys live in containers the module defines (PIV slots, IoT SAFE containers): a label names one (see `containerFor`). */
  fixedContainers: boolean;
  /** `destroy()` removes a key; false where keys can only be replaced. */
  destroyKeys: boolean;
  /** The module itself refuses operations outside a key's usages (PKCS#11 CKA_SIGN…, TPM attributes). */
  moduleEnforcesUsages: boolean;
  /** What `writeData` stores: any label, certificates of key slots only, or nothing (read-only files). */
  dataObjects: 'any-label' | 'certificates' | 'read-only';
}

export interface SignOptions {
  /** ECDSA signature encoding (default `der`). */
  format?: 'der' | 'p1363';
  /** RSA scheme (default RSASSA-PKCS1-v1_5). */
  scheme?: 'RSASSA-PKCS1-v1_5' | 'RSA-PSS';
  /** Hash over the data (default by key: SHA-256, SHA-384 for P-384). */
  hash?: HashName;
  /** RSA-PSS salt length in bytes (default: hash length). */
  saltLength?: number;
}

export interface EncryptOptions {
  /**
   * AES-GCM (default for AES keys) or RSA-OAEP (default for RSA keys); AES-CFB where the module
   * has no AES-GCM (TPM2_EncryptDecrypt2): no integrity, so authenticate the ciphertext separately.
   */
  algorithm?: 'AES-GCM' | 'RSA-OAEP' | 'AES-CFB';
  /** AES-GCM: 12-byte IV; AES-CFB: 16 bytes. Generated when omitted and returned. */
  iv?: Buffer;
  additionalData?: Buffer;
  /** AES-GCM tag length in bits (default 128). */
  tagLength?: number;
  /** RSA-OAEP hash (default SHA-1, the only one SoftHSM2 offers; set what the module supports). */
  hash?: 'SHA-1' | HashName;
}

export interface EncryptResult {
  ciphertext: Buffer;
  iv?: Buffer;
}

/** A new key object to create inside the module as the result of agree/derive/unwrap. */
export interface DerivedKeySpec {
  algorithm: KeyAlgorithmInput;
  usages: KeyUsage[];
  /** When given, the key is a persistent token object with this label; otherwise it lives until the environment closes. */
  label?: string;
  id?: Buffer;
}

export type DeriveParams =
  /** AES diversification: derived = AES-CBC(base, iv, data) or AES-ECB(base, data); data a multiple of 16 bytes. */
  | { kdf: 'AES-CBC-ENCRYPT-DATA'; data: Buffer; iv?: Buffer }
  | { kdf: 'AES-ECB-ENCRYPT-DATA'; data: Buffer }
  /** RFC 5869 HKDF inside the module (CKM_HKDF_DERIVE). */
  | { kdf: 'HKDF'; hash: HashName; salt?: Buffer; info?: Buffer }
  /** NIST SP 800-108 counter mode with HMAC (TPM 2.0 KDFa layout). */
  | { kdf: 'SP800-108-COUNTER'; hash: HashName; label?: Buffer; context?: Buffer }
  /**
   * TPM 2.0 derived object (TPM2_CreateLoaded under a derivation parent): the TPM derives the new
   * key from the parent's seed, `label` and `context` (each at most 32 bytes) with its KDF; the
   * same inputs always give the same key, which never exists outside the TPM.
   */
  | { kdf: 'TPM-DERIVED-OBJECT'; label: Buffer; context: Buffer };

export interface UnwrapSpec extends DerivedKeySpec {
  /** AES-KW (RFC 3394), AES-KWP (RFC 5649) or RSA-OAEP (SHA-1 on SoftHSM2). */
  wrapAlgorithm: 'AES-KW' | 'AES-KWP' | 'RSA-OAEP';
  /** For private keys: the wrapped bytes are a PKCS#8 PrivateKeyInfo. */
}

export interface ImportPublicKeySpec {
  label: string;
  /** SPKI DER or PEM. */
  spki: Buffer | string;
  usages?: KeyUsage[];
  id?: Buffer;
}

export interface KeyHandle {
  /** Stable, re-openable URI (never carries a PIN). */
  readonly uri: string;
  readonly label: string;
  /** Hex of the module's object id. */
  readonly id: string;
  readonly kind: KeyKind;
  readonly algorithm: KeyAlgorithm;
  readonly usages: readonly KeyUsage[];
  readonly provenance: KeyProvenance;
  /** SubjectPublicKeyInfo DER of an asymmetric key, undefined for secret keys. */
  readonly publicKey: Buffer | undefined;
  publicKeyPem(): string;

  sign(data: Buffer, options?: SignOptions): Promise<Buffer>;
  verify(data: Buffer, signature: Buffer, options?: SignOptions): Promise<boolean>;
  encrypt(data: Buffer, options?: EncryptOptions): Promise<EncryptResult>;
  decrypt(data: Buffer, options?: EncryptOptions): Promise<Buffer>;
  /** ECDH with a peer public key (SPKI DER/PEM or uncompressed point); the shared secret becomes a key object inside. */
  agree(peerPublicKey: Buffer | string, target: DerivedKeySpec): Promise<KeyHandle>;
  /**
   * ECDH where the module hands the shared secret (the x-coordinate of the shared point) back to
   * the host: TPM2_ECDH_ZGen, PIV GENERAL AUTHENTICATE, IoT SAFE COMPUTE DH. Offered only where a
   * capability row `agree` has `result: 'secret-leaves'`; `acknowledge` must be
   * `'secret-leaves-module'` so a caller cannot miss that the secret is outside. Modules that keep
   * the result inside offer `agree()` instead and refuse this with NOT_SUPPORTED.
   */
  sharedSecret(peerPublicKey: Buffer | string, acknowledge: 'secret-leaves-module'): Promise<Buffer>;
  deriveKey(params: DeriveParams, target: DerivedKeySpec): Promise<KeyHandle>;
  /** HMAC over data (a sign with an HMAC key). */
  mac(data: Buffer): Promise<Buffer>;
  /** Wraps another key with this key; the module refuses for non-extractable keys. */
  wrapKey(key: KeyHandle, algorithm: 'AES-KW' | 'AES-KWP' | 'RSA-OAEP'): Promise<Buffer>;
  /** Unwraps a wrapped key with this key into a new key object that stays inside. */
  unwrapKey(wrapped: Buffer, spec: UnwrapSpec): Promise<KeyHandle>;
  destroy(): Promise<void>;
}

export interface DataObjectInfo {
  label: string;
  size: number;
  uri: string;
}

export interface KeyQuery {
  label?: string;
  id?: Buffer;
  kind?: KeyKind;
}

export interface SecureEnvironment {
  readonly uri: string;
  readonly info: EnvironmentInfo;
  readonly capabilities: readonly Capability[];
  /** Where the key model differs from the norm; absent means free labels, destroyable keys, enforced usages. */
  readonly traits?: EnvironmentTraits;
  /**
   * Fixed-container modules: the label of a container where a key of this algorithm and these
   * usages can be generated (with `replace: true` it may overwrite the key there). Generic callers
   * and the conformance suite use it instead of inventing labels.
   */
  containerFor?(algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<string>;
  generateKey(spec: GenerateKeySpec): Promise<KeyHandle>;
  importPublicKey(spec: ImportPublicKeySpec): Promise<KeyHandle>;
  /** By URI (the environment's own kind) or by label. */
  getKey(uriOrLabel: string, kind?: KeyKind): Promise<KeyHandle>;
  listKeys(query?: KeyQuery): Promise<KeyHandle[]>;
  random(length: number): Promise<Buffer>;
  writeData(label: string, value: Buffer): Promise<DataObjectInfo>;
  readData(label: string): Promise<Buffer>;
  deleteData(label: string): Promise<void>;
  listData(): Promise<DataObjectInfo[]>;
  /**
   * Asks the module to hand out the key's secret part by every route it has (attribute read,
   * wrapping under a fresh key) and reports each refusal. Proof for audits and the demo; it
   * never returns key bytes — a route that succeeds is reported as `refused: false` only.
   */
  probeExtraction(key: KeyHandle): Promise<ExtractionAttempt[]>;
  /**
   * Consistency problems a crash or an outside change can leave between the environment's own
   * records and the module (e.g. a TPM key file without metadata, a blob the TPM no longer
   * loads), each with its repair; empty when all is well. Offered by backends that keep records
   * outside the module (`seal doctor` prints them).
   */
  check?(): Promise<string[]>;
  close(): Promise<void>;
}

export interface ExtractionAttempt {
  route: string;
  refused: boolean;
  /** The module's own answer, e.g. CKR_ATTRIBUTE_SENSITIVE. */
  backendCode?: string;
}

export interface OpenOptions extends PinOptions {
  /** Refuse an environment whose protection level is below this. */
  minProtectionLevel?: number;
}

export interface Backend {
  readonly scheme: string;
  open(uri: import('./uri.js').SealUri, options: OpenOptions): Promise<SecureEnvironment>;
}
