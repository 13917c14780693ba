/**
 * Keys on a card: a PIV slot or an IoT SAFE key container, as KeyHandles. Private-key operations
 * run on the card (the host hashes and pads, the card signs, decrypts or agrees); public-key
 * operations (verify, RSA encryption) run on the host with the SPKI. No method returns private
 * key bytes, and the card has no command that would.
 */
import { constants, createHash, createPublicKey, publicEncrypt, verify as nodeVerify } from 'node:crypto';
import { SealError, isSealError } from '../../core/errors.js';
import { defaultHash, type HashName, type KeyAlgorithm, type KeyKind, type KeyUsage } from '../../core/algorithms.js';
import { derToP1363, p1363ToDer, toPem } from '../../core/encoding.js';
import { peerPoint } from '../../core/public-key.js';
import type { DeriveParams, DerivedKeySpec, EncryptOptions, EncryptResult, KeyHandle, KeyProvenance, SignOptions, UnwrapSpec } from '../../core/types.js';
import { emsaPkcs1v15, emsaPss, hashInfo, oaepDecode, type PivApplet, type PivSlotInfo } from './piv.js';
import { IOTSAFE_HASH, IOTSAFE_SIG, type IotSafeApplet, type IotSafeObject } from './iotsafe.js';

const COORD = { 'P-256': 32, 'P-384': 48 } as const;
/** Largest plaintext or ciphertext accepted for the host-side RSA operations. */
const MAX_RSA_INPUT = 64 * 1024;

function checkBuffer(data: unknown, what: string, max = Number.MAX_SAFE_INTEGER): asserts data is Buffer {
  if (!Buffer.isBuffer(data) && !(data instanceof Uint8Array)) throw new SealError('INVALID_ARGUMENT', `${what} must be a Buffer`);
  if (data.length > max) throw new SealError('DATA_TOO_LARGE', `${what} is ${data.length} bytes; at most ${max}`);
}

function checkHash(hash: unknown): HashName {
  if (hash !== 'SHA-256' && hash !== 'SHA-384' && hash !== 'SHA-512') throw new SealError('NOT_SUPPORTED', `hash ${String(hash)} is not supported (SHA-256, SHA-384, SHA-512)`);
  return hash;
}

/** What a card key needs from its environment. */
export interface CardKeyOwner {
  readonly closed: boolean;
  /** The environment's label, for messages. */
  readonly label: string;
}

/** The parts every card key shares: identity, host-side public-key operations, refusals. */
abstract class CardKey implements KeyHandle {
  abstract readonly uri: string;
  abstract readonly label: string;
  abstract readonly id: string;
  abstract readonly kind: KeyKind;
  abstract readonly algorithm: KeyAlgorithm;
  abstract readonly usages: readonly KeyUsage[];
  abstract readonly provenance: KeyProvenance;
  abstract readonly publicKey: Buffer | undefined;
  protected abstract readonly owner: CardKeyOwner;

  publicKeyPem(): string {
    const spki = this.publicKey;
    if (!spki) throw new SealError('NOT_SUPPORTED', `${this.label} has no public key`);
    return toPem(spki);
  }

  toJSON(): Record<string, unknown> {
    return { uri: this.uri, label: this.label, id: this.id, kind: this.kind, algorithm: this.algorithm, usages: this.usages, provenance: this.provenance };
  }

  protected need(usage: KeyUsage, op: string): void {
    if (this.owner.closed) throw new SealError('CLOSED', 'environment is closed');
    if (!this.usages.includes(usage)) throw new SealError('USAGE_NOT_PERMITTED', `key ${this.label} was not created for ${op} (usage '${usage}')`);
    if (this.kind === 'public' && usage !== 'verify' && usage !== 'encrypt') throw new SealError('USAGE_NOT_PERMITTED', `key ${this.label} is a public key`);
  }

  protected spki(): ReturnType<typeof createPublicKey> {
    const spki = this.publicKey;
    if (!spki) throw new SealError('NOT_SUPPORTED', `${this.label} has no public key`);
    return createPublicKey({ key: spki, format: 'der', type: 'spki' });
  }

  abstract sign(data: Buffer, options?: SignOptions): Promise<Buffer>;

  async verify(data: Buffer, signature: Buffer, options: SignOptions = {}): Promise<boolean> {
    this.need('verify', 'verification');
    checkBuffer(data, 'data');
    checkBuffer(signature, 'signature', 64 * 1024);
    const a = this.algorithm;
    const key = this.spki();
    if (a.name === 'ECDSA' || a.name === 'ECDH') {
      const hash = checkHash(options.hash ?? defaultHash(a));
      let sig = signature;
      if (options.format !== 'p1363') {
        try {
          sig = derToP1363(signature, COORD[a.namedCurve]);
        } catch {
          return false;
        }
      }
      return nodeVerify(hashInfo(hash).node, data, { key, dsaEncoding: 'ieee-p1363' }, sig);
    }
    if (a.name === 'RSA') {
      const hash = checkHash(options.hash ?? 'SHA-256');
      if (options.scheme === 'RSA-PSS') {
        return nodeVerify(hashInfo(hash).node, data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: options.saltLength ?? hashInfo(hash).size }, signature);
      }
      return nodeVerify(hashInfo(hash).node, data, { key, padding: constants.RSA_PKCS1_PADDING }, signature);
    }
    throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not verify`);
  }

  async encrypt(data: Buffer, options: EncryptOptions = {}): Promise<EncryptResult> {
    this.need('encrypt', 'encryption');
    checkBuffer(data, 'plaintext', MAX_RSA_INPUT);
    if (this.algorithm.name !== 'RSA') throw new SealError('USAGE_NOT_PERMITTED', `${this.algorithm.name} keys do not encrypt`);
    if ((options.algorithm ?? 'RSA-OAEP') !== 'RSA-OAEP') throw new SealError('NOT_SUPPORTED', 'RSA keys encrypt with RSA-OAEP');
    const hash = options.hash ?? 'SHA-1';
    try {
      return { ciphertext: publicEncrypt({ key: this.spki(), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: hashInfo(hash).node }, data) };
    } catch (e) {
      if (isSealError(e)) throw e;
      throw new SealError('DATA_TOO_LARGE', `plaintext of ${data.length} bytes is too long for RSA-OAEP with this key`, { cause: e });
    }
  }

  async decrypt(_data: Buffer, _options?: EncryptOptions): Promise<Buffer> {
    this.need('decrypt', 'decryption');
    throw new SealError('NOT_SUPPORTED', `${this.owner.label} does not decrypt with ${this.algorithm.name} keys`);
  }

  async agree(_peer: Buffer | string, _target: DerivedKeySpec): Promise<KeyHandle> {
    this.need('deriveKey', 'key agreement');
    throw new SealError('NOT_SUPPORTED', `${this.owner.label} returns the ECDH shared secret to the host and cannot keep it inside: use sharedSecret(peer, 'secret-leaves-module')`);
  }

  abstract sharedSecret(peerPublicKey: Buffer | string, acknowledge: 'secret-leaves-module'): Promise<Buffer>;

  protected checkAcknowledge(acknowledge: unknown): void {
    if (acknowledge !== 'secret-leaves-module') throw new SealError('INVALID_ARGUMENT', "sharedSecret needs the acknowledgement 'secret-leaves-module'");
  }

  async deriveKey(_params: DeriveParams, _target: DerivedKeySpec): Promise<KeyHandle> {
    this.need('deriveKey', 'key derivation');
    throw new SealError('NOT_SUPPORTED', `${this.owner.label} derives no keys inside`);
  }

  async mac(_data: Buffer): Promise<Buffer> {
    throw new SealError('USAGE_NOT_PERMITTED', 'mac needs an HMAC key; cards here hold none');
  }

  async wrapKey(_key: KeyHandle, _algorithm: 'AES-KW' | 'AES-KWP' | 'RSA-OAEP'): Promise<Buffer> {
    this.need('wrapKey', 'wrapping');
    throw new SealError('NOT_SUPPORTED', `${this.owner.label} wraps no keys`);
  }

  async unwrapKey(_wrapped: Buffer, _spec: UnwrapSpec): Promise<KeyHandle> {
    this.need('unwrapKey', 'unwrapping');
    throw new SealError('NOT_SUPPORTED', `${this.owner.label} imports no wrapped keys`);
  }

  abstract destroy(): Promise<void>;
}

// ---- PIV ---------------------------------------------------------------------------------------------

export interface PivKeyOwner extends CardKeyOwner {
  readonly applet: PivApplet;
  keyUri(slotHex: string): string;
}

/**
 * A key in a PIV slot. The card enforces no usage per key (any EC key signs and agrees, any RSA
 * key signs and decrypts); `usages` is what the caller asked for at generation, or for a key found
 * on the card everything the card would do with it.
 */
export class PivKey extends CardKey {
  readonly #owner: PivKeyOwner;
  readonly #info: PivSlotInfo;
  readonly algorithm: KeyAlgorithm;
  readonly usages: readonly KeyUsage[];

  constructor(owner: PivKeyOwner, info: PivSlotInfo, algorithm: KeyAlgorithm, usages: readonly KeyUsage[]) {
    super();
    this.#owner = owner;
    this.#info = info;
    this.algorithm = algorithm;
    this.usages = Object.freeze([...usages]);
  }

  /** The algorithm and usages of a key found on the card, by the slot's SP 800-73-4 role. */
  static described(owner: PivKeyOwner, info: PivSlotInfo): PivKey {
    const t = info.keyType;
    if (t.kind === 'rsa') return new PivKey(owner, info, { name: 'RSA', modulusLength: 2048 }, ['sign', 'verify', 'encrypt', 'decrypt']);
    // key management slots (9D, retired 82–95) hold agreement keys by convention; all can sign
    const agreement = info.slot.ref === 0x9d || (info.slot.ref >= 0x82 && info.slot.ref <= 0x95);
    return new PivKey(owner, info, { name: agreement ? 'ECDH' : 'ECDSA', namedCurve: t.curve! }, ['sign', 'verify', 'deriveKey']);
  }

  protected get owner(): CardKeyOwner {
    return this.#owner;
  }
  get uri(): string {
    return this.#owner.keyUri(this.#info.slot.hex);
  }
  get label(): string {
    return this.#info.slot.hex;
  }
  get id(): string {
    return this.#info.slot.hex;
  }
  get kind(): KeyKind {
    return 'private';
  }
  get slot(): PivSlotInfo['slot'] {
    return this.#info.slot;
  }
  /** PIN policy the card applies to this key. */
  get pinPolicy(): PivSlotInfo['pinPolicy'] {
    return this.#info.pinPolicy;
  }
  get provenance(): KeyProvenance {
    const generated = this.#info.origin === 'generated';
    // PIV defines no command that reads a private key out: every key is sensitive for good
    return {
      origin: generated ? 'generated-inside' : this.#info.origin === 'imported' ? 'imported' : 'unknown',
      sensitive: true,
      extractable: false,
      ...(generated ? { alwaysSensitive: true, neverExtractable: true, local: true } : {}),
    };
  }
  get publicKey(): Buffer {
    return Buffer.from(this.#info.publicKey);
  }

  async sign(data: Buffer, options: SignOptions = {}): Promise<Buffer> {
    this.need('sign', 'signing');
    checkBuffer(data, 'data');
    const t = this.#info.keyType;
    if (t.kind === 'ec') {
      const a = this.algorithm as { namedCurve: 'P-256' | 'P-384' };
      const hash = checkHash(options.hash ?? defaultHash({ name: 'ECDSA', namedCurve: a.namedCurve }));
      let digest = createHash(hashInfo(hash).node).update(data).digest();
      // FIPS 186-4 6.4: the leftmost field-length bytes; a shorter digest keeps its value with zeros in front
      digest = digest.length > t.size ? digest.subarray(0, t.size) : Buffer.concat([Buffer.alloc(t.size - digest.length), digest]);
      const der = await this.#owner.applet.authenticate(this.#info, 0x81, digest, 'ECDSA signature');
      let raw: Buffer;
      try {
        raw = derToP1363(der, t.size);
      } catch (e) {
        throw new SealError('DEVICE_ERROR', 'the card returned a malformed ECDSA signature', { cause: e });
      }
      return options.format === 'p1363' ? raw : p1363ToDer(raw);
    }
    const hash = checkHash(options.hash ?? 'SHA-256');
    const digest = createHash(hashInfo(hash).node).update(data).digest();
    const block =
      options.scheme === 'RSA-PSS'
        ? emsaPss(hash, digest, t.size * 8, options.saltLength ?? hashInfo(hash).size)
        : options.scheme === undefined || options.scheme === 'RSASSA-PKCS1-v1_5'
          ? emsaPkcs1v15(hash, digest, t.size)
          : (() => {
              throw new SealError('NOT_SUPPORTED', `RSA signature scheme ${String(options.scheme)} is not supported`);
            })();
    const sig = await this.#owner.applet.authenticate(this.#info, 0x81, block, `RSA ${options.scheme ?? 'RSASSA-PKCS1-v1_5'} signature`);
    if (sig.length > t.size) throw new SealError('DEVICE_ERROR', 'the card returned an RSA result longer than the modulus');
    return sig.length < t.size ? Buffer.concat([Buffer.alloc(t.size - sig.length), sig]) : sig;
  }

  override async decrypt(data: Buffer, options: EncryptOptions = {}): Promise<Buffer> {
    this.need('decrypt', 'decryption');
    checkBuffer(data, 'ciphertext', MAX_RSA_INPUT);
    const t = this.#info.keyType;
    if (t.kind !== 'rsa') throw new SealError('USAGE_NOT_PERMITTED', `${this.algorithm.name} keys do not decrypt`);
    if ((options.algorithm ?? 'RSA-OAEP') !== 'RSA-OAEP') throw new SealError('NOT_SUPPORTED', 'RSA keys decrypt RSA-OAEP');
    const hash = options.hash ?? 'SHA-1';
    hashInfo(hash);
    // one fixed answer for every refusal: no oracle on why the ciphertext was refused
    if (data.length !== t.size) throw new SealError('DECRYPTION_FAILED', 'decryption failed');
    let em: Buffer;
    try {
      em = await this.#owner.applet.authenticate(this.#info, 0x81, data, 'RSA decryption');
    } catch (e) {
      if (isSealError(e) && (e.code === 'INVALID_ARGUMENT' || e.backendCode === 'SW_6A80')) {
        throw new SealError('DECRYPTION_FAILED', 'decryption failed', { backendCode: e.backendCode, backendStatus: e.backendStatus });
      }
      throw e;
    }
    const block = em.length < t.size ? Buffer.concat([Buffer.alloc(t.size - em.length), em]) : em;
    try {
      return oaepDecode(hash, block);
    } finally {
      block.fill(0);
      em.fill(0);
    }
  }

  async sharedSecret(peerPublicKey: Buffer | string, acknowledge: 'secret-leaves-module'): Promise<Buffer> {
    this.checkAcknowledge(acknowledge);
    this.need('deriveKey', 'key agreement');
    const t = this.#info.keyType;
    if (t.kind !== 'ec') throw new SealError('USAGE_NOT_PERMITTED', 'only EC keys agree');
    const point = peerPoint(peerPublicKey, t.curve!);
    const z = await this.#owner.applet.authenticate(this.#info, 0x85, point, 'ECDH');
    if (z.length !== t.size) throw new SealError('DEVICE_ERROR', `the card returned a ${z.length}-byte shared secret for ${t.curve}`);
    return z;
  }

  /** The slot's X.509 certificate (DER), undefined when the slot has none. */
  certificate(): Promise<Buffer | undefined> {
    return this.#owner.applet.readCertificate(this.#info.slot);
  }

  /** YubiKey attestation certificate (DER) proving the key was generated on the card. */
  attest(): Promise<Buffer> {
    return this.#owner.applet.attest(this.#info.slot);
  }

  async destroy(): Promise<void> {
    throw new SealError('NOT_SUPPORTED', 'PIV has no command to delete a key: generate a new one into the slot (replace: true) to overwrite it');
  }
}

// ---- GSMA IoT SAFE -----------------------------------------------------------------------------------

export interface IotSafeKeyOwner extends CardKeyOwner {
  readonly applet: IotSafeApplet;
  keyUri(object: IotSafeObject): string;
  /** The public-key container that receives a peer's key before COMPUTE DH. */
  peerContainer(): IotSafeObject;
}

/** A key container of the IoT SAFE applet: a private key (with its public half) or a public key. */
export class IotSafeKey extends CardKey {
  readonly #owner: IotSafeKeyOwner;
  readonly #object: IotSafeObject;
  readonly #point: Buffer;
  readonly #spki: Buffer;
  readonly algorithm: KeyAlgorithm;
  readonly usages: readonly KeyUsage[];
  readonly #generatedNow: boolean;

  constructor(owner: IotSafeKeyOwner, object: IotSafeObject, point: Buffer, spki: Buffer, algorithm: KeyAlgorithm, usages: readonly KeyUsage[], generatedNow = false) {
    super();
    this.#owner = owner;
    this.#object = object;
    this.#point = point;
    this.#spki = spki;
    this.algorithm = algorithm;
    this.usages = Object.freeze([...usages]);
    this.#generatedNow = generatedNow;
  }

  protected get owner(): CardKeyOwner {
    return this.#owner;
  }
  get uri(): string {
    return this.#owner.keyUri(this.#object);
  }
  get label(): string {
    return this.#object.label;
  }
  get id(): string {
    return this.#object.id.toString('hex');
  }
  get kind(): KeyKind {
    return this.#object.kind === 'public' ? 'public' : 'private';
  }
  get object(): Readonly<IotSafeObject> {
    return this.#object;
  }
  get provenance(): KeyProvenance {
    if (this.kind === 'public') return { origin: 'unknown' };
    // IoT SAFE has no command that reads a private key: keys are sensitive for good. Whether a
    // key found in a container was generated on the SIM or provisioned at manufacture is unknown.
    return this.#generatedNow
      ? { origin: 'generated-inside', sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: true, local: true }
      : { origin: 'unknown', sensitive: true, extractable: false };
  }
  get publicKey(): Buffer {
    return Buffer.from(this.#spki);
  }
  /** The uncompressed EC point of the key. */
  get point(): Buffer {
    return Buffer.from(this.#point);
  }

  async sign(data: Buffer, options: SignOptions = {}): Promise<Buffer> {
    this.need('sign', 'signing');
    checkBuffer(data, 'data');
    const a = this.algorithm;
    if (a.name !== 'ECDSA' || a.namedCurve !== 'P-256') throw new SealError('USAGE_NOT_PERMITTED', `${a.name} keys do not sign`);
    const hash = checkHash(options.hash ?? 'SHA-256');
    const hashes = this.#object.hashes;
    if (hashes !== undefined && (hashes & IOTSAFE_HASH[hash]) === 0) throw new SealError('NOT_SUPPORTED', `key ${this.label} does not sign ${hash} hashes`);
    const digest = createHash(hashInfo(hash).node).update(data).digest();
    const raw = await this.#owner.applet.sign(this.#object.id, IOTSAFE_HASH[hash], IOTSAFE_SIG.ECDSA, digest, 32);
    return options.format === 'p1363' ? raw : p1363ToDer(raw);
  }

  async sharedSecret(peerPublicKey: Buffer | string, acknowledge: 'secret-leaves-module'): Promise<Buffer> {
    this.checkAcknowledge(acknowledge);
    this.need('deriveKey', 'key agreement');
    const a = this.algorithm;
    if ((a.name !== 'ECDH' && a.name !== 'ECDSA') || a.namedCurve !== 'P-256') throw new SealError('USAGE_NOT_PERMITTED', 'only P-256 keys agree');
    const point = peerPoint(peerPublicKey, 'P-256');
    const peer = this.#owner.peerContainer();
    const z = await this.#owner.applet.computeDh(this.#object.id, peer.id, point);
    if (z.length !== 32) throw new SealError('DEVICE_ERROR', `COMPUTE DH returned ${z.length} bytes, not the 32-byte x-coordinate`);
    return z;
  }

  async destroy(): Promise<void> {
    throw new SealError('NOT_SUPPORTED', 'IoT SAFE key containers cannot be deleted from the host');
  }
}
