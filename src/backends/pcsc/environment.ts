/**
 * Card applets as SecureEnvironments: a PIV card (keys in fixed slots, certificates as the only
 * data objects) and a GSMA IoT SAFE applet (keys in the containers the SIM was personalised
 * with, files readable as data). What a card cannot do fails with NOT_SUPPORTED, and the
 * capability rows say so beforehand.
 */
import { X509Certificate } from 'node:crypto';
import { SealError, isSealError } from '../../core/errors.js';
import { algorithmShortName, checkUsages, normalizeAlgorithm, type KeyAlgorithmInput, type KeyKind, type KeyUsage } from '../../core/algorithms.js';
import { spkiFromAttributes } from '../../core/public-key.js';
import type { ProtectionLevel } from '../../core/protection.js';
import { SealUri } from '../../core/uri.js';
import type {
  Capability,
  DataObjectInfo,
  EnvironmentInfo,
  EnvironmentTraits,
  ExtractionAttempt,
  GenerateKeySpec,
  ImportPublicKeySpec,
  KeyHandle,
  KeyQuery,
  SecureEnvironment,
} from '../../core/types.js';
import { PIV_CAPABILITIES, iotSafeCapabilities, iotSafeCurveOf } from './capabilities.js';
import { IOTSAFE_ACCESS, IOTSAFE_FN, type IotSafeApplet, type IotSafeAppInfo, type IotSafeObject } from './iotsafe.js';
import { IotSafeKey, PivKey, type IotSafeKeyOwner, type PivKeyOwner } from './key.js';
import { PIV_SLOTS, parseSlot, pivKeyTypeFor, type PivApplet, type PivSlot } from './piv.js';
import { swHex } from './apdu.js';

const MAX_RANDOM = 1024 * 1024;
const CERT_LABEL = /^cert(?:ificate)?-(.+)$/;

/**
 * Protection level of a card: physical cards and SIMs are tamper-resistant (3); the project's
 * simulators are software (1) and are recognised by the reader or modem they come through.
 * `protection-level=` overrides, with a visible warning.
 */
export function cardProtection(kind: 'pcsc' | 'at', name: string, identity: string, override?: string): { level: ProtectionLevel; reason: string } {
  if (override !== undefined) {
    if (!/^[0-3]$/.test(override)) throw new SealError('INVALID_URI', 'protection-level must be 0..3');
    const n = Number(override);
    process.emitWarning(`protection level of the card in '${name}' set to ${n} by configuration, not by the card`, { code: 'SEAL_PROTECTION_OVERRIDE' });
    return { level: n as ProtectionLevel, reason: 'set by configuration (protection-level=), not reported by the card' };
  }
  if (kind === 'pcsc' && /^Virtual PCD/.test(name)) return { level: 1, reason: 'virtual reader (vsmartcard): a software card, not a tamper-resistant chip' };
  if (kind === 'at' && /seal-bridge virtual modem/i.test(identity)) return { level: 1, reason: "virtual modem (seal-bridge's simulator): a software SIM" };
  if (kind === 'at') return { level: 3, reason: 'UICC behind a cellular modem: tamper-resistant module' };
  return { level: 3, reason: 'smart card in a PC/SC reader: tamper-resistant module' };
}

function checkLabel(label: unknown, what = 'label'): asserts label is string {
  if (typeof label !== 'string' || label.length === 0) throw new SealError('INVALID_ARGUMENT', `${what} must be a non-empty string`);
  if (Buffer.byteLength(label) > 128) throw new SealError('INVALID_ARGUMENT', `${what} is longer than 128 bytes`);
}

function checkRandomLength(length: number): void {
  if (!Number.isInteger(length) || length < 1 || length > MAX_RANDOM) throw new SealError('INVALID_ARGUMENT', `random length must be 1..${MAX_RANDOM} bytes`);
}

interface CardEnvironmentParams {
  /** URI of the environment: reader/port and applet, query without secrets. */
  baseUri: SealUri;
  info: EnvironmentInfo;
  onClose: () => Promise<void>;
}

/** Checks that a key URI addresses this environment; returns the parsed URI. */
function ownUri(base: SealUri, text: string, label: string): SealUri {
  const u = SealUri.parse(text);
  if (u.scheme !== base.scheme) throw new SealError('KEY_NOT_FOUND', `a ${u.scheme}: URI does not name a key of ${label}`);
  for (const attr of ['applet', 'reader', 'port'] as const) {
    const want = u.get(attr);
    const have = base.get(attr);
    if (want === undefined || have === undefined) continue;
    const same = attr === 'reader' ? have === want || have.toLowerCase().includes(want.toLowerCase()) : have === want;
    if (!same) throw new SealError('KEY_NOT_FOUND', `the key URI names ${attr} '${want}', this environment is ${label}`);
  }
  return u;
}

// ---- PIV ---------------------------------------------------------------------------------------------

/** GenerateKeySpec on PIV: `replace` overwrites a key already in the slot (the old key is gone for good). */
export type PivGenerateKeySpec = GenerateKeySpec;

/**
 * Retired slots `containerFor` hands out in rotation to callers without a slot of their own
 * (retired-3 … retired-19); 9A/9C/9D/9E and retired-1, -2, -20 are left to named use.
 */
const ROTATION_SLOTS = Array.from({ length: 17 }, (_, i) => `retired-${i + 3}`);
let rotation = 0;

export class PivEnvironment implements SecureEnvironment, PivKeyOwner {
  readonly applet: PivApplet;
  readonly info: EnvironmentInfo;
  readonly capabilities: readonly Capability[] = PIV_CAPABILITIES;
  readonly traits: EnvironmentTraits = { fixedContainers: true, destroyKeys: false, moduleEnforcesUsages: false, dataObjects: 'certificates' };
  readonly #p: CardEnvironmentParams;
  closed = false;

  constructor(applet: PivApplet, p: CardEnvironmentParams) {
    this.applet = applet;
    this.info = p.info;
    this.#p = p;
  }

  get uri(): string {
    return this.#p.baseUri.toString();
  }
  get label(): string {
    return this.info.label;
  }

  keyUri(slotHex: string): string {
    return this.#p.baseUri.withPath({ slot: slotHex }).toString();
  }

  #open(): void {
    if (this.closed) throw new SealError('CLOSED', 'environment is closed');
  }

  #slotOf(text: string, what: string): PivSlot {
    const s = parseSlot(text);
    if (!s) {
      throw new SealError('INVALID_ARGUMENT', `${what} '${text.slice(0, 40)}' names no PIV key slot: PIV keys live in fixed slots (9a, 9c, 9d, 9e, 82–95, or authentication, signature, key-management, card-authentication, retired-1 … retired-20)`);
    }
    return s;
  }

  async generateKey(spec: PivGenerateKeySpec): Promise<KeyHandle> {
    this.#open();
    if (!spec || typeof spec !== 'object') throw new SealError('INVALID_ARGUMENT', 'a key spec is required');
    const algorithm = normalizeAlgorithm(spec.algorithm);
    const usages = checkUsages(algorithm, spec.usages);
    const keyType = pivKeyTypeFor(algorithm);
    if (!keyType) throw new SealError('NOT_SUPPORTED', `PIV cards generate P-256, P-384 and RSA-2048 keys, not ${algorithm.name}${'namedCurve' in algorithm ? ` ${algorithm.namedCurve}` : ''}${'modulusLength' in algorithm ? `-${algorithm.modulusLength}` : ''}`);
    checkLabel(spec.label);
    const s = this.#slotOf(spec.label, 'label');
    if (spec.id !== undefined && !(spec.id.length === 1 && spec.id[0] === s.ref)) throw new SealError('INVALID_ARGUMENT', `id must be the slot reference ${s.hex} (or be left out)`);
    const info = await this.applet.generate(s, keyType, { replace: spec.replace === true });
    return new PivKey(this, info, algorithm, usages);
  }

  /** The next retired slot in rotation (retired-3 … retired-19) for a key of a supported type. */
  async containerFor(algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<string> {
    const a = normalizeAlgorithm(algorithm);
    checkUsages(a, usages);
    if (!pivKeyTypeFor(a)) throw new SealError('NOT_SUPPORTED', `PIV cards generate P-256, P-384 and RSA-2048 keys, not ${a.name}`);
    const label = ROTATION_SLOTS[rotation % ROTATION_SLOTS.length]!;
    rotation++;
    return label;
  }

  async importPublicKey(_spec: ImportPublicKeySpec): Promise<KeyHandle> {
    throw new SealError('NOT_SUPPORTED', 'PIV cards store no bare public keys (a certificate goes with a key slot: writeData("cert-9a", der))');
  }

  async getKey(uriOrLabel: string, kind?: KeyKind): Promise<KeyHandle> {
    this.#open();
    if (typeof uriOrLabel !== 'string' || uriOrLabel.length === 0) throw new SealError('INVALID_ARGUMENT', 'a key URI or label is required');
    let slotText = uriOrLabel;
    if (/^pcsc:/i.test(uriOrLabel) || /^at:/i.test(uriOrLabel)) {
      const u = ownUri(this.#p.baseUri, uriOrLabel, this.info.label);
      const st = u.get('slot');
      if (st === undefined) throw new SealError('INVALID_URI', 'a PIV key URI needs slot=');
      slotText = st;
    }
    if (kind !== undefined && kind !== 'private') throw new SealError('KEY_NOT_FOUND', `PIV slots hold private keys, not ${kind} keys`);
    const s = parseSlot(slotText);
    if (!s) throw new SealError('KEY_NOT_FOUND', `'${slotText.slice(0, 40)}' names no PIV key slot`);
    const info = await this.applet.slotInfo(s);
    if (!info) throw new SealError('KEY_NOT_FOUND', `PIV slot ${s.hex} (${s.name}) holds no key`);
    return PivKey.described(this, info);
  }

  async listKeys(query: KeyQuery = {}): Promise<KeyHandle[]> {
    this.#open();
    if (query.kind !== undefined && query.kind !== 'private') return [];
    let wanted: PivSlot | undefined;
    if (query.label !== undefined) {
      wanted = parseSlot(query.label);
      if (!wanted) return [];
    }
    if (query.id !== undefined) {
      const byId = query.id.length === 1 ? PIV_SLOTS.find((s) => s.ref === query.id![0]) : undefined;
      if (!byId || (wanted && wanted !== byId)) return [];
      wanted = byId;
    }
    if (wanted) {
      const info = await this.applet.slotInfo(wanted);
      return info ? [PivKey.described(this, info)] : [];
    }
    return (await this.applet.listSlots()).map((info) => PivKey.described(this, info));
  }

  async random(length: number): Promise<Buffer> {
    this.#open();
    checkRandomLength(length);
    return this.applet.random(length);
  }

  // ---- certificates as the card's data objects --------------------------------------------------

  #certSlot(label: string): PivSlot {
    checkLabel(label);
    const m = CERT_LABEL.exec(label);
    const s = m ? parseSlot(m[1]!) : undefined;
    if (!s) throw new SealError('NOT_SUPPORTED', `a PIV card stores certificates only: name them cert-<slot> (cert-9a, cert-9c, …), not '${label.slice(0, 40)}'`);
    return s;
  }

  #dataUri(s: PivSlot): string {
    return this.#p.baseUri.withPath({ slot: s.hex, type: 'certificate' }).toString();
  }

  /** Stores an X.509 certificate (DER) in the certificate object of the slot named `cert-<slot>`. */
  async writeData(label: string, value: Buffer): Promise<DataObjectInfo> {
    this.#open();
    const s = this.#certSlot(label);
    if (!Buffer.isBuffer(value)) throw new SealError('INVALID_ARGUMENT', 'data must be a Buffer');
    try {
      new X509Certificate(value);
    } catch (e) {
      throw new SealError('INVALID_ARGUMENT', 'a PIV certificate object holds an X.509 certificate (DER)', { cause: e });
    }
    await this.applet.writeCertificate(s, value);
    return { label: `cert-${s.hex}`, size: value.length, uri: this.#dataUri(s) };
  }

  async readData(label: string): Promise<Buffer> {
    this.#open();
    const s = this.#certSlot(label);
    const der = await this.applet.readCertificate(s);
    if (!der) throw new SealError('OBJECT_NOT_FOUND', `PIV slot ${s.hex} holds no certificate`);
    return der;
  }

  async deleteData(label: string): Promise<void> {
    this.#open();
    const s = this.#certSlot(label);
    if (!(await this.applet.readCertificate(s))) throw new SealError('OBJECT_NOT_FOUND', `PIV slot ${s.hex} holds no certificate`);
    await this.applet.writeCertificate(s, undefined);
  }

  async listData(): Promise<DataObjectInfo[]> {
    this.#open();
    const out: DataObjectInfo[] = [];
    for (const s of PIV_SLOTS) {
      const der = await this.applet.readCertificate(s);
      if (der) out.push({ label: `cert-${s.hex}`, size: der.length, uri: this.#dataUri(s) });
    }
    return out;
  }

  /** YubiKey attestation certificate (DER) of the key in `slot` (e.g. '9a'). */
  async attest(slot: string): Promise<Buffer> {
    this.#open();
    return this.applet.attest(this.#slotOf(slot, 'slot'));
  }

  async probeExtraction(key: KeyHandle): Promise<ExtractionAttempt[]> {
    this.#open();
    if (!(key instanceof PivKey)) throw new SealError('INVALID_ARGUMENT', 'the key must live in this environment');
    const attempts = await this.applet.probeExtraction(key.slot);
    return attempts.map((a) => ({ route: a.route, refused: a.sw !== 0x9000, backendCode: `SW_${swHex(a.sw)}` }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.applet.close();
    await this.#p.onClose();
  }
}

// ---- GSMA IoT SAFE -----------------------------------------------------------------------------------

export interface IotSafeEnvironmentParams extends CardEnvironmentParams {
  /** Label of the public-key container for peers' keys (`peer-object=`); else the first that fits. */
  peerObject?: string;
}

/** A key container usable by seal-bridge: P-256 (the applet's other key types are listed, not used). */
function usable(o: IotSafeObject): boolean {
  return (o.kind === 'private' || o.kind === 'public') && iotSafeCurveOf(o.keyType) !== undefined;
}

export class IotSafeEnvironment implements SecureEnvironment, IotSafeKeyOwner {
  readonly applet: IotSafeApplet;
  readonly info: EnvironmentInfo;
  readonly capabilities: readonly Capability[];
  readonly traits: EnvironmentTraits = { fixedContainers: true, destroyKeys: false, moduleEnforcesUsages: false, dataObjects: 'read-only' };
  readonly #p: IotSafeEnvironmentParams;
  #objects: IotSafeObject[];
  closed = false;

  constructor(applet: IotSafeApplet, objects: IotSafeObject[], app: IotSafeAppInfo | undefined, p: IotSafeEnvironmentParams) {
    this.applet = applet;
    this.info = p.info;
    this.#p = p;
    this.#objects = objects;
    let peer = true;
    try {
      this.peerContainer();
    } catch {
      peer = false;
    }
    this.capabilities = iotSafeCapabilities(objects, app, peer);
  }

  get uri(): string {
    return this.#p.baseUri.toString();
  }
  get label(): string {
    return this.info.label;
  }
  /** The objects of the applet as last listed. */
  get objects(): readonly IotSafeObject[] {
    return this.#objects;
  }

  keyUri(o: IotSafeObject): string {
    return this.#p.baseUri.withPath({ object: o.label, id: o.id, type: o.kind === 'public' ? 'public' : 'private' }).toString();
  }

  #open(): void {
    if (this.closed) throw new SealError('CLOSED', 'environment is closed');
  }

  async #refresh(): Promise<IotSafeObject[]> {
    this.#objects = await this.applet.listObjects();
    return this.#objects;
  }

  /** The public-key container a private key's public half lives in: same label, else same ID. */
  #publicHalf(objects: readonly IotSafeObject[], k: IotSafeObject): IotSafeObject | undefined {
    const pubs = objects.filter((o) => o.kind === 'public');
    return pubs.find((o) => o.label === k.label && k.label !== '') ?? pubs.find((o) => o.id.equals(k.id));
  }

  peerContainer(): IotSafeObject {
    const wanted = this.#p.peerObject;
    const privates = this.#objects.filter((o) => o.kind === 'private');
    const candidates = this.#objects.filter(
      (o) =>
        o.kind === 'public' &&
        iotSafeCurveOf(o.keyType) !== undefined &&
        (o.access === undefined || (o.access & IOTSAFE_ACCESS.update) !== 0) &&
        (o.functions === undefined || (o.functions & IOTSAFE_FN.agree) !== 0),
    );
    const found = wanted !== undefined ? candidates.find((o) => o.label === wanted) : candidates.find((o) => !privates.some((k) => this.#publicHalf(this.#objects, k) === o));
    if (!found) {
      throw new SealError('NOT_SUPPORTED', wanted !== undefined ? `no public-key container '${wanted}' that takes a peer's P-256 key` : "the applet has no public-key container for a peer's key (updatable, key agreement)");
    }
    return found;
  }

  /** The usages a container's function bits allow, and the algorithm name they suggest. */
  #describe(o: IotSafeObject): { algorithm: { name: 'ECDSA' | 'ECDH'; namedCurve: 'P-256' }; usages: ('sign' | 'verify' | 'deriveKey')[] } {
    const fn = o.functions ?? IOTSAFE_FN.sign | IOTSAFE_FN.agree;
    const usages: ('sign' | 'verify' | 'deriveKey')[] = [];
    if (o.kind === 'private') {
      if (fn & IOTSAFE_FN.sign) usages.push('sign', 'verify');
      if (fn & IOTSAFE_FN.agree) usages.push('deriveKey');
    } else if (fn & IOTSAFE_FN.sign) usages.push('verify');
    const name = fn & IOTSAFE_FN.sign ? 'ECDSA' : 'ECDH';
    return { algorithm: { name, namedCurve: 'P-256' }, usages };
  }

  async #keyOf(objects: readonly IotSafeObject[], o: IotSafeObject): Promise<IotSafeKey | undefined> {
    if (!usable(o)) return undefined;
    const pubObject = o.kind === 'public' ? o : this.#publicHalf(objects, o);
    if (!pubObject) return undefined;
    if (o.kind === 'private' && o.state !== undefined && o.state !== 0x01) return undefined; // an empty container
    const point = await this.applet.readPublicKey(pubObject.id);
    if (!point) return undefined;
    const d = this.#describe(o);
    const spki = spkiFromAttributes(d.algorithm, { ecPoint: point });
    return new IotSafeKey(this, o, point, spki, d.algorithm, d.usages);
  }

  /**
   * IoT SAFE cannot create key containers: `label` names an existing private-key container whose
   * functions include key generation; a key it holds already is replaced.
   */
  async generateKey(spec: GenerateKeySpec): Promise<KeyHandle> {
    this.#open();
    if (!spec || typeof spec !== 'object') throw new SealError('INVALID_ARGUMENT', 'a key spec is required');
    const algorithm = normalizeAlgorithm(spec.algorithm);
    const usages = checkUsages(algorithm, spec.usages);
    if ((algorithm.name !== 'ECDSA' && algorithm.name !== 'ECDH') || algorithm.namedCurve !== 'P-256') {
      throw new SealError('NOT_SUPPORTED', `the IoT SAFE applet generates P-256 keys only, not ${algorithm.name}`);
    }
    checkLabel(spec.label);
    const objects = await this.#refresh();
    const containers = objects.filter((o) => o.kind === 'private');
    const o = containers.find((c) => c.label === spec.label);
    if (!o) {
      throw new SealError('NOT_SUPPORTED', `IoT SAFE cannot create key containers, and there is none labelled '${spec.label.slice(0, 40)}' (containers: ${containers.map((c) => `'${c.label}'`).join(', ') || 'none'})`);
    }
    if (spec.id !== undefined && !spec.id.equals(o.id)) throw new SealError('INVALID_ARGUMENT', `container '${o.label}' has id ${o.id.toString('hex')}`);
    if (iotSafeCurveOf(o.keyType) === undefined) throw new SealError('NOT_SUPPORTED', `container '${o.label}' holds key type ${o.keyType?.toString(16) ?? '?'}, not P-256`);
    const fn = o.functions ?? 0;
    if (!(fn & IOTSAFE_FN.keygen)) throw new SealError('USAGE_NOT_PERMITTED', `container '${o.label}' does not allow key generation`);
    const need = (u: string, bit: number, name: string): void => {
      if ((usages as string[]).includes(u) && !(fn & bit)) throw new SealError('USAGE_NOT_PERMITTED', `container '${o.label}' does not allow ${name}`);
    };
    need('sign', IOTSAFE_FN.sign, 'signing');
    need('deriveKey', IOTSAFE_FN.agree, 'key agreement');
    const { point } = await this.applet.generate(o.id);
    await this.#refresh();
    const spki = spkiFromAttributes(algorithm, { ecPoint: point });
    return new IotSafeKey(this, o, point, spki, algorithm, usages, true);
  }

  /** A private-key container that can generate a P-256 key with these usages (the applet defines them). */
  async containerFor(algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<string> {
    this.#open();
    const a = normalizeAlgorithm(algorithm);
    const u = checkUsages(a, usages);
    if ((a.name !== 'ECDSA' && a.name !== 'ECDH') || a.namedCurve !== 'P-256') throw new SealError('NOT_SUPPORTED', `the IoT SAFE applet generates P-256 keys only, not ${a.name}`);
    const needed = IOTSAFE_FN.keygen | (a.name === 'ECDSA' ? IOTSAFE_FN.sign : 0) | (u.includes('deriveKey') || a.name === 'ECDH' ? IOTSAFE_FN.agree : 0);
    // the container that fits with the fewest other functions: an agreement-only container for ECDH
    const bits = (n: number): number => n.toString(2).replace(/0/g, '').length;
    const o = (await this.#refresh())
      .filter((c) => c.kind === 'private' && iotSafeCurveOf(c.keyType) !== undefined && ((c.functions ?? 0) & needed) === needed)
      .sort((x, y) => bits(x.functions ?? 0) - bits(y.functions ?? 0))[0];
    if (!o) throw new SealError('NOT_SUPPORTED', `the applet has no container that generates ${algorithmShortName(a)} keys for ${u.join(', ')}`);
    return o.label;
  }

  async importPublicKey(_spec: ImportPublicKeySpec): Promise<KeyHandle> {
    throw new SealError('NOT_SUPPORTED', 'the IoT SAFE applet takes public keys only inside a key agreement (sharedSecret)');
  }

  async getKey(uriOrLabel: string, kind?: KeyKind): Promise<KeyHandle> {
    this.#open();
    if (typeof uriOrLabel !== 'string' || uriOrLabel.length === 0) throw new SealError('INVALID_ARGUMENT', 'a key URI or label is required');
    const query: KeyQuery = {};
    if (/^(pcsc|at):/i.test(uriOrLabel)) {
      const u = ownUri(this.#p.baseUri, uriOrLabel, this.info.label);
      const type = u.get('type');
      if (type !== undefined && type !== 'private' && type !== 'public') throw new SealError('INVALID_URI', `unknown object type '${type}'`);
      const label = u.get('object');
      const id = u.getBytes('id');
      if (label === undefined && id === undefined) throw new SealError('INVALID_URI', 'an IoT SAFE key URI needs object= or id=');
      if (label !== undefined) query.label = label;
      if (id !== undefined) query.id = id;
      const k = (type as KeyKind | undefined) ?? kind;
      if (k !== undefined) query.kind = k;
    } else {
      query.label = uriOrLabel;
      if (kind !== undefined) query.kind = kind;
    }
    const found = await this.listKeys(query);
    const what = query.label !== undefined ? `'${query.label}'` : `with id ${query.id!.toString('hex')}`;
    if (found.length === 0) throw new SealError('KEY_NOT_FOUND', `no key ${what} in the IoT SAFE applet`);
    // a private key and its public half may share a label: the private key is the one meant
    const priv = found.filter((k) => k.kind === 'private');
    if (priv.length === 1) return priv[0]!;
    if (found.length > 1) throw new SealError('AMBIGUOUS_KEY', `${found.length} keys match ${what}; use the key's URI (with type= and id=)`);
    return found[0]!;
  }

  async listKeys(query: KeyQuery = {}): Promise<KeyHandle[]> {
    this.#open();
    if (query.kind === 'secret') return [];
    const objects = await this.#refresh();
    const privates = objects.filter((o) => o.kind === 'private');
    const halves = new Set(privates.map((k) => this.#publicHalf(objects, k)).filter((o): o is IotSafeObject => o !== undefined));
    const out: KeyHandle[] = [];
    for (const o of objects) {
      if (o.kind !== 'private' && o.kind !== 'public') continue;
      if (query.kind !== undefined && o.kind !== query.kind) continue;
      // the public half of a key pair is part of its private key's handle
      if (o.kind === 'public' && query.kind === undefined && halves.has(o)) continue;
      if (query.label !== undefined && o.label !== query.label) continue;
      if (query.id !== undefined && !o.id.equals(query.id)) continue;
      const key = await this.#keyOf(objects, o);
      if (key) out.push(key);
    }
    return out;
  }

  async random(length: number): Promise<Buffer> {
    this.#open();
    checkRandomLength(length);
    return this.applet.random(length);
  }

  #file(label: string): IotSafeObject {
    checkLabel(label);
    const f = this.#objects.find((o) => o.kind === 'file' && o.label === label);
    if (!f) throw new SealError('OBJECT_NOT_FOUND', `no file '${label.slice(0, 40)}' in the IoT SAFE applet`);
    return f;
  }

  async writeData(_label: string, _value: Buffer): Promise<DataObjectInfo> {
    this.#open();
    throw new SealError('NOT_SUPPORTED', 'the IoT SAFE applet offers no command to write its files from the host');
  }

  async readData(label: string): Promise<Buffer> {
    this.#open();
    await this.#refresh();
    const f = this.#file(label);
    if (f.access !== undefined && (f.access & IOTSAFE_ACCESS.read) === 0) throw new SealError('USAGE_NOT_PERMITTED', `file '${label}' is not readable`);
    return this.applet.readFile(f.id);
  }

  async deleteData(_label: string): Promise<void> {
    this.#open();
    throw new SealError('NOT_SUPPORTED', 'the IoT SAFE applet offers no command to delete its files');
  }

  /** The applet's readable files; the size is what READ FILE returns (the applets disagree on the byte order of tag 20). */
  async listData(): Promise<DataObjectInfo[]> {
    this.#open();
    const objects = await this.#refresh();
    const out: DataObjectInfo[] = [];
    for (const f of objects.filter((o) => o.kind === 'file' && (o.access === undefined || (o.access & IOTSAFE_ACCESS.read) !== 0))) {
      const content = await this.applet.readFile(f.id);
      out.push({ label: f.label, size: content.length, uri: this.#p.baseUri.withPath({ object: f.label, id: f.id, type: 'data' }).toString() });
    }
    return out;
  }

  async probeExtraction(key: KeyHandle): Promise<ExtractionAttempt[]> {
    this.#open();
    if (!(key instanceof IotSafeKey)) throw new SealError('INVALID_ARGUMENT', 'the key must live in this environment');
    if (key.kind === 'public') throw new SealError('INVALID_ARGUMENT', 'a public key has nothing to extract');
    const attempts = await this.applet.probeExtraction(key.object.id);
    return attempts.map((a) => ({ route: a.route, refused: a.refused, backendCode: `SW_${swHex(a.sw)}` }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.applet.close();
    } catch (e) {
      if (!isSealError(e)) throw e;
    }
    await this.#p.onClose();
  }
}
