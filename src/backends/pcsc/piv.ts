/**
 * The PIV card application (NIST SP 800-73-4 part 2) over an ApduTransport, with the YubiKey
 * extensions that other tools rely on (version FD, serial F8, metadata F7, attestation F9).
 *
 * - Every operation runs inside `transport.exclusive`: the PIN VERIFY, the management-key
 *   authentication and the command that needs them are never separated by another client.
 * - The applet is selected again whenever the transport reconnected (a new `generation`), and
 *   once when a command answers `6D00` (another application selected something else meanwhile).
 *   A selection clears the card's security status, and so the cached "PIN verified".
 * - The PIN is verified only when an operation needs it (the key's PIN policy), at most once per
 *   card session for "once" keys and right before the operation for "always" keys. A VERIFY the
 *   card refuses is never repeated: the environment remembers the refusal and stops sending it.
 * - Private-key operations take what the host prepared: the digest (ECDSA), the padded block
 *   (RSA: PKCS#1 v1.5 or PSS encoding, RFC 8017, built here on the host), the peer point (ECDH).
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, timingSafeEqual, X509Certificate } from 'node:crypto';
import { gunzipSync } from 'node:zlib';
import { SealError, isSealError } from '../../core/errors.js';
import type { HashName, KeyAlgorithm, NamedCurve } from '../../core/algorithms.js';
import { spkiFromAttributes } from '../../core/public-key.js';
import { SHORT_MAX_DATA, commandApdu, expectOk, statusError, swHex, transmitChained } from './apdu.js';
import { berTlv, encodeBerTlv, findTag, parseBerTlv, requireTag } from './tlv.js';
import type { ApduTransport, CardChannel, ResponseApdu } from './transport.js';

/** PIV application identifier (SP 800-73-4 part 1, 2.2): the RID and PIX prefix that selects. */
export const PIV_AID = Buffer.from('A000000308', 'hex');

/** What the PIV and IoT SAFE drivers need from a transport beyond the contract. */
export type GenerationalTransport = ApduTransport & {
  /** Incremented at each (re)connection: the applet has to be selected again. */
  readonly generation: number;
  /** One extended-length APDU instead of a command chain. */
  readonly extendedLength?: boolean;
};

// ---- slots, algorithms, policies ------------------------------------------------------------------

export type PinPolicy = 'never' | 'once' | 'always';

export interface PivSlot {
  /** Key reference (SP 800-73-4 part 1 table 4b). */
  ref: number;
  /** Lower-case hex of the reference: the key's label, id and `slot=` in URIs. */
  hex: string;
  name: string;
  /** Data object of the slot's X.509 certificate (part 1 table 3). */
  certTag: number;
  /** The PIN policy SP 800-73-4 gives the slot, used when the card does not report one. */
  defaultPinPolicy: PinPolicy;
}

function slot(ref: number, name: string, certTag: number, defaultPinPolicy: PinPolicy): PivSlot {
  return { ref, hex: ref.toString(16).padStart(2, '0'), name, certTag, defaultPinPolicy };
}

/** The slots that hold keys the host may generate: 9A 9C 9D 9E and the 20 retired key-management slots 82–95. */
export const PIV_SLOTS: readonly PivSlot[] = [
  slot(0x9a, 'authentication', 0x5fc105, 'once'),
  slot(0x9c, 'signature', 0x5fc10a, 'always'),
  slot(0x9d, 'key-management', 0x5fc10b, 'once'),
  slot(0x9e, 'card-authentication', 0x5fc101, 'never'),
  ...Array.from({ length: 20 }, (_, i) => slot(0x82 + i, `retired-${i + 1}`, 0x5fc10d + i, 'once')),
];

/**
 * The slot a label or URI attribute names: its hex reference (`9a`, `0x9A`), `slot-9a`, or the
 * SP 800-73-4 name (`authentication`, `signature`, `key-management`, `card-authentication`,
 * `retired-1` … `retired-20`).
 */
export function parseSlot(text: string): PivSlot | undefined {
  const t = text.trim().toLowerCase().replace(/^slot[-_ ]?/, '').replace(/^0x/, '');
  const aliases: Record<string, string> = { 'piv-authentication': 'authentication', 'digital-signature': 'signature' };
  const name = aliases[t] ?? t;
  return PIV_SLOTS.find((s) => s.hex === name || s.name === name);
}

export interface PivKeyType {
  /** Algorithm identifier (SP 800-78-4 table 6-2). */
  id: number;
  label: string;
  kind: 'ec' | 'rsa';
  curve?: NamedCurve;
  /** Field length (EC) or modulus length (RSA) in bytes. */
  size: number;
}

export const PIV_KEY_TYPES: readonly PivKeyType[] = [
  { id: 0x07, label: 'RSA-2048', kind: 'rsa', size: 256 },
  { id: 0x11, label: 'EC P-256', kind: 'ec', curve: 'P-256', size: 32 },
  { id: 0x14, label: 'EC P-384', kind: 'ec', curve: 'P-384', size: 48 },
];

export function pivKeyTypeFor(a: KeyAlgorithm): PivKeyType | undefined {
  if (a.name === 'ECDSA' || a.name === 'ECDH') return PIV_KEY_TYPES.find((t) => t.curve === a.namedCurve);
  if (a.name === 'RSA' && a.modulusLength === 2048) return PIV_KEY_TYPES[0];
  return undefined;
}

/** Management-key algorithms (SP 800-78-4 table 6-1; YubiKey 5.7 defaults to AES-192). */
export type MgmtAlgName = '3des' | 'aes128' | 'aes192' | 'aes256';
export const MGMT_ALGORITHMS: Record<MgmtAlgName, { id: number; keyLength: number; block: number; cipher: string }> = {
  '3des': { id: 0x03, keyLength: 24, block: 8, cipher: 'des-ede3-ecb' },
  aes128: { id: 0x08, keyLength: 16, block: 16, cipher: 'aes-128-ecb' },
  aes192: { id: 0x0a, keyLength: 24, block: 16, cipher: 'aes-192-ecb' },
  aes256: { id: 0x0c, keyLength: 32, block: 16, cipher: 'aes-256-ecb' },
};

export function isMgmtAlgName(s: string): s is MgmtAlgName {
  return Object.prototype.hasOwnProperty.call(MGMT_ALGORITHMS, s);
}

const MGMT_KEY_REF = 0x9b;
const PIN_REF = 0x80;
const INS = { VERIFY: 0x20, GENERATE: 0x47, AUTHENTICATE: 0x87, GET_DATA: 0xcb, PUT_DATA: 0xdb, METADATA: 0xf7, SERIAL: 0xf8, ATTEST: 0xf9, VERSION: 0xfd } as const;
/** CHUID (part 1 table 9) for the card's GUID when there is no YubiKey serial. */
const CHUID_TAG = 0x5fc102;
/** Answers that mean "this card has no such instruction" for the YubiKey extensions. */
const NOT_IMPLEMENTED = new Set([0x6d00, 0x6e00, 0x6a81, 0x6b00, 0x6a86]);
/** Answers that mean "empty": no key in the slot, no such data object. */
const ABSENT = new Set([0x6a82, 0x6a88]);
/** Upper bound of a decompressed certificate (YubiKey objects hold at most ~3 KB compressed). */
const MAX_CERT = 64 * 1024;

// ---- what the applet tells about a slot ------------------------------------------------------------

export interface PivSlotInfo {
  slot: PivSlot;
  keyType: PivKeyType;
  /** SubjectPublicKeyInfo DER. */
  publicKey: Buffer;
  pinPolicy: PinPolicy;
  origin: 'generated' | 'imported' | 'unknown';
  /** Where the facts came from: YubiKey metadata (F7) or the slot's certificate. */
  source: 'metadata' | 'certificate' | 'generate';
}

function pinPolicyOf(byte: number | undefined, s: PivSlot): PinPolicy {
  // YubiKey: 0 default, 1 never, 2 once, 3 always, 4/5 biometric match (treated as always)
  if (byte === 1) return 'never';
  if (byte === 2) return 'once';
  if (byte !== undefined && byte >= 3 && byte <= 5) return 'always';
  return s.defaultPinPolicy;
}

/** The public key inside `7F49` (generate) or metadata tag 04: `86` EC point, or `81` modulus + `82` exponent. */
export function spkiFromPivPublicKey(keyType: PivKeyType, encoded: Buffer): Buffer {
  const t = parseBerTlv(encoded);
  if (keyType.kind === 'ec') {
    const point = requireTag(t, 0x86, 'the EC point');
    if (point.length !== 1 + 2 * keyType.size || point[0] !== 0x04) throw new SealError('DEVICE_ERROR', `the card returned a malformed ${keyType.label} point`);
    return spkiFromAttributes({ name: 'ECDSA', namedCurve: keyType.curve! }, { ecPoint: point });
  }
  const modulus = requireTag(t, 0x81, 'the RSA modulus');
  const exponent = requireTag(t, 0x82, 'the RSA public exponent');
  return spkiFromAttributes({ name: 'RSA', modulusLength: 2048 }, { modulus, exponent });
}

/** Key type and SPKI of a certificate's public key, when it is one PIV keys can have. */
function certificateKey(der: Buffer): { keyType: PivKeyType; spki: Buffer } | undefined {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(der);
  } catch {
    return undefined;
  }
  const pub = cert.publicKey;
  const d = pub.asymmetricKeyDetails ?? {};
  let keyType: PivKeyType | undefined;
  if (pub.asymmetricKeyType === 'ec') keyType = PIV_KEY_TYPES.find((t) => t.curve === ({ prime256v1: 'P-256', secp384r1: 'P-384' } as Record<string, string>)[d.namedCurve ?? '']);
  else if (pub.asymmetricKeyType === 'rsa' && d.modulusLength === 2048) keyType = PIV_KEY_TYPES[0];
  return keyType ? { keyType, spki: pub.export({ type: 'spki', format: 'der' }) } : undefined;
}

function tagBytes(tag: number): Buffer {
  return Buffer.from([tag >> 16, (tag >> 8) & 0xff, tag & 0xff]);
}

/** Where the driver gets the secrets an operation needs; both are asked for only when needed. */
export interface PivCredentials {
  /** The PIN as bytes; the driver wipes the buffer after the VERIFY. */
  pin(): Promise<Buffer>;
  /** The management key; the driver wipes the buffer after use. */
  managementKey(): Buffer;
  /** The management-key algorithm when configured (`mgmt-key-alg=`); else the card is asked. */
  readonly managementAlgorithm: MgmtAlgName | undefined;
}

export interface PivIdentity {
  /** YubiKey firmware version (GET VERSION), when the card answers it. */
  version?: string;
  /** YubiKey serial number (GET SERIAL), when the card answers it. */
  serial?: string;
  /** GUID of the CHUID, hex. */
  guid?: string;
}

export interface PivProbeAttempt {
  route: string;
  sw: number;
}

// ---- the applet ----------------------------------------------------------------------------------

export class PivApplet {
  readonly transport: GenerationalTransport;
  readonly #credentials: PivCredentials;
  #channel: CardChannel | undefined;
  #selectedGeneration = -1;
  #pinVerifiedGeneration = -1;
  /** A VERIFY the card refused: the same PIN is never sent again by this applet object. */
  #pinRefusal: SealError | undefined;
  #metadata: boolean | undefined;
  #mgmtAlgFromCard: MgmtAlgName | null | undefined;
  #closed = false;
  /** What this applet object sent, for tests and diagnostics: SELECTs of the application and PIN VERIFYs. */
  readonly stats = { selects: 0, pinVerifies: 0 };

  constructor(transport: GenerationalTransport, credentials: PivCredentials) {
    this.transport = transport;
    this.#credentials = credentials;
  }

  /** Runs `fn` with the card to ourselves and the PIV application selected. */
  #op<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new SealError('CLOSED', 'the PIV environment is closed'));
    return this.transport.exclusive(async () => {
      if (!this.#channel || this.#selectedGeneration !== this.transport.generation) await this.#select();
      try {
        return await fn();
      } catch (e) {
        // the card went away or was reset: select again (and so verify again) next time
        if (isSealError(e) && (e.code === 'DEVICE_UNAVAILABLE' || e.code === 'SESSION_LOST')) this.#channel = undefined;
        throw e;
      }
    });
  }

  async #select(): Promise<void> {
    this.#channel = undefined;
    this.#pinVerifiedGeneration = -1;
    this.stats.selects += 1;
    const { channel } = await this.transport.select(PIV_AID, { logical: false });
    this.#channel = channel;
    this.#selectedGeneration = this.transport.generation;
  }

  /**
   * One PIV command (`CLA 00`): a chain of short APDUs or one extended APDU when the data is
   * long. `6D00` once means another application took the card's selection: select PIV again and
   * resend (the card did not run the command, so nothing is repeated that took effect).
   */
  async #command(ins: number, p1: number, p2: number, data: Buffer | undefined, le: number | undefined, reselect = true): Promise<ResponseApdu> {
    const channel = this.#channel;
    if (!channel) throw new SealError('INTERNAL', 'PIV command outside an operation');
    let r: ResponseApdu;
    if (data && data.length > SHORT_MAX_DATA) {
      const extended = this.transport.extendedLength === true;
      r = await transmitChained({ transmit: (a) => channel.transmit(a), extendedLength: extended }, 0x00, ins, p1, p2, data, le === undefined ? undefined : extended ? 0x10000 : le);
    } else {
      r = await channel.transmit(commandApdu(0x00, ins, p1, p2, data, le));
    }
    if (r.sw === 0x6d00 && reselect) {
      await this.#select();
      return this.#command(ins, p1, p2, data, le, false);
    }
    return r;
  }

  // ---- PIN ---------------------------------------------------------------------------------------

  async #verifyPin(): Promise<void> {
    const refused = this.#pinRefusal;
    if (refused) {
      throw new SealError(refused.code, `${refused.message}; the same PIN is not tried again: open the environment again with the right PIN`, {
        ...(refused.backendCode !== undefined ? { backendCode: refused.backendCode } : {}),
        ...(refused.backendStatus !== undefined ? { backendStatus: refused.backendStatus } : {}),
        ...(refused.triesLeft !== undefined ? { triesLeft: refused.triesLeft } : {}),
      });
    }
    const pin = await this.#credentials.pin();
    const block = Buffer.alloc(8, 0xff);
    try {
      if (pin.length === 0 || pin.length > 8) throw new SealError('INVALID_ARGUMENT', 'a PIV PIN has 6 to 8 characters');
      pin.copy(block);
      this.stats.pinVerifies += 1;
      const r = await this.#command(INS.VERIFY, 0x00, PIN_REF, block, undefined);
      if (r.sw === 0x9000) {
        this.#pinVerifiedGeneration = this.transport.generation;
        return;
      }
      const e = statusError(r.sw, 'PIN verification');
      if (e.code === 'PIN_INCORRECT' || e.code === 'PIN_LOCKED') this.#pinRefusal = e;
      throw e;
    } finally {
      block.fill(0);
      pin.fill(0);
    }
  }

  /**
   * Sends a command that may need the PIN: VERIFY first when the key's policy asks for it and
   * this card session has no verified PIN (always for "always" keys). When the card still
   * answers `6982` although no VERIFY was sent now (the security status was lost to a reset or
   * another application's SELECT, or the policy was not known), VERIFY once and resend once.
   */
  async #withPin(policy: PinPolicy, send: () => Promise<ResponseApdu>, what: string): Promise<Buffer> {
    let fresh = false;
    if (policy === 'always' || (policy === 'once' && this.#pinVerifiedGeneration !== this.transport.generation)) {
      await this.#verifyPin();
      fresh = true;
    }
    let r = await send();
    if (r.sw === 0x6982 && !fresh) {
      this.#pinVerifiedGeneration = -1;
      await this.#verifyPin();
      r = await send();
    }
    return expectOk(r, what);
  }

  // ---- management key ------------------------------------------------------------------------------

  async #mgmtAlgorithm(configured: MgmtAlgName | undefined): Promise<MgmtAlgName> {
    if (configured) return configured;
    if (this.#mgmtAlgFromCard === undefined) {
      this.#mgmtAlgFromCard = null;
      const m = await this.#metadataRaw(MGMT_KEY_REF);
      const id = m ? findTag(parseBerTlv(m), 0x01)?.[0] : undefined;
      const name = (Object.keys(MGMT_ALGORITHMS) as MgmtAlgName[]).find((n) => MGMT_ALGORITHMS[n].id === id);
      if (name) this.#mgmtAlgFromCard = name;
    }
    return this.#mgmtAlgFromCard ?? '3des';
  }

  /**
   * Mutual authentication with the management key (SP 800-73-4 part 2, appendix A.1 "card
   * management key"): the card's encrypted witness is decrypted and returned with our challenge;
   * the card must return our challenge encrypted, which proves it holds the same key.
   */
  async #authenticateManagement(): Promise<void> {
    const key = this.#credentials.managementKey();
    try {
      const name = await this.#mgmtAlgorithm(this.#credentials.managementAlgorithm);
      const alg = MGMT_ALGORITHMS[name];
      if (key.length !== alg.keyLength) {
        throw new SealError('SECRET_SOURCE', `the management key has ${key.length} bytes; ${name} needs ${alg.keyLength} (set mgmt-key-alg= to the card's algorithm)`);
      }
      const block = (input: Buffer, encrypt: boolean): Buffer => {
        const c = encrypt ? createCipheriv(alg.cipher, key, null) : createDecipheriv(alg.cipher, key, null);
        c.setAutoPadding(false);
        return Buffer.concat([c.update(input), c.final()]);
      };
      const what = 'management key authentication';
      const r1 = await this.#command(INS.AUTHENTICATE, alg.id, MGMT_KEY_REF, berTlv(0x7c, encodeBerTlv(0x80, Buffer.alloc(0))), 256);
      if (r1.sw === 0x6a86 || r1.sw === 0x6a80) {
        throw new SealError('INVALID_ARGUMENT', `${what}: the card does not use ${name} for its management key (SW ${swHex(r1.sw)}); set mgmt-key-alg=`, { backendCode: `SW_${swHex(r1.sw)}`, backendStatus: r1.sw });
      }
      const witnessEnc = requireTag(parseBerTlv(requireTag(parseBerTlv(expectOk(r1, what)), 0x7c, 'the authentication template')), 0x80, 'the witness');
      if (witnessEnc.length !== alg.block) throw new SealError('DEVICE_ERROR', `${what}: the card's witness has ${witnessEnc.length} bytes, not ${alg.block}`);
      const witness = block(witnessEnc, false);
      const challenge = randomBytes(alg.block);
      const r2 = await this.#command(INS.AUTHENTICATE, alg.id, MGMT_KEY_REF, berTlv(0x7c, encodeBerTlv(0x80, witness), encodeBerTlv(0x81, challenge)), 256);
      witness.fill(0);
      if (r2.sw === 0x6982) {
        throw new SealError('NOT_LOGGED_IN', `${what}: the card refused the management key (SW 6982)`, { backendCode: 'SW_6982', backendStatus: 0x6982 });
      }
      const answer = requireTag(parseBerTlv(requireTag(parseBerTlv(expectOk(r2, what)), 0x7c, 'the authentication template')), 0x82, 'the encrypted challenge');
      const expected = block(challenge, true);
      if (answer.length !== expected.length || !timingSafeEqual(answer, expected)) {
        throw new SealError('DEVICE_ERROR', `${what}: the card did not prove that it holds the management key`);
      }
    } finally {
      key.fill(0);
    }
  }

  // ---- YubiKey extensions --------------------------------------------------------------------------

  /** GET METADATA (YubiKey 5.3+): the raw TLVs, undefined when the slot is empty or the card has no F7. */
  async #metadataRaw(ref: number): Promise<Buffer | undefined> {
    if (this.#metadata === false) return undefined;
    const r = await this.#command(INS.METADATA, 0x00, ref, undefined, 256);
    if (r.sw === 0x9000) {
      this.#metadata = true;
      return r.data;
    }
    if (ABSENT.has(r.sw)) {
      this.#metadata = true;
      return undefined;
    }
    if (NOT_IMPLEMENTED.has(r.sw)) {
      this.#metadata = false;
      return undefined;
    }
    throw statusError(r.sw, `GET METADATA of ${ref.toString(16)}`);
  }

  async #slotInfo(s: PivSlot): Promise<PivSlotInfo | undefined> {
    const meta = await this.#metadataRaw(s.ref);
    if (meta) {
      const t = parseBerTlv(meta);
      const algId = requireTag(t, 0x01, 'the key algorithm')[0];
      const keyType = PIV_KEY_TYPES.find((k) => k.id === algId);
      if (!keyType) return undefined; // a key type seal-bridge does not use (RSA-1024, Ed25519, …)
      const policy = findTag(t, 0x02);
      const origin = findTag(t, 0x03)?.[0];
      const pub = requireTag(t, 0x04, 'the public key');
      return {
        slot: s,
        keyType,
        publicKey: spkiFromPivPublicKey(keyType, pub),
        pinPolicy: pinPolicyOf(policy?.[0], s),
        origin: origin === 1 ? 'generated' : origin === 2 ? 'imported' : 'unknown',
        source: 'metadata',
      };
    }
    if (this.#metadata === true) return undefined;
    // a plain PIV card: a key is known through its certificate only (as OpenSC sees it)
    const cert = await this.#readCertificate(s);
    const key = cert ? certificateKey(cert) : undefined;
    if (!key) return undefined;
    return { slot: s, keyType: key.keyType, publicKey: key.spki, pinPolicy: s.defaultPinPolicy, origin: 'unknown', source: 'certificate' };
  }

  identity(): Promise<PivIdentity> {
    return this.#op(async () => {
      const out: PivIdentity = {};
      const v = await this.#command(INS.VERSION, 0x00, 0x00, undefined, 256);
      if (v.sw === 0x9000 && v.data.length >= 3) out.version = `${v.data[0]}.${v.data[1]}.${v.data[2]}`;
      if (out.version) {
        const s = await this.#command(INS.SERIAL, 0x00, 0x00, undefined, 256);
        if (s.sw === 0x9000 && s.data.length === 4) out.serial = String(s.data.readUInt32BE(0));
      }
      const chuid = await this.#getData(CHUID_TAG);
      const guid = chuid ? findTag(parseBerTlv(chuid), 0x34) : undefined;
      if (guid && guid.length > 0) out.guid = guid.toString('hex');
      return out;
    });
  }

  slotInfo(s: PivSlot): Promise<PivSlotInfo | undefined> {
    return this.#op(() => this.#slotInfo(s));
  }

  listSlots(): Promise<PivSlotInfo[]> {
    return this.#op(async () => {
      const out: PivSlotInfo[] = [];
      for (const s of PIV_SLOTS) {
        const info = await this.#slotInfo(s);
        if (info) out.push(info);
      }
      return out;
    });
  }

  /** Attestation certificate (YubiKey ATTEST, DER) for a key generated on the card. */
  attest(s: PivSlot): Promise<Buffer> {
    return this.#op(async () => {
      const r = await this.#command(INS.ATTEST, s.ref, 0x00, undefined, 256);
      if (NOT_IMPLEMENTED.has(r.sw) && r.sw !== 0x6a86) throw new SealError('NOT_SUPPORTED', 'this card has no attestation (YubiKey ATTEST, INS F9)', { backendCode: `SW_${swHex(r.sw)}`, backendStatus: r.sw });
      if (ABSENT.has(r.sw)) throw new SealError('KEY_NOT_FOUND', `slot ${s.hex} holds no key`, { backendCode: `SW_${swHex(r.sw)}`, backendStatus: r.sw });
      return Buffer.from(expectOk(r, `attestation of slot ${s.hex}`));
    });
  }

  // ---- keys ----------------------------------------------------------------------------------------

  /** GENERATE ASYMMETRIC KEY PAIR (part 2 3.3.2) in `s` after management-key authentication. */
  generate(s: PivSlot, keyType: PivKeyType, options: { replace: boolean }): Promise<PivSlotInfo> {
    return this.#op(async () => {
      if (!options.replace) {
        const existing = await this.#slotInfo(s);
        if (existing) throw new SealError('KEY_EXISTS', `PIV slot ${s.hex} (${s.name}) already holds a ${existing.keyType.label} key; generating would destroy it (pass replace: true)`);
      }
      await this.#authenticateManagement();
      const r = await this.#command(INS.GENERATE, 0x00, s.ref, berTlv(0xac, encodeBerTlv(0x80, Buffer.from([keyType.id]))), 256);
      const data = expectOk(r, `key generation in slot ${s.hex}`);
      const template = requireTag(parseBerTlv(data), 0x7f49, 'the public key template');
      const publicKey = spkiFromPivPublicKey(keyType, template);
      // the policy the card gave the new key (YubiKey), else the slot's default
      let pinPolicy = s.defaultPinPolicy;
      const meta = await this.#metadataRaw(s.ref);
      if (meta) pinPolicy = pinPolicyOf(findTag(parseBerTlv(meta), 0x02)?.[0], s);
      return { slot: s, keyType, publicKey, pinPolicy, origin: 'generated', source: 'generate' };
    });
  }

  /**
   * GENERAL AUTHENTICATE (part 2 3.2.4) with a key slot: `81` challenge (a digest for ECDSA, a
   * padded block for RSA) or `85` exponentiation (ECDH peer point). Returns the `82` response.
   */
  authenticate(info: PivSlotInfo, tag: 0x81 | 0x85, input: Buffer, what: string): Promise<Buffer> {
    return this.#op(async () => {
      const body = berTlv(0x7c, encodeBerTlv(0x82, Buffer.alloc(0)), encodeBerTlv(tag, input));
      const data = await this.#withPin(info.pinPolicy, () => this.#command(INS.AUTHENTICATE, info.keyType.id, info.slot.ref, body, 256), `${what} with slot ${info.slot.hex}`);
      const outer = requireTag(parseBerTlv(data), 0x7c, 'the authentication template');
      return Buffer.from(requireTag(parseBerTlv(outer), 0x82, 'the response'));
    });
  }

  // ---- data objects --------------------------------------------------------------------------------

  /** GET DATA (part 2 3.1.2): the content of the `53` wrapper, undefined when the object is absent. */
  async #getData(tag: number): Promise<Buffer | undefined> {
    const r = await this.#command(INS.GET_DATA, 0x3f, 0xff, Buffer.concat([Buffer.from([0x5c, 0x03]), tagBytes(tag)]), 256);
    if (ABSENT.has(r.sw)) return undefined;
    const outer = requireTag(parseBerTlv(expectOk(r, `GET DATA ${tag.toString(16).toUpperCase()}`)), 0x53, 'the data object');
    return outer.length > 0 ? Buffer.from(outer) : undefined;
  }

  async #readCertificate(s: PivSlot): Promise<Buffer | undefined> {
    const content = await this.#getData(s.certTag);
    if (!content) return undefined;
    const t = parseBerTlv(content);
    const cert = requireTag(t, 0x70, 'the certificate');
    const info = findTag(t, 0x71);
    if (info && info.length > 0 && (info[0]! & 0x01) !== 0) {
      // CertInfo bit 0: the certificate is gzip-compressed (part 1 table 10, YubiKey practice)
      try {
        return gunzipSync(cert, { maxOutputLength: MAX_CERT });
      } catch (e) {
        throw new SealError('DEVICE_ERROR', `the compressed certificate in slot ${s.hex} cannot be decompressed`, { cause: e });
      }
    }
    return Buffer.from(cert);
  }

  readCertificate(s: PivSlot): Promise<Buffer | undefined> {
    return this.#op(() => this.#readCertificate(s));
  }

  /** PUT DATA (part 2 3.3.1) of the slot's certificate object; `undefined` deletes it (an empty `53`). */
  writeCertificate(s: PivSlot, der: Buffer | undefined): Promise<void> {
    return this.#op(async () => {
      await this.#authenticateManagement();
      const value = der ? berTlv(0x53, encodeBerTlv(0x70, der), encodeBerTlv(0x71, Buffer.from([0x00])), encodeBerTlv(0xfe, Buffer.alloc(0))) : encodeBerTlv(0x53, Buffer.alloc(0));
      const r = await this.#command(INS.PUT_DATA, 0x3f, 0xff, Buffer.concat([Buffer.from([0x5c, 0x03]), tagBytes(s.certTag), value]), undefined);
      expectOk(r, `PUT DATA of the certificate of slot ${s.hex}`);
    });
  }

  // ---- random and probes ---------------------------------------------------------------------------

  /**
   * Random bytes from the card: the challenge of a management-key external authentication
   * (GENERAL AUTHENTICATE `7C 02 81 00`), one cipher block per command, as OpenSC's PIV driver
   * does. Authenticates nothing and needs no secret.
   */
  random(length: number): Promise<Buffer> {
    return this.#op(async () => {
      const name = await this.#mgmtAlgorithm(this.#credentials.managementAlgorithm);
      const alg = MGMT_ALGORITHMS[name];
      const parts: Buffer[] = [];
      let total = 0;
      while (total < length) {
        const r = await this.#command(INS.AUTHENTICATE, alg.id, MGMT_KEY_REF, berTlv(0x7c, encodeBerTlv(0x81, Buffer.alloc(0))), 256);
        const challenge = requireTag(parseBerTlv(requireTag(parseBerTlv(expectOk(r, 'GET CHALLENGE (management key)')), 0x7c, 'the authentication template')), 0x81, 'the challenge');
        if (challenge.length === 0) throw new SealError('DEVICE_ERROR', 'the card returned an empty challenge');
        parts.push(Buffer.from(challenge));
        total += challenge.length;
      }
      return Buffer.concat(parts).subarray(0, length);
    });
  }

  /** Commands that would hand out a private key if the card had any: their status words. */
  probeExtraction(s: PivSlot): Promise<PivProbeAttempt[]> {
    return this.#op(async () => {
      const out: PivProbeAttempt[] = [];
      const asObject = await this.#command(INS.GET_DATA, 0x3f, 0xff, Buffer.from([0x5c, 0x01, s.ref]), 256);
      out.push({ route: `GET DATA with the key reference ${s.hex} as data object tag`, sw: asObject.sw });
      const readBinary = await this.#command(0xb0, 0x00, 0x00, undefined, 256, false);
      out.push({ route: 'READ BINARY on the PIV application', sw: readBinary.sw });
      return out;
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#channel = undefined;
  }
}

// ---- host-side RSA encodings (RFC 8017) -------------------------------------------------------------

type RsaHash = 'SHA-1' | HashName;

const HASH: Record<RsaHash, { node: string; size: number; digestInfo: Buffer }> = {
  // DigestInfo DER prefixes, RFC 8017 section 9.2 note 1
  'SHA-1': { node: 'sha1', size: 20, digestInfo: Buffer.from('3021300906052b0e03021a05000414', 'hex') },
  'SHA-256': { node: 'sha256', size: 32, digestInfo: Buffer.from('3031300d060960864801650304020105000420', 'hex') },
  'SHA-384': { node: 'sha384', size: 48, digestInfo: Buffer.from('3041300d060960864801650304020205000430', 'hex') },
  'SHA-512': { node: 'sha512', size: 64, digestInfo: Buffer.from('3051300d060960864801650304020305000440', 'hex') },
};

export function hashInfo(hash: RsaHash): { node: string; size: number } {
  const h = HASH[hash];
  if (!h) throw new SealError('NOT_SUPPORTED', `hash ${String(hash)} is not supported`);
  return h;
}

/** MGF1 (RFC 8017 B.2.1). */
export function mgf1(hash: RsaHash, seed: Buffer, length: number): Buffer {
  const { node } = hashInfo(hash);
  const parts: Buffer[] = [];
  const counter = Buffer.alloc(4);
  for (let i = 0, total = 0; total < length; i++) {
    counter.writeUInt32BE(i);
    const d = createHash(node).update(seed).update(counter).digest();
    parts.push(d);
    total += d.length;
  }
  return Buffer.concat(parts).subarray(0, length);
}

/** EMSA-PKCS1-v1_5 (RFC 8017 9.2) of a digest: `00 01 FF…FF 00 DigestInfo`, `k` bytes. */
export function emsaPkcs1v15(hash: HashName, digest: Buffer, k: number): Buffer {
  const h = HASH[hash];
  if (!h || digest.length !== h.size) throw new SealError('INVALID_ARGUMENT', `a ${hash} digest has ${h?.size ?? '?'} bytes`);
  const t = Buffer.concat([h.digestInfo, digest]);
  if (k < t.length + 11) throw new SealError('INVALID_ARGUMENT', 'the RSA key is too short for this hash');
  return Buffer.concat([Buffer.from([0x00, 0x01]), Buffer.alloc(k - t.length - 3, 0xff), Buffer.from([0x00]), t]);
}

/**
 * EMSA-PSS-ENCODE (RFC 8017 9.1.1) of a digest for a modulus of `modBits` bits (emBits =
 * modBits − 1), MGF1 with the same hash; returned as a `k`-byte block for the raw RSA operation.
 */
export function emsaPss(hash: HashName, digest: Buffer, modBits: number, saltLength: number, salt: Buffer = randomBytes(saltLength)): Buffer {
  const { node, size: hLen } = hashInfo(hash);
  if (digest.length !== hLen) throw new SealError('INVALID_ARGUMENT', `a ${hash} digest has ${hLen} bytes`);
  if (!Number.isInteger(saltLength) || saltLength < 0 || salt.length !== saltLength) throw new SealError('INVALID_ARGUMENT', 'RSA-PSS salt length must be a non-negative integer');
  const emBits = modBits - 1;
  const emLen = Math.ceil(emBits / 8);
  if (emLen < hLen + saltLength + 2) throw new SealError('INVALID_ARGUMENT', `RSA-PSS salt of ${saltLength} bytes is too long for this key and hash`);
  const h = createHash(node).update(Buffer.alloc(8)).update(digest).update(salt).digest();
  const db = Buffer.concat([Buffer.alloc(emLen - saltLength - hLen - 2), Buffer.from([0x01]), salt]);
  const mask = mgf1(hash, h, emLen - hLen - 1);
  for (let i = 0; i < db.length; i++) db[i]! ^= mask[i]!;
  db[0]! &= 0xff >> (8 * emLen - emBits);
  const em = Buffer.concat([db, h, Buffer.from([0xbc])]);
  const k = Math.ceil(modBits / 8);
  return em.length < k ? Buffer.concat([Buffer.alloc(k - em.length), em]) : em;
}

/**
 * EME-OAEP decoding (RFC 8017 7.1.2 step 3) of the block the card's raw RSA returned. Every
 * check runs to the end and any failure gives the same DECRYPTION_FAILED "decryption failed"
 * (JavaScript gives no constant-time guarantee; the structure leaks no early exit).
 */
export function oaepDecode(hash: RsaHash, em: Buffer, label: Buffer = Buffer.alloc(0)): Buffer {
  const { node, size: hLen } = hashInfo(hash);
  const k = em.length;
  const fail = (): SealError => new SealError('DECRYPTION_FAILED', 'decryption failed');
  if (k < 2 * hLen + 2) throw fail();
  const lHash = createHash(node).update(label).digest();
  const maskedSeed = em.subarray(1, 1 + hLen);
  const maskedDb = em.subarray(1 + hLen);
  const seed = mgf1(hash, maskedDb, hLen);
  for (let i = 0; i < hLen; i++) seed[i]! ^= maskedSeed[i]!;
  const db = mgf1(hash, seed, k - hLen - 1);
  for (let i = 0; i < db.length; i++) db[i]! ^= maskedDb[i]!;
  let bad = em[0]! !== 0 ? 1 : 0;
  bad |= timingSafeEqual(db.subarray(0, hLen), lHash) ? 0 : 1;
  let index = 0;
  let searching = 1;
  for (let i = hLen; i < db.length; i++) {
    const b = db[i]!;
    const isOne = b === 0x01 ? 1 : 0;
    const isZero = b === 0x00 ? 1 : 0;
    if (searching & isOne) index = i;
    bad |= searching & (isOne | isZero ? 0 : 1);
    searching &= isOne ? 0 : 1;
  }
  bad |= searching;
  if (bad) throw fail();
  return Buffer.from(db.subarray(index + 1));
}
