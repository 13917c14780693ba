/**
 * The GSMA IoT SAFE applet (GSMA IoT.05, as public implementations of it agree and differ) over an
 * ApduTransport: a logical channel to AID A0 00 00 05 59 00 10, the object list, key-pair
 * generation into an existing container, signatures over a host-computed hash (mode 03,
 * pad-and-sign), public-key reads, COMPUTE DH after PUT PUBLIC KEY, random, file reads.
 *
 * Real applets disagree in places; every variant is accepted:
 * - class byte `0x80 | channel` (tried first) or the bare channel number: the other one is tried
 *   once when the first answers `6E00` / `6D00`, and kept;
 * - tag `33` (signature) with a one- or two-byte length; the signature as raw r‖s or DER;
 * - the object list with one wrapper per object or several objects in one wrapper, with or
 *   without Le, in pages (P2) while the applet answers `6300`;
 * - `61xx` / `6Cxx` are resolved by the transport.
 * Every operation runs inside `transport.exclusive` (put-peer-key and COMPUTE DH together); the
 * channel is opened again after the transport reconnected.
 */
import { SealError, isSealError } from '../../core/errors.js';
import { derToP1363 } from '../../core/encoding.js';
import { commandApdu, expectOk, statusError } from './apdu.js';
import { berTlv, encodeBerTlv, findTag, parseBerTlv, type Tlv } from './tlv.js';
import type { ApduTransport, CardChannel, ResponseApdu } from './transport.js';

export const IOTSAFE_AID = Buffer.from('A0000005590010', 'hex');

type GenerationalTransport = ApduTransport & { readonly generation: number };

/** Crypto-function bits of tag `61`. */
export const IOTSAFE_FN = { sign: 0x01, keygen: 0x02, agree: 0x04, derive: 0x08 } as const;
/** Key types of tag `4B`. */
export const IOTSAFE_KEY_TYPE = { RSA2048: 0x03, P256_PERSISTENT: 0x13, P256_VOLATILE: 0x14, BP256_PERSISTENT: 0x23, BP256_VOLATILE: 0x24, HMAC: 0xa0 } as const;
/** Signature algorithm bits of tag `92`. */
export const IOTSAFE_SIG = { RSA_PKCS1: 0x01, RSA_PSS: 0x02, ECDSA: 0x04 } as const;
/** Hash bits of tag `91` (two bytes). */
export const IOTSAFE_HASH = { 'SHA-256': 0x0001, 'SHA-384': 0x0002, 'SHA-512': 0x0004 } as const;
/** Access bits of tag `60`. */
export const IOTSAFE_ACCESS = { read: 0x01, update: 0x02 } as const;

const MODE_PAD_AND_SIGN = 0x03;
const SIGN_SESSION = 0x01;
const KEY_SESSION = 0x02;
/** Bytes asked per READ FILE; some modems truncate answers over 256 bytes. */
const READ_CHUNK = 0xf0;
const MAX_FILE = 0x8000;
const MAX_PAGES = 64;
/** Answers to a READ FILE past the end of the file. */
const END_OF_FILE = new Set([0x6282, 0x6981, 0x6a86, 0x6b00, 0x6700]);

export type IotSafeObjectKind = 'private' | 'public' | 'file' | 'secret';

/** One entry of the object list (GET DATA `CB 01`). */
export interface IotSafeObject {
  kind: IotSafeObjectKind;
  id: Buffer;
  label: string;
  access?: number;
  /** `4A`: 01 activated (a key container holds a key). */
  state?: number;
  keyType?: number;
  usage?: number;
  functions?: number;
  sigAlgs?: number;
  hashes?: number;
  keyAgreement?: number;
  /** `20`: the file size bytes as the applet sent them (byte order differs between applets). */
  sizeField?: Buffer;
}

export interface IotSafeAppInfo {
  version?: Buffer;
  appletId?: Buffer;
  functions?: number;
  hashes?: number;
  sigAlgs?: number;
  keyAgreement?: number;
  maxSessions?: number;
}

const WRAPPERS: ReadonlyMap<number, IotSafeObjectKind> = new Map([
  [0xc1, 'private'],
  [0xc2, 'public'],
  [0xc3, 'file'],
  [0xc4, 'secret'],
]);
const ID_TAG: Record<IotSafeObjectKind, number> = { file: 0x83, private: 0x84, public: 0x85, secret: 0x86 };
const LABEL_TAG: Record<IotSafeObjectKind, number> = { file: 0x73, private: 0x74, public: 0x75, secret: 0x76 };

/**
 * Failures after which the logical channel cannot be trusted: the card or SIM is gone or was
 * reset (DEVICE_UNAVAILABLE, SESSION_LOST), or the modem no longer knows the channel (`+CME ERROR:
 * 21`, invalid index, after the SIM came back).
 */
export function channelLost(e: unknown): boolean {
  return isSealError(e) && (e.code === 'DEVICE_UNAVAILABLE' || e.code === 'SESSION_LOST' || e.backendCode === 'CME_21');
}

const uint = (b: Buffer | undefined): number | undefined => (b && b.length > 0 && b.length <= 4 ? b.readUIntBE(0, b.length) : undefined);

/**
 * Parses the object list: wrappers `C1`–`C4`, each with one object or several in a row (a new
 * object starts where its label or ID tag repeats).
 */
export function parseObjectList(data: Buffer): IotSafeObject[] {
  const out: IotSafeObject[] = [];
  for (const w of parseBerTlv(data)) {
    const kind = WRAPPERS.get(w.tag);
    if (!kind) continue;
    let current: Partial<IotSafeObject> & { seen: Set<number> } = { seen: new Set() };
    const flush = (): void => {
      if (current.id !== undefined || current.label !== undefined) {
        out.push({ ...objectFields(current), kind, id: current.id ?? Buffer.alloc(0), label: current.label ?? '' });
      }
      current = { seen: new Set() };
    };
    for (const t of parseBerTlv(w.value)) {
      if ((t.tag === ID_TAG[kind] || t.tag === LABEL_TAG[kind]) && current.seen.has(t.tag)) flush();
      current.seen.add(t.tag);
      applyField(current, kind, t);
    }
    flush();
  }
  return out;
}

function objectFields(o: Partial<IotSafeObject>): Omit<IotSafeObject, 'kind' | 'id' | 'label'> {
  const { access, state, keyType, usage, functions, sigAlgs, hashes, keyAgreement, sizeField } = o;
  return Object.fromEntries(Object.entries({ access, state, keyType, usage, functions, sigAlgs, hashes, keyAgreement, sizeField }).filter(([, v]) => v !== undefined));
}

function applyField(o: Partial<IotSafeObject>, kind: IotSafeObjectKind, t: Tlv): void {
  const v = Buffer.from(t.value);
  if (t.tag === ID_TAG[kind]) o.id = v;
  else if (t.tag === LABEL_TAG[kind]) o.label = v.toString('utf8');
  else if (t.tag === 0x60) o.access = uint(v);
  else if (t.tag === 0x4a) o.state = uint(v);
  else if (t.tag === 0x4b) o.keyType = uint(v);
  else if (t.tag === 0x4e) o.usage = uint(v);
  else if (t.tag === 0x61) o.functions = uint(v);
  else if (t.tag === 0x92) o.sigAlgs = uint(v);
  else if (t.tag === 0x91) o.hashes = uint(v);
  else if (t.tag === 0x6f) o.keyAgreement = uint(v);
  else if (t.tag === 0x20 && kind === 'file') o.sizeField = v;
}

export function parseAppInfo(data: Buffer): IotSafeAppInfo {
  const t = parseBerTlv(data);
  const out: IotSafeAppInfo = {};
  const version = findTag(t, 0x10);
  const appletId = findTag(t, 0x11);
  if (version) out.version = Buffer.from(version);
  if (appletId) out.appletId = Buffer.from(appletId);
  const set = (k: 'functions' | 'hashes' | 'sigAlgs' | 'keyAgreement' | 'maxSessions', tag: number): void => {
    const v = uint(findTag(t, tag));
    if (v !== undefined) out[k] = v;
  };
  set('functions', 0x90);
  set('hashes', 0x91);
  set('sigAlgs', 0x92);
  set('keyAgreement', 0x93);
  set('maxSessions', 0xb7);
  return out;
}

/** The uncompressed point inside `34 { 49 { 86 point } }` (also accepted without the inner wrappers). */
export function pointFrom(tlvs: readonly Tlv[], what: string): Buffer {
  const pkd = findTag(tlvs, 0x34);
  const level1 = pkd ? parseBerTlv(pkd) : tlvs;
  const ecc = findTag(level1, 0x49);
  const level2 = ecc ? parseBerTlv(ecc) : level1;
  const point = findTag(level2, 0x86);
  if (!point || point.length !== 65 || point[0] !== 0x04) throw new SealError('DEVICE_ERROR', `${what}: the applet returned no uncompressed P-256 point`);
  return Buffer.from(point);
}

/**
 * The signature of COMPUTE SIGNATURE UPDATE: tag `33` with a one-byte (`33 40 …`) or two-byte
 * (`33 00 40 …`) length, raw r‖s or DER inside; returned as P1363 r‖s of `2 × n` bytes.
 */
export function signatureFrom(data: Buffer, n: number): Buffer {
  if (data.length < 2 || data[0] !== 0x33) throw new SealError('DEVICE_ERROR', 'COMPUTE SIGNATURE: the applet returned no signature (tag 33)');
  let body: Buffer;
  if (data.length >= 3 && data[1] === 0x00 && data.readUInt16BE(1) === data.length - 3) body = data.subarray(3);
  else {
    const t = parseBerTlv(data);
    if (t.length !== 1) throw new SealError('DEVICE_ERROR', 'COMPUTE SIGNATURE: unexpected data after the signature');
    body = t[0]!.value;
  }
  if (body.length === 2 * n) return Buffer.from(body);
  try {
    return derToP1363(body, n);
  } catch (e) {
    throw new SealError('DEVICE_ERROR', 'COMPUTE SIGNATURE: the signature is neither r‖s nor DER', { cause: e });
  }
}

export interface IotSafeOptions {
  /** Force the class byte style instead of probing: 0x80 (proprietary, `0x8N`) or 0x00 (`0x0N`). */
  cla?: 0x00 | 0x80;
}

export interface IotSafeProbeAttempt {
  route: string;
  refused: boolean;
  sw: number;
}

/** Tags of an object entry that describe a key without being any part of it. */
const ATTRIBUTE_TAGS = new Set([0x74, 0x84, 0x60, 0x4a, 0x4b, 0x4e, 0x61, 0x92, 0x91, 0x6f]);

export class IotSafeApplet {
  readonly transport: GenerationalTransport;
  #channel: CardChannel | undefined;
  #generation = -1;
  #cla: number;
  #claSettled: boolean;
  #closed = false;

  constructor(transport: GenerationalTransport, options: IotSafeOptions = {}) {
    this.transport = transport;
    this.#cla = options.cla ?? 0x80;
    this.#claSettled = options.cla !== undefined;
  }

  get cla(): number {
    return this.#cla;
  }

  #op<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new SealError('CLOSED', 'the IoT SAFE environment is closed'));
    return this.transport.exclusive(async () => {
      if (!this.#channel || this.#generation !== this.transport.generation) {
        this.#channel = undefined;
        const { channel } = await this.transport.select(IOTSAFE_AID, { logical: true });
        this.#channel = channel;
        this.#generation = this.transport.generation;
      }
      try {
        return await fn();
      } catch (e) {
        // the card or SIM went away, or the channel is gone with it: open a new one next time
        if (channelLost(e)) this.#channel = undefined;
        throw e;
      }
    });
  }

  /**
   * One applet command on the channel. Until a command has succeeded, a `6E00`/`6D00` answer
   * makes the other class byte style be tried once for this command; the style that works is kept.
   */
  async #send(ins: number, p1: number, p2: number, data?: Buffer, le?: number): Promise<ResponseApdu> {
    const channel = this.#channel;
    if (!channel) throw new SealError('INTERNAL', 'IoT SAFE command outside an operation');
    const r = await channel.transmit(commandApdu(this.#cla, ins, p1, p2, data, le));
    if (!this.#claSettled && (r.sw === 0x6e00 || r.sw === 0x6d00)) {
      const other = this.#cla === 0x80 ? 0x00 : 0x80;
      const again = await channel.transmit(commandApdu(other, ins, p1, p2, data, le));
      if (again.sw !== 0x6e00 && again.sw !== 0x6d00) {
        this.#cla = other;
        this.#claSettled = true;
      }
      return again;
    }
    if (r.sw === 0x9000) this.#claSettled = true;
    return r;
  }

  applicationInfo(): Promise<IotSafeAppInfo | undefined> {
    return this.#op(async () => {
      const r = await this.#send(0xcb, 0x00, 0x00, undefined, 256);
      if (r.sw !== 0x9000) return undefined; // optional in practice: the object list says enough
      return parseAppInfo(r.data);
    });
  }

  async #objectList(): Promise<IotSafeObject[]> {
    const parts: Buffer[] = [];
    for (let page = 0; ; page++) {
      if (page >= MAX_PAGES) throw new SealError('DEVICE_ERROR', `GET DATA (object list): more than ${MAX_PAGES} pages`);
      let r = await this.#send(0xcb, 0x01, page, undefined, 256);
      if (r.sw === 0x6700) r = await this.#send(0xcb, 0x01, page); // an applet that wants no Le
      if (r.sw === 0x6300) {
        parts.push(r.data);
        continue;
      }
      parts.push(expectOk(r, 'GET DATA (object list)'));
      break;
    }
    return parseObjectList(Buffer.concat(parts));
  }

  listObjects(): Promise<IotSafeObject[]> {
    return this.#op(() => this.#objectList());
  }

  /** GENERATE KEY PAIR into the private-key container `privateId`: the public key's ID and point. */
  generate(privateId: Buffer): Promise<{ publicId: Buffer | undefined; point: Buffer }> {
    return this.#op(async () => {
      const r = await this.#send(0xb9, 0x00, 0x00, encodeBerTlv(0x84, privateId), 256);
      const t = parseBerTlv(expectOk(r, 'GENERATE KEY PAIR'));
      const publicId = findTag(t, 0x85);
      return { publicId: publicId ? Buffer.from(publicId) : undefined, point: pointFrom(t, 'GENERATE KEY PAIR') };
    });
  }

  /** READ PUBLIC KEY of the public-key container `publicId`; undefined when it holds no key yet. */
  readPublicKey(publicId: Buffer): Promise<Buffer | undefined> {
    return this.#op(async () => {
      const r = await this.#send(0xcd, 0x00, 0x00, encodeBerTlv(0x85, publicId), 256);
      if (r.sw === 0x6985 || r.sw === 0x6a88) return undefined;
      return pointFrom(parseBerTlv(expectOk(r, 'READ PUBLIC KEY')), 'READ PUBLIC KEY');
    });
  }

  /**
   * COMPUTE SIGNATURE INIT (mode 03: the hash is supplied) then UPDATE with the digest; returns
   * r‖s. The session is closed again when the update fails.
   */
  sign(privateId: Buffer, hash: number, sigAlg: number, digest: Buffer, n: number): Promise<Buffer> {
    return this.#op(async () => {
      const init = Buffer.concat([
        encodeBerTlv(0x84, privateId),
        encodeBerTlv(0xa1, Buffer.from([MODE_PAD_AND_SIGN])),
        encodeBerTlv(0x91, Buffer.from([hash >> 8, hash & 0xff])),
        encodeBerTlv(0x92, Buffer.from([sigAlg])),
      ]);
      expectOk(await this.#send(0x2a, 0x00, SIGN_SESSION, init), 'COMPUTE SIGNATURE INIT');
      const r = await this.#send(0x2b, 0x80, SIGN_SESSION, encodeBerTlv(0x9e, digest), 256);
      if (r.sw !== 0x9000) {
        await this.#send(0x2a, 0x01, SIGN_SESSION, undefined, 256).catch(() => undefined);
        throw statusError(r.sw, 'COMPUTE SIGNATURE UPDATE');
      }
      return signatureFrom(r.data, n);
    });
  }

  /**
   * PUT PUBLIC KEY of the peer into the container `peerId` (init, update with `34 {49 {86 point}}`,
   * close), then COMPUTE DH with `privateId`: the shared secret, returned to the host.
   */
  computeDh(privateId: Buffer, peerId: Buffer, point: Buffer): Promise<Buffer> {
    return this.#op(async () => {
      expectOk(await this.#send(0x24, 0x00, KEY_SESSION, encodeBerTlv(0x85, peerId)), 'PUT PUBLIC KEY INIT');
      try {
        const r = await this.#send(0xd8, 0x80, KEY_SESSION, berTlv(0x34, berTlv(0x49, encodeBerTlv(0x86, point))));
        expectOk(r, 'PUT PUBLIC KEY UPDATE');
      } finally {
        await this.#send(0x24, 0x01, KEY_SESSION, undefined, 256).catch(() => undefined);
      }
      const r = await this.#send(0x46, 0x00, 0x00, Buffer.concat([encodeBerTlv(0x84, privateId), encodeBerTlv(0x85, peerId)]), 256);
      return Buffer.from(expectOk(r, 'COMPUTE DH'));
    });
  }

  random(length: number): Promise<Buffer> {
    return this.#op(async () => {
      const parts: Buffer[] = [];
      let total = 0;
      while (total < length) {
        const n = Math.min(256, length - total);
        const data = expectOk(await this.#send(0x84, 0x00, 0x00, undefined, n), 'GET RANDOM');
        if (data.length === 0) throw new SealError('DEVICE_ERROR', 'GET RANDOM returned no bytes');
        parts.push(Buffer.from(data.subarray(0, n)));
        total += Math.min(n, data.length);
      }
      return Buffer.concat(parts).subarray(0, length);
    });
  }

  /** READ FILE from offset 0 in chunks until the applet says the end is reached. */
  readFile(fileId: Buffer): Promise<Buffer> {
    return this.#op(async () => {
      const parts: Buffer[] = [];
      let offset = 0;
      for (;;) {
        const r = await this.#send(0xb0, offset >> 8, offset & 0xff, encodeBerTlv(0x83, fileId), READ_CHUNK);
        if (r.sw !== 0x9000 && !(r.sw === 0x6282 && r.data.length > 0)) {
          if (offset > 0 && END_OF_FILE.has(r.sw)) break;
          throw statusError(r.sw, 'READ FILE');
        }
        parts.push(Buffer.from(r.data));
        offset += r.data.length;
        if (r.data.length < READ_CHUNK || r.sw === 0x6282) break;
        if (offset >= MAX_FILE) throw new SealError('DATA_TOO_LARGE', `READ FILE: the file is larger than ${MAX_FILE} bytes`);
      }
      return Buffer.concat(parts);
    });
  }

  /**
   * Asks the applet for the private key by the routes it has: its object entry (GET DATA `C1`,
   * which must carry attributes only) and READ PUBLIC KEY addressed with the private-key tag.
   */
  probeExtraction(privateId: Buffer): Promise<IotSafeProbeAttempt[]> {
    return this.#op(async () => {
      const entry = await this.#send(0xcb, 0xc1, 0x00, encodeBerTlv(0x84, privateId), 256);
      let onlyAttributes = entry.sw !== 0x9000;
      if (entry.sw === 0x9000) {
        const objects = parseObjectList(entry.data);
        const inner = parseBerTlv(entry.data).flatMap((w) => (WRAPPERS.has(w.tag) ? parseBerTlv(w.value) : [w]));
        onlyAttributes = objects.length <= 1 && inner.every((t) => ATTRIBUTE_TAGS.has(t.tag));
      }
      const asPublic = await this.#send(0xcd, 0x00, 0x00, encodeBerTlv(0x84, privateId), 256);
      return [
        { route: 'GET DATA of the private key object (C1): attributes only', refused: onlyAttributes, sw: entry.sw },
        { route: 'READ PUBLIC KEY addressed with the private key ID (tag 84)', refused: asPublic.sw !== 0x9000, sw: asPublic.sw },
      ];
    });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const channel = this.#channel;
    this.#channel = undefined;
    if (channel && this.#generation === this.transport.generation) await channel.close().catch(() => undefined);
  }
}
