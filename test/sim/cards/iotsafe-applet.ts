/**
 * A virtual GSMA IoT SAFE applet (AID A0 00 00 05 59 00 10) for the test simulators, following
 * the APDU layout of GSMA IoT.05 as the public IoT SAFE implementations use it.
 *
 * One applet state (key containers, files, counters) lives in `<stateDir>/state.json`, written
 * atomically (temp file + rename, 0600, directory 0700). Private keys never leave that state: no
 * command returns them. Several front ends share the state, each a VirtualCard with its own
 * channels and sessions, the way one SIM is reached through a PC/SC reader and through a modem:
 *   const applet = openVirtualIotSafe(dir);
 *   connectToVpcd(applet.frontEnd('iotsafe-pcsc'), 35964);
 *   new VirtualModem(applet.frontEnd('iotsafe-modem', { t0: true }), …);
 *
 * Pre-provisioned at state creation:
 *   private key 01 `client-key`  P-256 persistent, empty until GENERATE KEY PAIR; sign, keygen, agreement
 *   private key 02 `device-key`  P-256 persistent, generated at creation; sign, agreement (no keygen)
 *   private key 03 `ecdh-key`    P-256 volatile (kept in memory only), keygen + agreement, no sign
 *   public keys 01/02/03         the public halves of the pairs above (read only)
 *   public key 05 `peer-key`     empty, written with PUT PUBLIC KEY; verify + agreement
 *   file 01 `device-cert`        a self-signed X.509 certificate of device-key (> 256 bytes)
 *   file 02 `device-info`        a short text
 *
 * Quirks of real applets and cards can be switched on (IotSafeQuirks), at creation or at run time.
 * Malformed commands never throw: they get a status word (6700, 6A80, 6A86, 6D00, 6E00 …).
 * Test code only, never product code.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { VirtualCard } from './card.js';

export const IOTSAFE_AID = Buffer.from('A0000005590010', 'hex');

/** Behaviours of real IoT SAFE applets and cards that differ from the plain reading of the spec. */
export interface IotSafeQuirks {
  /** COMPUTE SIGNATURE returns the ECDSA signature DER-encoded instead of raw r‖s. */
  signatureDer?: boolean;
  /** Length field of tag 33 (computed signature): 1 byte (`33 40 …`, default) or 2 bytes (`33 00 40 …`). */
  tag33Length?: 1 | 2;
  /** Every response with data is announced with `61xx` and fetched with GET RESPONSE `<ch> C0 00 00 xx`. */
  getResponse?: boolean;
  /** T=0 behaviour: a command without data whose Le is not the exact response length gets `6Cxx`. */
  t0WrongLe?: boolean;
  /** File size (tag 20 in the object list) little-endian, as one implementation reads it. */
  fileSizeLittleEndian?: boolean;
}

export interface IotSafeFrontEndOptions {
  /**
   * The card behind this front end speaks T=0 (as a SIM behind a modem does): case 4 responses
   * come as `61xx`, and a case 2 command with the wrong Le gets `6Cxx`, whatever the quirks say.
   */
  t0?: boolean;
}

export interface VirtualIotSafe {
  /** A new front end (its own channels and sessions) on the shared applet state. */
  frontEnd(name: string, options?: IotSafeFrontEndOptions): VirtualCard;
  /** The quirks in force (a copy). */
  readonly quirks: Readonly<IotSafeQuirks>;
  /** Replaces the quirks given; others stay as they are. */
  setQuirks(q: IotSafeQuirks): void;
  /** Non-secret facts for status reports: key ids, labels, whether filled, signature counters. */
  describe(): { privateKeys: { id: string; label: string; filled: boolean; signatures: number }[]; publicKeys: { id: string; label: string; filled: boolean }[]; files: { id: string; label: string; size: number }[] };
}

// ---------------------------------------------------------------------------------------------
// Constants (IOTSAFE.md "Objects", "Algorithm identifiers")

const TAG = {
  version: 0x10,
  appletId: 0x11,
  fileSize: 0x20,
  signature: 0x33,
  publicKeyData: 0x34,
  eccKeyField: 0x49,
  state: 0x4a,
  keyType: 0x4b,
  keyUsage: 0x4e,
  access: 0x60,
  functions: 0x61,
  keyAgreement: 0x6f,
  fileLabel: 0x73,
  privLabel: 0x74,
  pubLabel: 0x75,
  secretLabel: 0x76,
  fileId: 0x83,
  privId: 0x84,
  pubId: 0x85,
  secretId: 0x86,
  eccPoint: 0x86,
  appFunctions: 0x90,
  hash: 0x91,
  sigAlg: 0x92,
  appKeyAgreement: 0x93,
  appDerivation: 0x94,
  dataToBeSigned: 0x9b,
  finalHash: 0x9e,
  mode: 0xa1,
  maxFiles: 0xb1,
  maxPrivate: 0xb2,
  maxPublic: 0xb3,
  maxSecret: 0xb4,
  maxSessions: 0xb7,
  privInfo: 0xc1,
  pubInfo: 0xc2,
  fileInfo: 0xc3,
  secretInfo: 0xc4,
} as const;

const FN_SIGN = 0x01;
const FN_KEYGEN = 0x02;
const FN_AGREE = 0x04;
const KEY_P256_PERSISTENT = 0x13;
const KEY_P256_VOLATILE = 0x14;
const HASH_SHA256 = 0x0001;
const SIG_ECDSA = 0x04;
const MODE_FULL_TEXT = 0x01;
const MODE_PAD_AND_SIGN = 0x03;
const ACCESS_READ = 0x01;
const ACCESS_UPDATE = 0x02;

const MAX_CHANNELS = 4; // basic channel 0 and logical channels 1..3
const MAX_SESSIONS = 8; // session numbers 00..07
const MAX_SIGN_TEXT = 8192; // full-text mode: bytes one session may accumulate
const MAX_CHAIN = 4096; // command chaining: bytes one chain may accumulate

const SW = {
  ok: 0x9000,
  wrongLength: 0x6700,
  channelNotSupported: 0x6881,
  smNotSupported: 0x6882,
  conditions: 0x6985,
  incorrectData: 0x6a80,
  functionNotSupported: 0x6a81,
  notFound: 0x6a82,
  incorrectP1P2: 0x6a86,
  insNotSupported: 0x6d00,
  signatureMismatch: 0x6d01,
  claNotSupported: 0x6e00,
  unknown: 0x6f00,
} as const;

/** A status word raised inside a command handler. */
class StatusWord extends Error {
  constructor(readonly sw: number) {
    super(`SW ${sw.toString(16)}`);
  }
}
function fail(sw: number): never {
  throw new StatusWord(sw);
}

// ---------------------------------------------------------------------------------------------
// State

interface StoredPrivateKey {
  id: string; // hex
  label: string;
  type: number;
  usage: number;
  functions: number;
  access: number;
  publicId: string; // the public key container filled by GENERATE KEY PAIR
  pkcs8?: string; // base64 DER; absent while the container is empty (volatile keys are never written)
  signatures: number;
}

interface StoredPublicKey {
  id: string;
  label: string;
  type: number;
  usage: number;
  functions: number;
  access: number;
  point?: string; // hex 04‖X‖Y
}

interface StoredFile {
  id: string;
  label: string;
  access: number;
  content: string; // base64
}

interface AppletState {
  format: 'seal-virtual-iotsafe/1';
  privateKeys: StoredPrivateKey[];
  publicKeys: StoredPublicKey[];
  files: StoredFile[];
  counters: { generated: number; signatures: number; agreements: number };
}

function writeAtomically(file: string, text: string): void {
  const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`;
  const fd = fs.openSync(tmp, 'wx', 0o600);
  try {
    fs.writeSync(fd, text);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

function newP256(): crypto.KeyObject {
  return crypto.generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
}

function pointOf(key: crypto.KeyObject): Buffer {
  const jwk = key.export({ format: 'jwk' });
  return Buffer.concat([Buffer.from([0x04]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
}

function publicKeyFromPoint(point: Buffer): crypto.KeyObject {
  if (point.length !== 65 || point[0] !== 0x04) fail(SW.incorrectData);
  try {
    return crypto.createPublicKey({
      key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33).toString('base64url') },
      format: 'jwk',
    });
  } catch {
    return fail(SW.incorrectData); // not a point on P-256
  }
}

function initialState(): AppletState {
  const device = newP256();
  const devicePoint = pointOf(device);
  return {
    format: 'seal-virtual-iotsafe/1',
    privateKeys: [
      { id: '01', label: 'client-key', type: KEY_P256_PERSISTENT, usage: 0x01, functions: FN_SIGN | FN_KEYGEN | FN_AGREE, access: ACCESS_READ | ACCESS_UPDATE, publicId: '01', signatures: 0 },
      {
        id: '02',
        label: 'device-key',
        type: KEY_P256_PERSISTENT,
        usage: 0x01,
        functions: FN_SIGN | FN_AGREE,
        access: ACCESS_READ,
        publicId: '02',
        pkcs8: device.export({ format: 'der', type: 'pkcs8' }).toString('base64'),
        signatures: 0,
      },
      { id: '03', label: 'ecdh-key', type: KEY_P256_VOLATILE, usage: 0x01, functions: FN_KEYGEN | FN_AGREE, access: ACCESS_READ | ACCESS_UPDATE, publicId: '03', signatures: 0 },
    ],
    publicKeys: [
      { id: '01', label: 'client-key', type: KEY_P256_PERSISTENT, usage: 0x01, functions: FN_SIGN | FN_AGREE, access: ACCESS_READ },
      { id: '02', label: 'device-key', type: KEY_P256_PERSISTENT, usage: 0x01, functions: FN_SIGN | FN_AGREE, access: ACCESS_READ, point: devicePoint.toString('hex') },
      { id: '03', label: 'ecdh-key', type: KEY_P256_VOLATILE, usage: 0x01, functions: FN_AGREE, access: ACCESS_READ },
      { id: '05', label: 'peer-key', type: KEY_P256_PERSISTENT, usage: 0x01, functions: FN_SIGN | FN_AGREE, access: ACCESS_READ | ACCESS_UPDATE },
    ],
    files: [
      { id: '01', label: 'device-cert', access: ACCESS_READ, content: selfSignedCertificate(device, 'seal-bridge virtual IoT SAFE device').toString('base64') },
      { id: '02', label: 'device-info', access: ACCESS_READ, content: Buffer.from('seal-bridge virtual IoT SAFE applet\n').toString('base64') },
    ],
    counters: { generated: 0, signatures: 0, agreements: 0 },
  };
}

// ---------------------------------------------------------------------------------------------
// DER and TLV helpers

function berLength(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  if (n < 0x100) return Buffer.from([0x81, n]);
  return Buffer.from([0x82, n >> 8, n & 0xff]);
}

function tlv(tag: number, value: Buffer | number[]): Buffer {
  const v = Buffer.isBuffer(value) ? value : Buffer.from(value);
  return Buffer.concat([Buffer.from([tag]), berLength(v.length), v]);
}

interface Tlv {
  tag: number;
  value: Buffer;
}

/** One level of 1-byte-tag BER-TLV objects; anything malformed is 6A80. */
function parseTlvs(buf: Buffer, twoByteLengthTags: ReadonlySet<number> = new Set()): Tlv[] {
  const out: Tlv[] = [];
  let i = 0;
  while (i < buf.length) {
    const tag = buf[i++]!;
    if ((tag & 0x1f) === 0x1f) fail(SW.incorrectData); // multi-byte tags are not IoT SAFE
    if (i >= buf.length) fail(SW.incorrectData);
    let len: number;
    if (twoByteLengthTags.has(tag) && buf[i] === 0x00) {
      if (i + 2 > buf.length) fail(SW.incorrectData);
      len = buf.readUInt16BE(i);
      i += 2;
    } else {
      const l0 = buf[i++]!;
      if (l0 < 0x80) len = l0;
      else if (l0 === 0x81) {
        if (i + 1 > buf.length) fail(SW.incorrectData);
        len = buf[i++]!;
      } else if (l0 === 0x82) {
        if (i + 2 > buf.length) fail(SW.incorrectData);
        len = buf.readUInt16BE(i);
        i += 2;
      } else return fail(SW.incorrectData);
    }
    if (i + len > buf.length) fail(SW.incorrectData);
    out.push({ tag, value: buf.subarray(i, i + len) });
    i += len;
  }
  return out;
}

function find(tlvs: Tlv[], tag: number): Buffer | undefined {
  return tlvs.find((t) => t.tag === tag)?.value;
}

function derSeq(...parts: Buffer[]): Buffer {
  return derTlv(0x30, Buffer.concat(parts));
}

function derTlv(tag: number, value: Buffer): Buffer {
  return Buffer.concat([Buffer.from([tag]), berLength(value.length), value]);
}

function derUnsignedInt(v: Buffer): Buffer {
  let i = 0;
  while (i < v.length - 1 && v[i] === 0) i++;
  let body = v.subarray(i);
  if (body[0]! & 0x80) body = Buffer.concat([Buffer.from([0]), body]);
  return derTlv(0x02, body);
}

function derOid(dotted: string): Buffer {
  const arcs = dotted.split('.').map(Number);
  const bytes = [arcs[0]! * 40 + arcs[1]!];
  for (const arc of arcs.slice(2)) {
    const chunk = [arc & 0x7f];
    for (let a = arc >>> 7; a > 0; a >>>= 7) chunk.unshift(0x80 | (a & 0x7f));
    bytes.push(...chunk);
  }
  return derTlv(0x06, Buffer.from(bytes));
}

function derName(cn: string): Buffer {
  const atv = (oid: string, value: string): Buffer => derTlv(0x31, derSeq(derOid(oid), derTlv(0x0c, Buffer.from(value, 'utf8'))));
  return derSeq(atv('2.5.4.10', 'seal-bridge test'), atv('2.5.4.3', cn));
}

/** A small self-signed X.509 v3 certificate (ecdsa-with-SHA256), DER. */
function selfSignedCertificate(key: crypto.KeyObject, cn: string): Buffer {
  const sigAlg = derSeq(derOid('1.2.840.10045.4.3.2'));
  const spki = crypto.createPublicKey(key).export({ format: 'der', type: 'spki' });
  const serial = crypto.randomBytes(12);
  serial[0]! &= 0x7f;
  const validity = derSeq(derTlv(0x17, Buffer.from('250101000000Z')), derTlv(0x18, Buffer.from('20491231235959Z')));
  const basicConstraints = derSeq(derOid('2.5.29.19'), derTlv(0x01, Buffer.from([0xff])), derTlv(0x04, derSeq()));
  const keyUsage = derSeq(derOid('2.5.29.15'), derTlv(0x01, Buffer.from([0xff])), derTlv(0x04, derTlv(0x03, Buffer.from([0x07, 0x80]))));
  const tbs = derSeq(
    derTlv(0xa0, derTlv(0x02, Buffer.from([2]))),
    derUnsignedInt(serial),
    sigAlg,
    derName(cn),
    validity,
    derName(cn),
    spki,
    derTlv(0xa3, derSeq(basicConstraints, keyUsage)),
  );
  const sig = crypto.sign('sha256', tbs, key);
  return derSeq(tbs, sigAlg, derTlv(0x03, Buffer.concat([Buffer.from([0]), sig])));
}

// ---------------------------------------------------------------------------------------------
// ECDSA over a supplied hash (mode 03 "pad and sign"): node:crypto always hashes the message
// itself, so the signature equation runs here with BigInt (FIPS 186-4 6.4), and k·G comes from
// node:crypto's ECDH. Tests check the result with node:crypto / openssl over the message.

const P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffffn;
const N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n;
const A = P - 3n;
const G = {
  x: 0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296n,
  y: 0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5n,
};

const mod = (a: bigint, m: bigint): bigint => ((a % m) + m) % m;
function inv(a: bigint, m: bigint): bigint {
  let [r0, r1] = [mod(a, m), m];
  let [s0, s1] = [1n, 0n];
  while (r1 !== 0n) {
    const q = r0 / r1;
    [r0, r1] = [r1, r0 - q * r1];
    [s0, s1] = [s1, s0 - q * s1];
  }
  return mod(s0, m);
}
const toInt = (b: Buffer): bigint => BigInt(`0x${b.toString('hex') || '0'}`);
const toBytes32 = (v: bigint): Buffer => Buffer.from(v.toString(16).padStart(64, '0'), 'hex');

type Point = { x: bigint; y: bigint } | null;
function add(p: Point, q: Point): Point {
  if (!p) return q;
  if (!q) return p;
  let l: bigint;
  if (p.x === q.x) {
    if (mod(p.y + q.y, P) === 0n) return null;
    l = mod((3n * p.x * p.x + A) * inv(2n * p.y, P), P);
  } else {
    l = mod((q.y - p.y) * inv(q.x - p.x, P), P);
  }
  const x = mod(l * l - p.x - q.x, P);
  return { x, y: mod(l * (p.x - x) - p.y, P) };
}
function mul(k: bigint, p: Point): Point {
  let r: Point = null;
  let a = p;
  for (let e = k; e > 0n; e >>= 1n) {
    if (e & 1n) r = add(r, a);
    a = add(a, a);
  }
  return r;
}

function signHash(key: crypto.KeyObject, hash: Buffer): { r: Buffer; s: Buffer } {
  const d = toInt(Buffer.from(key.export({ format: 'jwk' }).d!, 'base64url'));
  const z = toInt(hash);
  for (;;) {
    const k = mod(toInt(crypto.randomBytes(40)), N - 1n) + 1n;
    const ecdh = crypto.createECDH('prime256v1');
    ecdh.setPrivateKey(toBytes32(k));
    const r = mod(toInt(ecdh.getPublicKey().subarray(1, 33)), N);
    if (r === 0n) continue;
    const s = mod(inv(k, N) * (z + r * d), N);
    if (s === 0n) continue;
    return { r: toBytes32(r), s: toBytes32(s) };
  }
}

function verifyHash(point: Buffer, hash: Buffer, r: bigint, s: bigint): boolean {
  if (r <= 0n || r >= N || s <= 0n || s >= N) return false;
  const q = { x: toInt(point.subarray(1, 33)), y: toInt(point.subarray(33, 65)) };
  const w = inv(s, N);
  const x = add(mul(mod(toInt(hash) * w, N), G), mul(mod(r * w, N), q));
  return x !== null && mod(x.x, N) === r;
}

function derSignature(r: Buffer, s: Buffer): Buffer {
  return derSeq(derUnsignedInt(r), derUnsignedInt(s));
}

/** r and s from raw r‖s (64 bytes) or a DER ECDSA-Sig-Value; undefined when neither. */
function parseSignature(sig: Buffer): { r: bigint; s: bigint } | undefined {
  if (sig.length === 64) return { r: toInt(sig.subarray(0, 32)), s: toInt(sig.subarray(32)) };
  try {
    const outer = parseTlvs(sig);
    if (outer.length !== 1 || outer[0]!.tag !== 0x30) return undefined;
    const inner = parseTlvs(outer[0]!.value);
    if (inner.length !== 2 || inner[0]!.tag !== 0x02 || inner[1]!.tag !== 0x02) return undefined;
    return { r: toInt(inner[0]!.value), s: toInt(inner[1]!.value) };
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Command APDUs (ISO/IEC 7816-4 clause 5.1)

interface Command {
  cla: number;
  ins: number;
  p1: number;
  p2: number;
  data: Buffer;
  /** Ne: undefined when the command has no Le field; Le 00 (short) is 256, 0000 (extended) 65536. */
  ne: number | undefined;
}

function parseApdu(apdu: Buffer): Command {
  if (apdu.length < 4) fail(SW.wrongLength);
  const head = { cla: apdu[0]!, ins: apdu[1]!, p1: apdu[2]!, p2: apdu[3]! };
  const body = apdu.subarray(4);
  const empty = Buffer.alloc(0);
  if (body.length === 0) return { ...head, data: empty, ne: undefined };
  if (body.length === 1) return { ...head, data: empty, ne: body[0] || 256 };
  if (body[0] !== 0) {
    const lc = body[0]!;
    if (body.length === 1 + lc) return { ...head, data: body.subarray(1), ne: undefined };
    if (body.length === 2 + lc) return { ...head, data: body.subarray(1, 1 + lc), ne: body[1 + lc] || 256 };
    return fail(SW.wrongLength);
  }
  if (body.length === 3) return { ...head, data: empty, ne: body.readUInt16BE(1) || 65536 };
  if (body.length < 3) return fail(SW.wrongLength);
  const lc = body.readUInt16BE(1);
  if (lc === 0) return fail(SW.wrongLength);
  if (body.length === 3 + lc) return { ...head, data: body.subarray(3), ne: undefined };
  if (body.length === 5 + lc) return { ...head, data: body.subarray(3, 3 + lc), ne: body.readUInt16BE(3 + lc) || 65536 };
  return fail(SW.wrongLength);
}

interface ClassByte {
  channel: number;
  chained: boolean;
  secureMessaging: boolean;
}

/** First interindustry (0x0X/0x1X) and its proprietary twin (0x8X/0x9X), further interindustry (0x4X–0x7X, 0xCX–0xFX). */
function decodeCla(cla: number): ClassByte | undefined {
  if (cla === 0xff) return undefined;
  const group = cla & 0x60;
  if ((cla & 0x40) === 0 && group === 0x00) {
    return { channel: cla & 0x03, chained: (cla & 0x10) !== 0, secureMessaging: (cla & 0x0c) !== 0 };
  }
  if ((cla & 0x40) !== 0) {
    return { channel: 4 + (cla & 0x0f), chained: (cla & 0x10) !== 0, secureMessaging: (cla & 0x20) !== 0 };
  }
  return undefined; // 0x2X/0x3X/0xAX/0xBX: RFU or other standards
}

// ---------------------------------------------------------------------------------------------
// The applet

type Session =
  | { kind: 'sign'; keyId: string; mode: number; text: Buffer[]; textLength: number; done: boolean }
  | { kind: 'verify'; publicId: string; mode: number; text: Buffer[]; textLength: number; done: boolean }
  | { kind: 'put-public'; publicId: string; done: boolean };

interface ChannelState {
  selected: boolean;
  pending?: { data: Buffer; sw: number };
  chain?: { ins: number; p1: number; p2: number; parts: Buffer[]; length: number };
}

export function openVirtualIotSafe(stateDir: string, options: IotSafeQuirks = {}): VirtualIotSafe {
  fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  fs.chmodSync(stateDir, 0o700);
  const stateFile = path.join(stateDir, 'state.json');
  let state: AppletState;
  if (fs.existsSync(stateFile)) {
    state = JSON.parse(fs.readFileSync(stateFile, 'utf8')) as AppletState;
    if (state.format !== 'seal-virtual-iotsafe/1') throw new Error(`${stateFile}: unknown state format`);
  } else {
    state = initialState();
  }
  // volatile keys live in memory only
  const volatileKeys = new Map<string, crypto.KeyObject>();
  const save = (): void => {
    const copy: AppletState = JSON.parse(JSON.stringify(state)) as AppletState;
    for (const k of copy.privateKeys) if (k.type === KEY_P256_VOLATILE) delete k.pkcs8;
    for (const pk of copy.publicKeys) if (pk.type === KEY_P256_VOLATILE) delete pk.point;
    writeAtomically(stateFile, `${JSON.stringify(copy, null, 1)}\n`);
  };
  save();
  fs.chmodSync(stateFile, 0o600);

  let quirks: IotSafeQuirks = { ...options };

  const privateKeyOf = (k: StoredPrivateKey): crypto.KeyObject | undefined => {
    if (k.type === KEY_P256_VOLATILE) return volatileKeys.get(k.id);
    return k.pkcs8 ? crypto.createPrivateKey({ key: Buffer.from(k.pkcs8, 'base64'), format: 'der', type: 'pkcs8' }) : undefined;
  };
  const filledPublic = (pk: StoredPublicKey): Buffer | undefined => (pk.point ? Buffer.from(pk.point, 'hex') : undefined);

  /** The object named by exactly one of an ID tag and a label tag in `tlvs`. */
  function lookup<T extends { id: string; label: string }>(list: T[], tlvs: Tlv[], idTag: number, labelTag: number): T {
    const id = find(tlvs, idTag);
    const label = find(tlvs, labelTag);
    if ((id === undefined) === (label === undefined)) fail(SW.incorrectData);
    if (id !== undefined && (id.length === 0 || id.length > 0x14)) fail(SW.incorrectData);
    if (label !== undefined && (label.length === 0 || label.length > 0x3c)) fail(SW.incorrectData);
    const found = list.find((o) => (id !== undefined ? Buffer.from(o.id, 'hex').equals(id) : Buffer.from(o.label, 'utf8').equals(label!)));
    return found ?? fail(SW.notFound);
  }

  const publicKeyData = (point: Buffer): Buffer => tlv(TAG.publicKeyData, tlv(TAG.eccKeyField, tlv(TAG.eccPoint, point)));

  function privateInfo(k: StoredPrivateKey): Buffer {
    const filled = privateKeyOf(k) !== undefined;
    const parts = [
      tlv(TAG.privLabel, Buffer.from(k.label, 'utf8')),
      tlv(TAG.privId, Buffer.from(k.id, 'hex')),
      tlv(TAG.access, [k.access]),
      tlv(TAG.state, [filled ? 0x01 : 0x00]),
      tlv(TAG.keyType, [k.type]),
      tlv(TAG.keyUsage, [k.usage]),
      tlv(TAG.functions, [k.functions]),
    ];
    if (k.functions & FN_SIGN) parts.push(tlv(TAG.sigAlg, [SIG_ECDSA]), tlv(TAG.hash, [0x00, HASH_SHA256]));
    if (k.functions & FN_AGREE) parts.push(tlv(TAG.keyAgreement, [0x01]));
    return tlv(TAG.privInfo, Buffer.concat(parts));
  }

  function publicInfo(pk: StoredPublicKey): Buffer {
    const parts = [
      tlv(TAG.pubLabel, Buffer.from(pk.label, 'utf8')),
      tlv(TAG.pubId, Buffer.from(pk.id, 'hex')),
      tlv(TAG.access, [pk.access]),
      tlv(TAG.state, [pk.point ? 0x01 : 0x00]),
      tlv(TAG.keyType, [pk.type]),
      tlv(TAG.keyUsage, [pk.usage]),
      tlv(TAG.functions, [pk.functions]),
    ];
    if (pk.functions & FN_SIGN) parts.push(tlv(TAG.sigAlg, [SIG_ECDSA]), tlv(TAG.hash, [0x00, HASH_SHA256]));
    if (pk.functions & FN_AGREE) parts.push(tlv(TAG.keyAgreement, [0x01]));
    return tlv(TAG.pubInfo, Buffer.concat(parts));
  }

  function fileInfo(f: StoredFile): Buffer {
    const size = Buffer.from(f.content, 'base64').length;
    const sizeBytes = Buffer.alloc(2);
    if (quirks.fileSizeLittleEndian) sizeBytes.writeUInt16LE(size);
    else sizeBytes.writeUInt16BE(size);
    return tlv(
      TAG.fileInfo,
      Buffer.concat([tlv(TAG.fileLabel, Buffer.from(f.label, 'utf8')), tlv(TAG.fileId, Buffer.from(f.id, 'hex')), tlv(TAG.access, [f.access]), tlv(TAG.state, [0x01]), tlv(TAG.fileSize, sizeBytes)]),
    );
  }

  function applicationInfo(): Buffer {
    return Buffer.concat([
      tlv(TAG.version, [0x01]),
      tlv(TAG.appletId, Buffer.from('SEAL-VIOTSAFE', 'ascii')),
      tlv(TAG.maxFiles, [state.files.length]),
      tlv(TAG.maxPrivate, [state.privateKeys.length]),
      tlv(TAG.maxPublic, [state.publicKeys.length]),
      tlv(TAG.maxSecret, [0]),
      tlv(TAG.appFunctions, [FN_SIGN | FN_KEYGEN | FN_AGREE]),
      tlv(TAG.hash, [0x00, HASH_SHA256]),
      tlv(TAG.sigAlg, [SIG_ECDSA]),
      tlv(TAG.appKeyAgreement, [0x01]),
      tlv(TAG.appDerivation, [0x00]),
      tlv(TAG.maxSessions, [MAX_SESSIONS]),
    ]);
  }

  function signatureField(raw: { r: Buffer; s: Buffer }): Buffer {
    const body = quirks.signatureDer ? derSignature(raw.r, raw.s) : Buffer.concat([raw.r, raw.s]);
    if (quirks.tag33Length === 2) {
      const len = Buffer.alloc(2);
      len.writeUInt16BE(body.length);
      return Buffer.concat([Buffer.from([TAG.signature]), len, body]);
    }
    return tlv(TAG.signature, body);
  }

  // --- commands that need the applet selected; `sessions` is the front end's

  function getData(c: Command): Buffer {
    if (c.p1 === 0x00 && c.p2 === 0x00) return applicationInfo();
    if (c.p1 === 0x01) {
      if (c.p2 !== 0x00) fail(SW.incorrectP1P2);
      return Buffer.concat([...state.privateKeys.map(privateInfo), ...state.publicKeys.map(publicInfo), ...state.files.map(fileInfo)]);
    }
    if (c.p2 !== 0x00) fail(SW.incorrectP1P2);
    const tlvs = parseTlvs(c.data);
    switch (c.p1) {
      case TAG.privInfo:
        return privateInfo(lookup(state.privateKeys, tlvs, TAG.privId, TAG.privLabel));
      case TAG.pubInfo:
        return publicInfo(lookup(state.publicKeys, tlvs, TAG.pubId, TAG.pubLabel));
      case TAG.fileInfo:
        return fileInfo(lookup(state.files, tlvs, TAG.fileId, TAG.fileLabel));
      case TAG.secretInfo:
        return fail(SW.notFound); // no secret keys in this applet
      default:
        return fail(SW.incorrectP1P2);
    }
  }

  function generateKeyPair(c: Command): Buffer {
    if (c.p1 !== 0x00 || c.p2 !== 0x00) fail(SW.incorrectP1P2);
    const tlvs = parseTlvs(c.data);
    const k = lookup(state.privateKeys, tlvs, TAG.privId, TAG.privLabel);
    if (!(k.functions & FN_KEYGEN)) fail(SW.conditions);
    const pk = state.publicKeys.find((p) => p.id === k.publicId) ?? fail(SW.unknown);
    const key = newP256();
    const point = pointOf(key);
    if (k.type === KEY_P256_VOLATILE) volatileKeys.set(k.id, key);
    else k.pkcs8 = key.export({ format: 'der', type: 'pkcs8' }).toString('base64');
    pk.point = point.toString('hex');
    k.signatures = 0;
    state.counters.generated++;
    save();
    return Buffer.concat([tlv(TAG.privId, Buffer.from(k.id, 'hex')), tlv(TAG.pubId, Buffer.from(pk.id, 'hex')), publicKeyData(point)]);
  }

  function readPublicKey(c: Command): Buffer {
    if (c.p1 !== 0x00 || c.p2 !== 0x00) fail(SW.incorrectP1P2);
    const pk = lookup(state.publicKeys, parseTlvs(c.data), TAG.pubId, TAG.pubLabel);
    if (!(pk.access & ACCESS_READ)) fail(SW.conditions);
    return publicKeyData(filledPublic(pk) ?? fail(SW.conditions));
  }

  /** mode, hash and algorithm of a sign/verify init; only ECDSA with SHA-256 in modes 01 and 03. */
  function checkAlgorithms(tlvs: Tlv[]): number {
    const mode = find(tlvs, TAG.mode);
    const hash = find(tlvs, TAG.hash);
    const alg = find(tlvs, TAG.sigAlg);
    if (!mode || mode.length !== 1 || !hash || hash.length < 1 || hash.length > 2 || !alg || alg.length !== 1) fail(SW.incorrectData);
    if (mode![0] !== MODE_FULL_TEXT && mode![0] !== MODE_PAD_AND_SIGN) fail(SW.incorrectData);
    if (hash!.readUIntBE(0, hash!.length) !== HASH_SHA256 || alg![0] !== SIG_ECDSA) fail(SW.incorrectData);
    return mode![0]!;
  }

  function sessionCommand(c: Command, sessions: Map<number, Session>, kind: Session['kind']): Buffer {
    // P1 00 opens, 01 closes; P2 is the session number
    if (c.p2 >= MAX_SESSIONS) fail(SW.incorrectP1P2);
    if (c.p1 === 0x01) {
      sessions.delete(c.p2);
      return Buffer.alloc(0);
    }
    if (c.p1 !== 0x00) fail(SW.incorrectP1P2);
    const tlvs = parseTlvs(c.data);
    if (kind === 'sign') {
      const k = lookup(state.privateKeys, tlvs, TAG.privId, TAG.privLabel);
      const mode = checkAlgorithms(tlvs);
      if (!(k.functions & FN_SIGN) || !privateKeyOf(k)) fail(SW.conditions);
      sessions.set(c.p2, { kind, keyId: k.id, mode, text: [], textLength: 0, done: false });
    } else if (kind === 'verify') {
      const pk = lookup(state.publicKeys, tlvs, TAG.pubId, TAG.pubLabel);
      const mode = checkAlgorithms(tlvs);
      if (!(pk.functions & FN_SIGN) || !pk.point) fail(SW.conditions);
      sessions.set(c.p2, { kind, publicId: pk.id, mode, text: [], textLength: 0, done: false });
    } else {
      const pk = lookup(state.publicKeys, tlvs, TAG.pubId, TAG.pubLabel);
      if (!(pk.access & ACCESS_UPDATE)) fail(SW.conditions);
      sessions.set(c.p2, { kind, publicId: pk.id, done: false });
    }
    return Buffer.alloc(0);
  }

  /** The open, unfinished session `c.p2` of `kind`, else 6985. P1 80 is the last block, 00 more to come. */
  function updateSession<K extends Session['kind']>(c: Command, sessions: Map<number, Session>, kind: K): Extract<Session, { kind: K }> {
    if (c.p2 >= MAX_SESSIONS || (c.p1 !== 0x00 && c.p1 !== 0x80)) fail(SW.incorrectP1P2);
    const s = sessions.get(c.p2);
    if (!s || s.kind !== kind || s.done) return fail(SW.conditions);
    return s as Extract<Session, { kind: K }>;
  }

  /** Gathers the text of a full-text session, or the hash of a pad-and-sign one, from an update. */
  function hashOf(s: { mode: number; text: Buffer[]; textLength: number }, tlvs: Tlv[], last: boolean): Buffer | undefined {
    if (s.mode === MODE_PAD_AND_SIGN) {
      const h = find(tlvs, TAG.finalHash);
      if (!last || !h) return fail(SW.incorrectData);
      if (h.length !== 32) fail(SW.wrongLength);
      return h;
    }
    const t = find(tlvs, TAG.dataToBeSigned) ?? fail(SW.incorrectData);
    if (s.textLength + t.length > MAX_SIGN_TEXT) fail(SW.wrongLength);
    s.text.push(Buffer.from(t));
    s.textLength += t.length;
    return last ? crypto.createHash('sha256').update(Buffer.concat(s.text)).digest() : undefined;
  }

  function signUpdate(c: Command, sessions: Map<number, Session>): Buffer {
    const s = updateSession(c, sessions, 'sign');
    const last = c.p1 === 0x80;
    const hash = hashOf(s, parseTlvs(c.data), last);
    if (!hash) return Buffer.alloc(0);
    s.done = true;
    const k = state.privateKeys.find((x) => x.id === s.keyId) ?? fail(SW.unknown);
    const key = privateKeyOf(k) ?? fail(SW.conditions);
    const sig = signHash(key, hash);
    k.signatures++;
    state.counters.signatures++;
    save();
    return signatureField(sig);
  }

  function verifyUpdate(c: Command, sessions: Map<number, Session>): Buffer {
    const s = updateSession(c, sessions, 'verify');
    const last = c.p1 === 0x80;
    const tlvs = parseTlvs(c.data, quirks.tag33Length === 2 ? new Set([TAG.signature]) : undefined);
    const hash = hashOf(s, tlvs, last);
    if (!hash) return Buffer.alloc(0);
    s.done = true;
    const sig = parseSignature(find(tlvs, TAG.signature) ?? fail(SW.incorrectData)) ?? fail(SW.incorrectData);
    const pk = state.publicKeys.find((x) => x.id === s.publicId) ?? fail(SW.unknown);
    const point = filledPublic(pk) ?? fail(SW.conditions);
    if (!verifyHash(point, hash, sig.r, sig.s)) fail(SW.signatureMismatch);
    return Buffer.alloc(0);
  }

  function putPublicKeyUpdate(c: Command, sessions: Map<number, Session>): Buffer {
    const s = updateSession(c, sessions, 'put-public');
    if (c.p1 !== 0x80) fail(SW.incorrectP1P2); // a P-256 key fits in one block
    let level = parseTlvs(c.data);
    for (const tag of [TAG.publicKeyData, TAG.eccKeyField]) {
      const inner = find(level, tag);
      if (inner) level = parseTlvs(inner);
    }
    const point = find(level, TAG.eccPoint) ?? fail(SW.incorrectData);
    publicKeyFromPoint(point); // validates the point
    const pk = state.publicKeys.find((x) => x.id === s.publicId) ?? fail(SW.unknown);
    pk.point = Buffer.from(point).toString('hex');
    s.done = true;
    save();
    return Buffer.alloc(0);
  }

  function computeDh(c: Command): Buffer {
    if (c.p1 !== 0x00 || c.p2 !== 0x00) fail(SW.incorrectP1P2);
    const tlvs = parseTlvs(c.data);
    const k = lookup(state.privateKeys, tlvs, TAG.privId, TAG.privLabel);
    const pk = lookup(state.publicKeys, tlvs, TAG.pubId, TAG.pubLabel);
    if (!(k.functions & FN_AGREE) || !(pk.functions & FN_AGREE)) fail(SW.conditions);
    const priv = privateKeyOf(k) ?? fail(SW.conditions);
    const peer = publicKeyFromPoint(filledPublic(pk) ?? fail(SW.conditions));
    state.counters.agreements++;
    save();
    return crypto.diffieHellman({ privateKey: priv, publicKey: peer });
  }

  function readFile(c: Command): Buffer {
    const f = lookup(state.files, parseTlvs(c.data), TAG.fileId, TAG.fileLabel);
    if (!(f.access & ACCESS_READ)) fail(SW.conditions);
    const content = Buffer.from(f.content, 'base64');
    const offset = (c.p1 << 8) | c.p2;
    if (offset >= content.length) fail(SW.incorrectP1P2);
    return content.subarray(offset, offset + (c.ne ?? 256));
  }

  function getRandom(c: Command): Buffer {
    if (c.p1 !== 0x00 || c.p2 !== 0x00) fail(SW.incorrectP1P2);
    if (c.data.length > 0) fail(SW.wrongLength);
    return crypto.randomBytes(c.ne ?? 256);
  }

  function appletCommand(c: Command, sessions: Map<number, Session>): Buffer {
    switch (c.ins) {
      case 0xcb:
        return getData(c);
      case 0xb9:
        return generateKeyPair(c);
      case 0xcd:
        return readPublicKey(c);
      case 0x2a:
        return sessionCommand(c, sessions, 'sign');
      case 0x2b:
        return signUpdate(c, sessions);
      case 0x2c:
        return sessionCommand(c, sessions, 'verify');
      case 0x2d:
        return verifyUpdate(c, sessions);
      case 0x24:
        return sessionCommand(c, sessions, 'put-public');
      case 0xd8:
        return putPublicKeyUpdate(c, sessions);
      case 0x46:
        return computeDh(c);
      case 0x84:
        return getRandom(c);
      case 0xb0:
        return readFile(c);
      default:
        return fail(SW.insNotSupported);
    }
  }

  // --- front ends

  const ATR = (() => {
    // TS 3B, T0 8D (TD1 follows, 13 historical bytes), TD1 01 (T=1), historical bytes, TCK
    const hist = Buffer.from('SEAL IoT SAFE', 'ascii');
    const body = Buffer.concat([Buffer.from([0x8d, 0x01]), hist]);
    let tck = 0;
    for (const b of body) tck ^= b;
    return Buffer.concat([Buffer.from([0x3b]), body, Buffer.from([tck])]);
  })();

  function frontEnd(name: string, feOptions: IotSafeFrontEndOptions = {}): VirtualCard {
    let channels = new Map<number, ChannelState>([[0, { selected: false }]]);
    let sessions = new Map<number, Session>();

    const withSw = (data: Buffer, sw: number): Buffer => {
      const out = Buffer.alloc(data.length + 2);
      data.copy(out);
      out.writeUInt16BE(sw, data.length);
      return out;
    };

    /** Hands `data` out within Ne; what does not fit waits for GET RESPONSE behind 61xx. */
    const deliver = (ch: ChannelState, data: Buffer, sw: number, ne: number | undefined, announce: boolean): Buffer => {
      const room = announce ? 0 : (ne ?? 256);
      if (data.length <= room) return withSw(data, sw);
      ch.pending = { data: data.subarray(room), sw };
      const rest = data.length - room;
      return withSw(data.subarray(0, room), 0x6100 | (rest >= 256 ? 0 : rest));
    };

    const manageChannel = (c: Command, cls: ClassByte): Buffer => {
      if (c.p1 === 0x00) {
        if (c.data.length > 0) return withSw(Buffer.alloc(0), SW.wrongLength);
        let n = c.p2;
        if (n === 0) {
          for (n = 1; n < MAX_CHANNELS && channels.has(n); n++);
          if (n >= MAX_CHANNELS) return withSw(Buffer.alloc(0), SW.functionNotSupported);
        } else if (n >= MAX_CHANNELS || channels.has(n)) {
          return withSw(Buffer.alloc(0), SW.incorrectP1P2);
        }
        channels.set(n, { selected: false });
        return c.p2 === 0 ? withSw(Buffer.from([n]), SW.ok) : withSw(Buffer.alloc(0), SW.ok);
      }
      if (c.p1 === 0x80) {
        const n = c.p2 === 0 ? cls.channel : c.p2;
        if (n === 0 || !channels.has(n)) return withSw(Buffer.alloc(0), SW.incorrectP1P2);
        channels.delete(n); // sessions are card-wide: they stay open
        return withSw(Buffer.alloc(0), SW.ok);
      }
      return withSw(Buffer.alloc(0), SW.incorrectP1P2);
    };

    const select = (c: Command, ch: ChannelState): Buffer => {
      if (c.p1 !== 0x04) return withSw(Buffer.alloc(0), SW.notFound); // no file system here
      if ((c.p2 & 0xf3) !== 0x00) return withSw(Buffer.alloc(0), SW.incorrectP1P2); // first/only occurrence, FCI/FCP/none
      if (c.data.length < 5 || c.data.length > 16 || !IOTSAFE_AID.subarray(0, c.data.length).equals(c.data)) {
        ch.selected = false;
        return withSw(Buffer.alloc(0), SW.notFound);
      }
      ch.selected = true;
      ch.pending = undefined;
      if ((c.p2 & 0x0c) === 0x0c) return withSw(Buffer.alloc(0), SW.ok);
      return withSw(tlv(0x6f, tlv(0x84, IOTSAFE_AID)), SW.ok);
    };

    const transmit = (apdu: Buffer): Buffer => {
      let c: Command;
      try {
        c = parseApdu(apdu);
      } catch (e) {
        return withSw(Buffer.alloc(0), e instanceof StatusWord ? e.sw : SW.unknown);
      }
      const cls = decodeCla(c.cla);
      if (!cls) return withSw(Buffer.alloc(0), SW.claNotSupported);
      const ch = channels.get(cls.channel);
      if (!ch) return withSw(Buffer.alloc(0), SW.channelNotSupported);
      if (cls.secureMessaging) return withSw(Buffer.alloc(0), SW.smNotSupported);

      // GET RESPONSE: the rest of the last answer on this channel
      if (c.ins === 0xc0) {
        const p = ch.pending;
        if (!p) return withSw(Buffer.alloc(0), SW.conditions);
        if (c.p1 !== 0 || c.p2 !== 0) return withSw(Buffer.alloc(0), SW.incorrectP1P2);
        ch.pending = undefined;
        return deliver(ch, p.data, p.sw, c.ne ?? 256, false);
      }
      ch.pending = undefined;

      // command chaining (CLA b5): gather the data, run the command on the last part
      if (cls.chained) {
        const prev = ch.chain;
        if (prev && (prev.ins !== c.ins || prev.p1 !== c.p1 || prev.p2 !== c.p2)) {
          ch.chain = undefined;
          return withSw(Buffer.alloc(0), SW.conditions);
        }
        const chain = prev ?? { ins: c.ins, p1: c.p1, p2: c.p2, parts: [], length: 0 };
        if (chain.length + c.data.length > MAX_CHAIN) {
          ch.chain = undefined;
          return withSw(Buffer.alloc(0), SW.wrongLength);
        }
        chain.parts.push(Buffer.from(c.data));
        chain.length += c.data.length;
        ch.chain = chain;
        return withSw(Buffer.alloc(0), SW.ok);
      }
      if (ch.chain) {
        const chain = ch.chain;
        ch.chain = undefined;
        if (chain.ins !== c.ins || chain.p1 !== c.p1 || chain.p2 !== c.p2) return withSw(Buffer.alloc(0), SW.conditions);
        c = { ...c, data: Buffer.concat([...chain.parts, c.data]) };
      }

      if (c.ins === 0x70) return manageChannel(c, cls);
      if (c.ins === 0xa4) {
        const r = select(c, ch);
        return r.length > 2 ? deliver(ch, r.subarray(0, r.length - 2), SW.ok, c.ne, feOptions.t0 === true || quirks.getResponse === true) : r;
      }
      if (!ch.selected) return withSw(Buffer.alloc(0), SW.insNotSupported);

      let data: Buffer;
      try {
        data = appletCommand(c, sessions);
      } catch (e) {
        if (e instanceof StatusWord) return withSw(Buffer.alloc(0), e.sw);
        return withSw(Buffer.alloc(0), SW.unknown); // no details: they could carry state
      }
      if (data.length === 0) return withSw(data, SW.ok);
      // T=0 style: a case 2 command with the wrong Le gets 6Cxx (resend with Le = xx)
      const t0 = feOptions.t0 === true;
      const case2 = c.data.length === 0 && c.ne !== undefined;
      if ((t0 || quirks.t0WrongLe) && case2 && data.length <= 256 && c.ne !== data.length) {
        return withSw(Buffer.alloc(0), 0x6c00 | (data.length & 0xff));
      }
      // T=0 case 4, or the getResponse quirk: the data waits behind 61xx for GET RESPONSE
      const announce = quirks.getResponse === true || (t0 && !case2);
      return deliver(ch, data, SW.ok, c.ne, announce);
    };

    return {
      name,
      atr: () => Buffer.from(ATR),
      transmit,
      reset(): void {
        channels = new Map([[0, { selected: false }]]);
        sessions = new Map();
      },
    };
  }

  return {
    frontEnd,
    get quirks(): Readonly<IotSafeQuirks> {
      return { ...quirks };
    },
    setQuirks(q: IotSafeQuirks): void {
      quirks = { ...quirks, ...q };
    },
    describe() {
      return {
        privateKeys: state.privateKeys.map((k) => ({ id: k.id, label: k.label, filled: privateKeyOf(k) !== undefined, signatures: k.signatures })),
        publicKeys: state.publicKeys.map((p) => ({ id: p.id, label: p.label, filled: p.point !== undefined })),
        files: state.files.map((f) => ({ id: f.id, label: f.label, size: Buffer.from(f.content, 'base64').length })),
      };
    },
  };
}
