/**
 * A virtual PIV card (NIST SP 800-73-4 parts 1–2) with the YubiKey 5 extensions that
 * yubico-piv-tool and OpenSC expect, for seal-bridge's tests. It is a `VirtualCard` (card.ts) that
 * `connectToVpcd` (vpcd.ts) plugs into pcscd. Test code only, never product code.
 *
 * Implemented
 * - ATR of a YubiKey 5 (USB CCID, historical bytes with "YubiKey"); no applet is selected after
 *   power-on or reset, as on a YubiKey: SELECT the PIV AID first (a prefix of at least
 *   `A0 00 00 03 08` selects; the answer is the application property template). SELECT of another
 *   AID answers 6A82 and leaves the selection as it was; re-SELECTing PIV clears the security
 *   status (PIN and management key), as libykpiv relies on.
 * - VERIFY (PIN 80; also PUK 81 as an extension: empty VERIFY reads its counter), CHANGE REFERENCE
 *   DATA (80/81), RESET RETRY COUNTER; retry counters persisted (default 3/3), `63Cx` / `6983`;
 *   VERIFY P1=FF resets the PIN status. The PIN must be 6–8 bytes padded with FF to 8.
 * - Management key (9B) authentication through GENERAL AUTHENTICATE: mutual (witness 80 →
 *   80+81 → 82), external (81 00 → 82) and card-only (81 → 82), for 3DES (03, also 00) and
 *   AES-128/192/256 (08/0A/0C); only the configured algorithm is accepted.
 * - GENERATE ASYMMETRIC KEY PAIR (RSA-1024/2048, P-256, P-384; PIN policy AA, touch policy AB) in
 *   9A 9C 9D 9E 82–95; YubiKey IMPORT KEY (FE) into those and F9.
 * - GENERAL AUTHENTICATE with a key slot: ECDSA over the host's digest (DER signature), raw RSA
 *   (sign and decrypt alike), ECDH (x-coordinate). PIN policy enforced per key: never / once per
 *   session / always (one verified PIN per operation; default for 9C).
 * - GET DATA / PUT DATA for 5FC1xx and 5FFFxx objects (53 wrapper), discovery 7E (read-only);
 *   printed information, fingerprints, facial image and iris objects need the PIN to be read;
 *   CHUID and CCC are written when the card is created; an empty 53 deletes an object.
 * - YubiKey: GET VERSION (FD, 5.4.3 by default), GET SERIAL (F8), GET METADATA (F7, for key slots,
 *   9B, 80, 81), ATTEST (F9, P1 = slot; the attestation key and its self-signed certificate in
 *   object 5FFF01 are made when the card is created), SET MANAGEMENT KEY (FF), SET PIN RETRIES
 *   (FA: resets PIN and PUK to 123456 / 12345678 as a YubiKey does), RESET (FB, only with PIN and
 *   PUK blocked; back to the factory PIN, PUK and 3DES management key, attestation kept).
 * - Command chaining (CLA 10), `61xx` + GET RESPONSE for long answers to short APDUs, extended
 *   length APDUs. Malformed input gets a status word (6700, 6A80, 6A86, 6D00, 6E00, …), never a crash.
 *
 * Not implemented: secure messaging and the virtual contact interface (SP 800-73-4 4.x), pairing
 * code, biometric on-card comparison, logical channels (6881), touch (touch policies are stored and
 * reported, never waited for), Ed25519/X25519 and RSA-3072/4096 (YubiKey 5.7), PIN-protected
 * management key (YubiKey "PIN-protected" admin data is stored as a plain object, not acted on),
 * key history object maintenance (store 5FC10C yourself if OpenSC must see retired keys), MOVE KEY
 * and DELETE KEY (5.7).
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import type { VirtualCard } from './card.js';
import {
  MGMT_ALGS,
  attestSlot,
  createAttestationIdentity,
  ecdhSharedX,
  ecdsaSignDigest,
  generateKey,
  importKey,
  isEcAlg,
  isKeyAlg,
  mgmtAlgById,
  mgmtCipher,
  pivPublicKey,
  rsaRaw,
  type MgmtAlgName,
} from './piv-crypto.js';
import {
  DEFAULT_MGMT_KEY,
  DEFAULT_PIN,
  DEFAULT_PUK,
  PIN_POLICY,
  PivStore,
  TOUCH_POLICY,
  slotHex,
  type Counter,
  type PivState,
  type SlotKey,
} from './piv-state.js';
import { findTag, parseTlvs, tlv } from './piv-tlv.js';

export interface VirtualPivCardOptions {
  /** Name in logs (default "PIV"). */
  name?: string;
  /** Management key algorithm of a card created now (default 3des: yubico-piv-tool 2.2 knows no AES). Ignored when the state exists. */
  mgmtAlg?: MgmtAlgName;
  /** Firmware version reported by GET VERSION and attestation (default 5.4.3). */
  version?: [number, number, number];
  /** Receives one line per notable event (never a secret). */
  log?: (line: string) => void;
}

/** YubiKey 5 (USB) ATR: T=1, historical bytes 80 73 C0 21 C0 57 "YubiKey". */
const ATR = Buffer.from('3BFD1300008131FE158073C021C0575975626 94B657940'.replace(/ /g, ''), 'hex');
const PIV_AID = Buffer.from('A000000308000010000100', 'hex');
/** Application property template (SP 800-73-4 Part 2 Table 3), as a YubiKey answers it. */
const APT = tlv(0x61, tlv(0x4f, PIV_AID.subarray(5)), tlv(0x79, tlv(0x4f, PIV_AID.subarray(0, 5))));
/** Discovery object: PIV AID, PIN usage policy 40 00 (PIV PIN only). */
const DISCOVERY = tlv(0x7e, tlv(0x4f, PIV_AID), tlv(0x5f2f, Buffer.from([0x40, 0x00])));

const SW = {
  OK: 0x9000,
  WRONG_LENGTH: 0x6700,
  NO_LOGICAL_CHANNEL: 0x6881,
  NO_SECURE_MESSAGING: 0x6882,
  SECURITY: 0x6982,
  BLOCKED: 0x6983,
  CONDITIONS: 0x6985,
  WRONG_DATA: 0x6a80,
  NO_SPACE: 0x6a84,
  NOT_FOUND: 0x6a82,
  WRONG_P1P2: 0x6a86,
  UNKNOWN_INS: 0x6d00,
  UNKNOWN_CLA: 0x6e00,
  FAULT: 0x6f00,
} as const;

/** Key slots that take generated keys, and their certificate objects (SP 800-73-4 Part 1 Table 3/4). */
const CERT_OBJECT: Record<number, number> = { 0x9a: 0x5fc105, 0x9c: 0x5fc10a, 0x9d: 0x5fc10b, 0x9e: 0x5fc101, 0xf9: 0x5fff01 };
for (let s = 0x82; s <= 0x95; s++) CERT_OBJECT[s] = 0x5fc10d + (s - 0x82);
const isKeySlot = (slot: number): boolean => slot !== 0xf9 && CERT_OBJECT[slot] !== undefined;
const ATTESTATION_SLOT = 0xf9;
const MGMT_REF = 0x9b;
const PIN_REF = 0x80;
const PUK_REF = 0x81;
/** Objects readable only after PIN verification (SP 800-73-4 Part 1 Table 2, access rule "PIN"). */
const PIN_PROTECTED_OBJECTS = new Set([0x5fc103, 0x5fc108, 0x5fc109, 0x5fc121]);
/** YubiKey's largest data object. */
const MAX_OBJECT = 3063;
const MAX_CHAIN = 16 * 1024;

const defaultPinPolicy = (slot: number): number => (slot === 0x9c ? PIN_POLICY.ALWAYS : slot === 0x9e ? PIN_POLICY.NEVER : PIN_POLICY.ONCE);

interface Command {
  cla: number;
  ins: number;
  p1: number;
  p2: number;
  data: Buffer;
  /** Expected response length; undefined when the APDU carried no Le. 0 in short form means 256. */
  le: number | undefined;
  extended: boolean;
}

type Answer = { sw: number; data?: Buffer };
const sw = (code: number): Answer => ({ sw: code });
const ok = (data?: Buffer): Answer => (data ? { sw: SW.OK, data } : { sw: SW.OK });

function parseApdu(apdu: Buffer): Command | undefined {
  if (apdu.length < 4) return undefined;
  const [cla, ins, p1, p2] = [apdu[0]!, apdu[1]!, apdu[2]!, apdu[3]!];
  const base = { cla, ins, p1, p2 };
  const body = apdu.subarray(4);
  if (body.length === 0) return { ...base, data: Buffer.alloc(0), le: undefined, extended: false };
  if (body.length === 1) return { ...base, data: Buffer.alloc(0), le: body[0] === 0 ? 256 : body[0]!, extended: false };
  if (body[0] !== 0) {
    const lc = body[0]!;
    if (body.length === 1 + lc) return { ...base, data: body.subarray(1), le: undefined, extended: false };
    if (body.length === 2 + lc) {
      const le = body[1 + lc]!;
      return { ...base, data: body.subarray(1, 1 + lc), le: le === 0 ? 256 : le, extended: false };
    }
    return undefined;
  }
  // extended length: 00 then two bytes
  if (body.length === 3) {
    const le = body.readUInt16BE(1);
    return { ...base, data: Buffer.alloc(0), le: le === 0 ? 65536 : le, extended: true };
  }
  if (body.length < 3) return undefined;
  const lc = body.readUInt16BE(1);
  if (lc === 0) return undefined;
  if (body.length === 3 + lc) return { ...base, data: body.subarray(3), le: undefined, extended: true };
  if (body.length === 5 + lc) {
    const le = body.readUInt16BE(3 + lc);
    return { ...base, data: body.subarray(3, 3 + lc), le: le === 0 ? 65536 : le, extended: true };
  }
  return undefined;
}

const statusBytes = (code: number): Buffer => Buffer.from([code >> 8, code & 0xff]);
const eq = (a: Buffer, b: Buffer): boolean => a.length === b.length && timingSafeEqual(a, b);

/** A PIN or PUK as VERIFY carries it: 6–8 bytes padded with FF to 8. */
function padPin(value: string): Buffer {
  const b = Buffer.alloc(8, 0xff);
  b.write(value, 'latin1');
  return b;
}
function unpadPin(block: Buffer): string | undefined {
  if (block.length !== 8) return undefined;
  let end = 8;
  while (end > 0 && block[end - 1] === 0xff) end--;
  const body = block.subarray(0, end);
  if (body.length < 6 || body.includes(0xff)) return undefined;
  return body.toString('latin1');
}

interface Session {
  selected: boolean;
  pinVerified: boolean;
  /** A PIN verified and not yet spent by a key whose policy is "always". */
  pinAlwaysArmed: boolean;
  mgmtAuthenticated: boolean;
  /** Witness of a mutual authentication in progress (plain). */
  witness?: Buffer;
  /** Challenge of an external authentication in progress (plain). */
  challenge?: Buffer;
  chain?: { ins: number; p1: number; p2: number; parts: Buffer[]; length: number };
  /** The rest of a long answer, for GET RESPONSE. */
  pending?: Buffer;
}

const freshSession = (): Session => ({ selected: false, pinVerified: false, pinAlwaysArmed: false, mgmtAuthenticated: false });

class VirtualPivCard implements VirtualCard {
  readonly name: string;
  private readonly store: PivStore;
  private readonly version: [number, number, number];
  private readonly log: (line: string) => void;
  private session: Session = freshSession();
  /** Finishes the card's creation (attestation certificate); every command waits for it. */
  private readonly ready: Promise<void>;

  constructor(stateDir: string, options: VirtualPivCardOptions) {
    this.name = options.name ?? 'PIV';
    this.version = options.version ?? [5, 4, 3];
    this.log = options.log ?? (() => {});
    this.store = new PivStore(stateDir, options.mgmtAlg ?? '3des', (serial) => this.initialState(serial));
    this.ready = this.finishCreation().catch((e: unknown) => {
      this.log(`${this.name}: could not create the attestation certificate: ${e instanceof Error ? e.message : String(e)}`);
    });
  }

  private get state(): PivState {
    return this.store.state;
  }

  private initialState(serial: number): PivState {
    const guid = randomBytes(16);
    // CHUID (SP 800-73-4 Part 1 Table 9): FASC-N of the test agency code 9999, GUID, expiry, empty signature
    const fascn = Buffer.from('D4E739DA739CED39CE739D836858210842108421C84210C3EB', 'hex');
    const chuid = Buffer.concat([tlv(0x30, fascn), tlv(0x34, guid), tlv(0x35, Buffer.from('20991231', 'ascii')), tlv(0x3e), tlv(0xfe)]);
    // CCC (Table 8): card identifier with GSC-RID A0 00 00 01 16, version 21, no extra applications
    const ccc = Buffer.concat([
      tlv(0xf0, Buffer.from('A000000116FF02', 'hex'), randomBytes(14)),
      tlv(0xf1, Buffer.from([0x21])),
      tlv(0xf2, Buffer.from([0x21])),
      tlv(0xf3),
      tlv(0xf4, Buffer.from([0x00])),
      tlv(0xf5, Buffer.from([0x10])),
      tlv(0xf6),
      tlv(0xf7),
      tlv(0xfa),
      tlv(0xfb),
      tlv(0xfc),
      tlv(0xfd),
      tlv(0xfe),
    ]);
    return {
      format: 1,
      serial,
      pin: { max: 3, left: 3 },
      puk: { max: 3, left: 3 },
      keys: {},
      objects: { '5fc102': chuid.toString('base64'), '5fc107': ccc.toString('base64') },
    };
  }

  private async finishCreation(): Promise<void> {
    if (this.state.keys[slotHex(ATTESTATION_SLOT)] && this.state.objects['5fff01']) return;
    const { key, certDer } = await createAttestationIdentity(this.state.serial);
    this.state.keys[slotHex(ATTESTATION_SLOT)] = { ...key, pinPolicy: PIN_POLICY.NEVER, touchPolicy: TOUCH_POLICY.NEVER, origin: 'imported' };
    this.state.objects['5fff01'] = Buffer.concat([tlv(0x70, certDer), tlv(0x71, Buffer.from([0])), tlv(0xfe)]).toString('base64');
    this.store.save();
    this.log(`${this.name}: created (serial ${this.state.serial}, management key ${this.store.secrets.mgmtAlg})`);
  }

  atr(): Buffer {
    return Buffer.from(ATR);
  }

  reset(): void {
    this.session = freshSession();
  }

  async transmit(apdu: Buffer): Promise<Buffer> {
    await this.ready;
    let answer: Answer;
    let cmd: Command | undefined;
    try {
      cmd = parseApdu(apdu);
      answer = cmd ? await this.dispatch(cmd) : sw(SW.WRONG_LENGTH);
    } catch (e) {
      this.log(`${this.name}: fault: ${e instanceof Error ? e.message : String(e)}`);
      answer = sw(SW.FAULT);
    }
    return this.encode(answer, cmd);
  }

  /** Puts an answer on the wire: long data goes out in pieces of Le (256 for short APDUs) with `61xx`. */
  private encode(answer: Answer, cmd: Command | undefined): Buffer {
    const withData = answer.sw === SW.OK || answer.sw >> 8 === 0x61;
    const data = withData ? (answer.data ?? Buffer.alloc(0)) : Buffer.alloc(0);
    if (cmd?.ins !== 0xc0) this.session.pending = undefined;
    const max = cmd?.le ?? (cmd?.extended ? 65536 : 256);
    if (data.length <= max || answer.sw !== SW.OK) return Buffer.concat([data, statusBytes(answer.sw)]);
    const rest = data.subarray(max);
    this.session.pending = rest;
    return Buffer.concat([data.subarray(0, max), Buffer.from([0x61, rest.length >= 256 ? 0 : rest.length])]);
  }

  private async dispatch(cmd: Command): Promise<Answer> {
    const claBase = cmd.cla & ~0x10;
    if (cmd.cla & 0x80) return sw(SW.UNKNOWN_CLA);
    if (claBase & 0x0c) return sw(SW.NO_SECURE_MESSAGING);
    if (claBase & 0x03) return sw(SW.NO_LOGICAL_CHANNEL);
    if (claBase !== 0) return sw(SW.UNKNOWN_CLA);

    if (cmd.ins === 0xc0) return this.getResponse(cmd);

    // command chaining (ISO 7816-4 5.1.1.1): collect the pieces, run the command on the last one
    const chain = this.session.chain;
    if (cmd.cla & 0x10) {
      const same = chain && chain.ins === cmd.ins && chain.p1 === cmd.p1 && chain.p2 === cmd.p2;
      const next = same ? chain : { ins: cmd.ins, p1: cmd.p1, p2: cmd.p2, parts: [], length: 0 };
      next.parts.push(Buffer.from(cmd.data));
      next.length += cmd.data.length;
      if (next.length > MAX_CHAIN) {
        this.session.chain = undefined;
        return sw(SW.WRONG_LENGTH);
      }
      this.session.chain = next;
      return ok();
    }
    if (chain) {
      this.session.chain = undefined;
      if (chain.ins === cmd.ins && chain.p1 === cmd.p1 && chain.p2 === cmd.p2) {
        cmd = { ...cmd, data: Buffer.concat([...chain.parts, cmd.data]) };
      }
    }

    if (cmd.ins === 0xa4) return this.select(cmd);
    if (cmd.ins === 0x70) return sw(SW.NO_LOGICAL_CHANNEL); // MANAGE CHANNEL
    if (!this.session.selected) return sw(SW.UNKNOWN_INS);
    switch (cmd.ins) {
      case 0x20:
        return this.verify(cmd);
      case 0x24:
        return this.changeReference(cmd);
      case 0x2c:
        return this.resetRetryCounter(cmd);
      case 0x47:
        return this.generate(cmd);
      case 0x87:
        return this.generalAuthenticate(cmd);
      case 0xcb:
        return this.getData(cmd);
      case 0xdb:
        return this.putData(cmd);
      case 0xfd:
        return this.getVersion(cmd);
      case 0xf8:
        return this.getSerial(cmd);
      case 0xf7:
        return this.getMetadata(cmd);
      case 0xf9:
        return this.attest(cmd);
      case 0xfe:
        return this.importKey(cmd);
      case 0xff:
        return this.setManagementKey(cmd);
      case 0xfa:
        return this.setPinRetries(cmd);
      case 0xfb:
        return this.factoryReset(cmd);
      default:
        return sw(SW.UNKNOWN_INS);
    }
  }

  private getResponse(cmd: Command): Answer {
    if (cmd.p1 !== 0 || cmd.p2 !== 0) return sw(SW.WRONG_P1P2);
    const pending = this.session.pending;
    if (!pending) return sw(SW.CONDITIONS);
    const max = cmd.le ?? 256;
    const now = pending.subarray(0, max);
    const rest = pending.subarray(now.length);
    this.session.pending = rest.length ? rest : undefined;
    if (rest.length) return { sw: 0x6100 | (rest.length >= 256 ? 0 : rest.length), data: now };
    return ok(now);
  }

  private select(cmd: Command): Answer {
    if (cmd.p1 !== 0x04) return sw(cmd.p1 === 0x00 || cmd.p1 === 0x08 || cmd.p1 === 0x02 ? SW.NOT_FOUND : SW.WRONG_P1P2);
    if (cmd.p2 !== 0x00 && cmd.p2 !== 0x0c) return sw(SW.WRONG_P1P2);
    const aid = cmd.data;
    if (aid.length < 5 || aid.length > PIV_AID.length || !aid.equals(PIV_AID.subarray(0, aid.length))) return sw(SW.NOT_FOUND);
    // a (re-)selection starts a new PIV session: nothing verified or authenticated
    this.session = { ...freshSession(), selected: true };
    return cmd.p2 === 0x0c ? ok() : ok(APT);
  }

  // ---- PIN and PUK -------------------------------------------------------------------------

  private counterOf(ref: number): Counter {
    return ref === PIN_REF ? this.state.pin : this.state.puk;
  }

  /** Checks a PIN or PUK block against the stored value, spending a try on a mismatch. */
  private checkReference(ref: number, block: Buffer): Answer {
    const counter = this.counterOf(ref);
    if (counter.left === 0) return sw(SW.BLOCKED);
    const value = ref === PIN_REF ? this.store.secrets.pin : this.store.secrets.puk;
    // a block that is no PIN at all (under 6 bytes, FF inside) is refused without spending a try
    if (unpadPin(block) === undefined) return sw(SW.WRONG_DATA);
    if (!eq(block, padPin(value))) {
      counter.left -= 1;
      this.store.save();
      return sw(0x63c0 | Math.min(counter.left, 15));
    }
    if (counter.left !== counter.max) {
      counter.left = counter.max;
      this.store.save();
    }
    return ok();
  }

  private verify(cmd: Command): Answer {
    if (cmd.p2 !== PIN_REF && cmd.p2 !== PUK_REF) return sw(SW.WRONG_P1P2);
    if (cmd.p1 === 0xff) {
      // reset the security status of the reference (SP 800-73-4 Part 2 3.2.1)
      if (cmd.data.length) return sw(SW.WRONG_LENGTH);
      if (cmd.p2 === PIN_REF) Object.assign(this.session, { pinVerified: false, pinAlwaysArmed: false });
      return ok();
    }
    if (cmd.p1 !== 0x00) return sw(SW.WRONG_P1P2);
    const counter = this.counterOf(cmd.p2);
    if (cmd.data.length === 0) {
      if (cmd.p2 === PIN_REF && this.session.pinVerified) return ok();
      return sw(counter.left === 0 ? SW.BLOCKED : 0x63c0 | Math.min(counter.left, 15));
    }
    if (cmd.data.length !== 8) return sw(SW.WRONG_LENGTH);
    const result = this.checkReference(cmd.p2, cmd.data);
    if (cmd.p2 === PIN_REF) {
      const good = result.sw === SW.OK;
      this.session.pinVerified = good;
      this.session.pinAlwaysArmed = good;
    }
    return result;
  }

  private changeReference(cmd: Command): Answer {
    if (cmd.p1 !== 0x00 || (cmd.p2 !== PIN_REF && cmd.p2 !== PUK_REF)) return sw(SW.WRONG_P1P2);
    if (cmd.data.length !== 16) return sw(SW.WRONG_LENGTH);
    const next = unpadPin(cmd.data.subarray(8));
    if (this.counterOf(cmd.p2).left === 0) return sw(SW.BLOCKED);
    if (next === undefined) return sw(SW.WRONG_DATA);
    const result = this.checkReference(cmd.p2, cmd.data.subarray(0, 8));
    if (result.sw !== SW.OK) {
      if (cmd.p2 === PIN_REF) Object.assign(this.session, { pinVerified: false, pinAlwaysArmed: false });
      return result;
    }
    if (cmd.p2 === PIN_REF) this.store.secrets.pin = next;
    else this.store.secrets.puk = next;
    this.store.saveSecrets();
    this.log(`${this.name}: ${cmd.p2 === PIN_REF ? 'PIN' : 'PUK'} changed`);
    return ok();
  }

  private resetRetryCounter(cmd: Command): Answer {
    if (cmd.p1 !== 0x00 || cmd.p2 !== PIN_REF) return sw(SW.WRONG_P1P2);
    if (cmd.data.length !== 16) return sw(SW.WRONG_LENGTH);
    const next = unpadPin(cmd.data.subarray(8));
    if (this.state.puk.left === 0) return sw(SW.BLOCKED);
    if (next === undefined) return sw(SW.WRONG_DATA);
    const result = this.checkReference(PUK_REF, cmd.data.subarray(0, 8));
    if (result.sw !== SW.OK) return result;
    this.store.secrets.pin = next;
    this.state.pin.left = this.state.pin.max;
    this.store.saveSecrets();
    this.store.save();
    this.log(`${this.name}: PIN unblocked with the PUK`);
    return ok();
  }

  // ---- keys --------------------------------------------------------------------------------

  private async generate(cmd: Command): Promise<Answer> {
    if (cmd.p1 !== 0x00 || !isKeySlot(cmd.p2)) return sw(SW.WRONG_P1P2);
    if (!this.session.mgmtAuthenticated) return sw(SW.SECURITY);
    const outer = parseTlvs(cmd.data);
    const template = outer && outer.length === 1 && outer[0]!.tag === 0xac ? parseTlvs(outer[0]!.value) : undefined;
    const algByte = template ? findTag(template, 0x80) : undefined;
    if (!template || !algByte || algByte.length !== 1) return sw(SW.WRONG_DATA);
    const alg = algByte[0]!;
    if (!isKeyAlg(alg)) return sw(SW.WRONG_DATA);
    const policies = this.readPolicies(template, cmd.p2);
    if (!policies) return sw(SW.WRONG_DATA);
    const key = await generateKey(alg);
    this.state.keys[slotHex(cmd.p2)] = { ...key, ...policies, origin: 'generated' };
    this.store.save();
    this.log(`${this.name}: generated a key (algorithm ${alg.toString(16)}) in slot ${slotHex(cmd.p2)}`);
    return ok(tlv(0x7f49, pivPublicKey(key)));
  }

  /** PIN policy (AA) and touch policy (AB) of a generate or import template; 00 means the slot's default. */
  private readPolicies(template: { tag: number; value: Buffer }[], slot: number): { pinPolicy: number; touchPolicy: number } | undefined {
    const pin = findTag(template, 0xaa);
    const touch = findTag(template, 0xab);
    if ((pin && pin.length !== 1) || (touch && touch.length !== 1)) return undefined;
    const pinPolicy = pin && pin[0] !== 0 ? pin[0]! : defaultPinPolicy(slot);
    const touchPolicy = touch && touch[0] !== 0 ? touch[0]! : TOUCH_POLICY.NEVER;
    if (pinPolicy > PIN_POLICY.ALWAYS || touchPolicy > TOUCH_POLICY.CACHED) return undefined;
    return { pinPolicy, touchPolicy };
  }

  private importKey(cmd: Command): Answer {
    if (!isKeyAlg(cmd.p1) || (!isKeySlot(cmd.p2) && cmd.p2 !== ATTESTATION_SLOT)) return sw(SW.WRONG_P1P2);
    if (!this.session.mgmtAuthenticated) return sw(SW.SECURITY);
    const tlvs = parseTlvs(cmd.data);
    if (!tlvs) return sw(SW.WRONG_DATA);
    const policies = this.readPolicies(tlvs, cmd.p2);
    if (!policies) return sw(SW.WRONG_DATA);
    const parts = new Map(tlvs.filter((t) => t.tag >= 1 && t.tag <= 6).map((t) => [t.tag, Buffer.from(t.value)]));
    const key = importKey(cmd.p1, parts);
    if (!key) return sw(SW.WRONG_DATA);
    this.state.keys[slotHex(cmd.p2)] = { ...key, ...policies, origin: 'imported' };
    this.store.save();
    this.log(`${this.name}: imported a key (algorithm ${cmd.p1.toString(16)}) into slot ${slotHex(cmd.p2)}`);
    return ok();
  }

  private generalAuthenticate(cmd: Command): Answer {
    const outer = parseTlvs(cmd.data);
    if (!outer || outer.length !== 1 || outer[0]!.tag !== 0x7c) return sw(SW.WRONG_DATA);
    const inner = parseTlvs(outer[0]!.value);
    if (!inner) return sw(SW.WRONG_DATA);
    if (cmd.p2 === MGMT_REF) return this.authenticateManagementKey(cmd.p1, inner);
    if (!isKeySlot(cmd.p2)) return sw(SW.WRONG_P1P2);
    const key = this.state.keys[slotHex(cmd.p2)];
    if (!key) return sw(SW.NOT_FOUND);
    if (key.alg !== cmd.p1) return sw(SW.WRONG_P1P2);
    const response = findTag(inner, 0x82);
    const challenge = findTag(inner, 0x81);
    const peer = findTag(inner, 0x85);
    if (!response || response.length !== 0 || (challenge === undefined) === (peer === undefined)) return sw(SW.WRONG_DATA);
    const denied = this.spendPin(key);
    if (denied) return denied;
    let result: Buffer | undefined;
    if (challenge !== undefined) {
      if (isEcAlg(key.alg)) result = challenge.length > 0 ? ecdsaSignDigest(key, challenge) : undefined;
      else result = rsaRaw(key, challenge);
    } else if (isEcAlg(key.alg)) {
      result = ecdhSharedX(key, peer!);
    }
    if (!result) return sw(SW.WRONG_DATA);
    return ok(tlv(0x7c, tlv(0x82, result)));
  }

  /** Enforces a key's PIN policy; an "always" key spends the verified PIN. */
  private spendPin(key: SlotKey): Answer | undefined {
    if (key.pinPolicy === PIN_POLICY.NEVER) return undefined;
    if (key.pinPolicy === PIN_POLICY.ALWAYS) {
      if (!this.session.pinAlwaysArmed) return sw(SW.SECURITY);
      this.session.pinAlwaysArmed = false;
      return undefined;
    }
    return this.session.pinVerified ? undefined : sw(SW.SECURITY);
  }

  private authenticateManagementKey(p1: number, inner: { tag: number; value: Buffer }[]): Answer {
    const { mgmtAlg, mgmtKey } = this.store.secrets;
    const alg = MGMT_ALGS[mgmtAlg];
    // 00 is 3DES in SP 800-78 before AES; the card takes only the algorithm its key has
    if (p1 !== alg.id && !(p1 === 0x00 && mgmtAlg === '3des')) return sw(SW.WRONG_P1P2);
    const block = alg.blockLength;
    const witness = findTag(inner, 0x80);
    const challenge = findTag(inner, 0x81);
    const response = findTag(inner, 0x82);
    const s = this.session;
    // step 1 of mutual authentication: the card's encrypted witness
    if (witness?.length === 0 && challenge === undefined && response === undefined) {
      s.mgmtAuthenticated = false;
      s.challenge = undefined;
      s.witness = randomBytes(block);
      return ok(tlv(0x7c, tlv(0x80, mgmtCipher(mgmtAlg, mgmtKey, s.witness, true))));
    }
    // step 2 of mutual authentication: decrypted witness back, the host's challenge to encrypt
    if (witness && witness.length > 0 && challenge && response === undefined) {
      const expected = s.witness;
      s.witness = undefined;
      if (!expected || witness.length !== block || challenge.length !== block) return sw(SW.WRONG_DATA);
      if (!eq(witness, expected)) {
        s.mgmtAuthenticated = false;
        return sw(SW.SECURITY);
      }
      s.mgmtAuthenticated = true;
      return ok(tlv(0x7c, tlv(0x82, mgmtCipher(mgmtAlg, mgmtKey, challenge, true))));
    }
    // step 1 of external authentication (also a random source for OpenSC): a plain challenge
    if (challenge?.length === 0 && witness === undefined && response === undefined) {
      s.witness = undefined;
      s.challenge = randomBytes(block);
      return ok(tlv(0x7c, tlv(0x81, s.challenge)));
    }
    // step 2 of external authentication: the challenge encrypted by the host
    if (response && response.length > 0 && witness === undefined && challenge === undefined) {
      const expected = s.challenge;
      s.challenge = undefined;
      if (!expected || response.length !== block) return sw(SW.WRONG_DATA);
      if (!eq(response, mgmtCipher(mgmtAlg, mgmtKey, expected, true))) {
        s.mgmtAuthenticated = false;
        return sw(SW.SECURITY);
      }
      s.mgmtAuthenticated = true;
      return ok();
    }
    // internal authentication of the card: encrypt the host's challenge, authenticates nobody
    if (challenge && challenge.length > 0 && response?.length === 0 && witness === undefined) {
      if (challenge.length !== block) return sw(SW.WRONG_DATA);
      return ok(tlv(0x7c, tlv(0x82, mgmtCipher(mgmtAlg, mgmtKey, challenge, true))));
    }
    return sw(SW.WRONG_DATA);
  }

  // ---- data objects ------------------------------------------------------------------------

  /** The tag named by a `5C` tag list, or undefined when the list is malformed. */
  private objectTag(data: Buffer): { tag: number; rest: Buffer } | undefined {
    if (data.length < 2 || data[0] !== 0x5c) return undefined;
    const n = data[1]!;
    if (n < 1 || n > 3 || data.length < 2 + n) return undefined;
    return { tag: data.subarray(2, 2 + n).readUIntBE(0, n), rest: data.subarray(2 + n) };
  }

  private static writable(tag: number): boolean {
    return (tag >= 0x5fc101 && tag <= 0x5fc123) || (tag >= 0x5fff00 && tag <= 0x5fff15);
  }

  private getData(cmd: Command): Answer {
    if (cmd.p1 !== 0x3f || cmd.p2 !== 0xff) return sw(SW.WRONG_P1P2);
    const named = this.objectTag(cmd.data);
    if (!named || named.rest.length) return sw(SW.WRONG_DATA);
    if (named.tag === 0x7e) return ok(DISCOVERY);
    if (named.tag === 0x7f61) return sw(SW.NOT_FOUND);
    if (!VirtualPivCard.writable(named.tag)) return sw(SW.NOT_FOUND);
    if (PIN_PROTECTED_OBJECTS.has(named.tag) && !this.session.pinVerified) return sw(SW.SECURITY);
    const stored = this.state.objects[named.tag.toString(16)];
    if (stored === undefined) return sw(SW.NOT_FOUND);
    return ok(tlv(0x53, Buffer.from(stored, 'base64')));
  }

  private putData(cmd: Command): Answer {
    if (cmd.p1 !== 0x3f || cmd.p2 !== 0xff) return sw(SW.WRONG_P1P2);
    if (!this.session.mgmtAuthenticated) return sw(SW.SECURITY);
    const named = this.objectTag(cmd.data);
    if (!named || !VirtualPivCard.writable(named.tag)) return sw(SW.WRONG_DATA);
    const content = parseTlvs(named.rest);
    if (!content || content.length !== 1 || content[0]!.tag !== 0x53) return sw(SW.WRONG_DATA);
    const value = content[0]!.value;
    if (value.length > MAX_OBJECT) return sw(SW.NO_SPACE);
    const id = named.tag.toString(16);
    if (value.length === 0) delete this.state.objects[id];
    else this.state.objects[id] = value.toString('base64');
    this.store.save();
    this.log(`${this.name}: ${value.length ? 'wrote' : 'deleted'} object ${id}`);
    return ok();
  }

  // ---- YubiKey extensions ------------------------------------------------------------------

  private getVersion(cmd: Command): Answer {
    if (cmd.p1 !== 0 || cmd.p2 !== 0) return sw(SW.WRONG_P1P2);
    return ok(Buffer.from(this.version));
  }

  private getSerial(cmd: Command): Answer {
    if (cmd.p1 !== 0 || cmd.p2 !== 0) return sw(SW.WRONG_P1P2);
    const b = Buffer.alloc(4);
    b.writeUInt32BE(this.state.serial);
    return ok(b);
  }

  private getMetadata(cmd: Command): Answer {
    if (cmd.p1 !== 0) return sw(SW.WRONG_P1P2);
    const ref = cmd.p2;
    if (ref === PIN_REF || ref === PUK_REF) {
      const counter = this.counterOf(ref);
      const value = ref === PIN_REF ? this.store.secrets.pin : this.store.secrets.puk;
      const isDefault = value === (ref === PIN_REF ? DEFAULT_PIN : DEFAULT_PUK);
      return ok(
        Buffer.concat([
          tlv(0x01, Buffer.from([0xff])),
          tlv(0x05, Buffer.from([isDefault ? 1 : 0])),
          tlv(0x06, Buffer.from([counter.max, counter.left])),
        ]),
      );
    }
    if (ref === MGMT_REF) {
      const { mgmtAlg, mgmtKey } = this.store.secrets;
      const isDefault = mgmtAlg === '3des' && eq(mgmtKey, DEFAULT_MGMT_KEY);
      return ok(
        Buffer.concat([
          tlv(0x01, Buffer.from([MGMT_ALGS[mgmtAlg].id])),
          tlv(0x02, Buffer.from([0x00, TOUCH_POLICY.NEVER])),
          tlv(0x05, Buffer.from([isDefault ? 1 : 0])),
        ]),
      );
    }
    if (!isKeySlot(ref) && ref !== ATTESTATION_SLOT) return sw(SW.WRONG_P1P2);
    const key = this.state.keys[slotHex(ref)];
    if (!key) return sw(SW.NOT_FOUND);
    return ok(
      Buffer.concat([
        tlv(0x01, Buffer.from([key.alg])),
        tlv(0x02, Buffer.from([key.pinPolicy, key.touchPolicy])),
        tlv(0x03, Buffer.from([key.origin === 'generated' ? 1 : 2])),
        tlv(0x04, pivPublicKey(key)),
      ]),
    );
  }

  private async attest(cmd: Command): Promise<Answer> {
    if (!isKeySlot(cmd.p1) || cmd.p2 !== 0) return sw(SW.WRONG_P1P2);
    const key = this.state.keys[slotHex(cmd.p1)];
    if (!key) return sw(SW.NOT_FOUND);
    if (key.origin !== 'generated') return sw(SW.WRONG_DATA);
    const attestationKey = this.state.keys[slotHex(ATTESTATION_SLOT)];
    const certObject = this.state.objects['5fff01'];
    const cert = certObject ? findTag(parseTlvs(Buffer.from(certObject, 'base64')) ?? [], 0x70) : undefined;
    if (!attestationKey || !isEcAlg(attestationKey.alg) || !cert) return sw(SW.CONDITIONS);
    const der = await attestSlot({
      slot: cmd.p1,
      key,
      attestationKey,
      attestationCertDer: cert,
      version: this.version,
      serial: this.state.serial,
      pinPolicy: key.pinPolicy,
      touchPolicy: key.touchPolicy,
    });
    return ok(der);
  }

  private setManagementKey(cmd: Command): Answer {
    if (cmd.p1 !== 0xff || (cmd.p2 !== 0xff && cmd.p2 !== 0xfe)) return sw(SW.WRONG_P1P2);
    if (!this.session.mgmtAuthenticated) return sw(SW.SECURITY);
    const d = cmd.data;
    if (d.length < 3 || d[1] !== MGMT_REF) return sw(SW.WRONG_DATA);
    const algName = mgmtAlgById(d[0]!);
    if (!algName || d[2] !== MGMT_ALGS[algName].keyLength || d.length !== 3 + d[2]) return sw(SW.WRONG_DATA);
    this.store.secrets.mgmtAlg = algName;
    this.store.secrets.mgmtKey = Buffer.from(d.subarray(3));
    this.store.saveSecrets();
    this.log(`${this.name}: management key replaced (${algName})`);
    return ok();
  }

  private setPinRetries(cmd: Command): Answer {
    if (cmd.p1 < 1 || cmd.p1 > 15 || cmd.p2 < 1 || cmd.p2 > 15) return sw(SW.WRONG_P1P2);
    if (!this.session.mgmtAuthenticated || !this.session.pinVerified) return sw(SW.SECURITY);
    // like a YubiKey: new counters, and PIN and PUK back to their factory values
    this.state.pin = { max: cmd.p1, left: cmd.p1 };
    this.state.puk = { max: cmd.p2, left: cmd.p2 };
    this.store.secrets.pin = DEFAULT_PIN;
    this.store.secrets.puk = DEFAULT_PUK;
    this.store.saveSecrets();
    this.store.save();
    this.log(`${this.name}: retry counters set to ${cmd.p1}/${cmd.p2}, PIN and PUK back to factory values`);
    return ok();
  }

  private factoryReset(cmd: Command): Answer {
    if (cmd.p1 !== 0 || cmd.p2 !== 0) return sw(SW.WRONG_P1P2);
    if (this.state.pin.left !== 0 || this.state.puk.left !== 0) return sw(SW.CONDITIONS);
    const attestationKey = this.state.keys[slotHex(ATTESTATION_SLOT)];
    const attestationCert = this.state.objects['5fff01'];
    this.state.keys = attestationKey ? { [slotHex(ATTESTATION_SLOT)]: attestationKey } : {};
    this.state.objects = attestationCert ? { '5fff01': attestationCert } : {};
    this.state.pin = { max: 3, left: 3 };
    this.state.puk = { max: 3, left: 3 };
    Object.assign(this.store.secrets, { pin: DEFAULT_PIN, puk: DEFAULT_PUK, mgmtKey: Buffer.from(DEFAULT_MGMT_KEY), mgmtAlg: '3des' });
    this.store.saveSecrets();
    this.store.save();
    this.session = { ...freshSession(), selected: true };
    this.log(`${this.name}: PIV application reset to factory state`);
    return ok();
  }
}

/**
 * Opens the virtual PIV card whose state lives in `stateDir`, creating it (0700, with a random
 * PIN, PUK and management key in 0600 files) on first use. The card-host calls this with
 * `<simdir>/cards/piv`.
 */
export function openVirtualPivCard(stateDir: string, options: VirtualPivCardOptions = {}): VirtualCard {
  return new VirtualPivCard(stateDir, options);
}
