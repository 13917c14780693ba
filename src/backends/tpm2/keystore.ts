/**
 * The TPM key store: one directory, and per object a TSS2 PEM key file (`<id>.pem`, readable by
 * other TPM tools) plus a metadata file (`<id>.json`: label, algorithm, usages, policy). Both are
 * written to a temporary file and renamed, 0600, the metadata last: a crash leaves at most an
 * orphaned key file, never metadata that points at nothing. The private blob is encrypted by the
 * TPM's storage key and useless anywhere else.
 *
 * A record is checked (`checkRecord`) before any of it reaches the TPM: a damaged one fails with
 * DEVICE_ERROR naming the record and what is wrong, and `seal doctor` lists it.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import { writeSecretFile } from '../../core/secrets.js';
import type { KeyAlgorithm, KeyUsage } from '../../core/algorithms.js';
import type { KeyOrigin } from '../../core/types.js';
import { decodeKeyFile, encodeKeyFile } from './keyfile.js';
import { ALG, COORDINATE, CURVE, HASH_ALG, OBJ, Reader, decodePublic, digestSize, encodeDerivedTemplate, type PublicArea } from './marshal.js';

export interface StoredObject {
  version: 1;
  id: string;
  label: string;
  kind: 'private' | 'secret' | 'data';
  algorithm?: KeyAlgorithm;
  usages: KeyUsage[];
  origin: KeyOrigin;
  created: string;
  /** PCR policy the object is bound to. */
  pcrPolicy?: { hash: 'SHA-256'; pcrs: number[]; digest: string };
  /** Where the object's auth value comes from (a secret source, never the value). */
  authSource?: string;
  /** An attestation key (restricted signing key). */
  attestation?: boolean;
  /** Sealed data: length of the value and its AES-256-GCM envelope (iv ‖ ciphertext ‖ tag, base64). */
  size?: number;
  envelope?: string;
  /** Persistent handle the key is also kept at (TPM2_EvictControl). */
  persistentHandle?: number;
  /** A derivation parent (keyedHash restricted|decrypt): derives keys inside, signs nothing. */
  derivationParent?: boolean;
  /** A derived object: its parent's id and the TPMT_TEMPLATE (hex) that re-creates it. */
  derivation?: { parentId: string; template: string };
  /** Parent handle recorded in the key file. */
  parent: number;
}

export interface StoredBlobs {
  public: Buffer;
  private: Buffer;
}

const ID_RE = /^[0-9a-f]{2,64}$/;

export class KeyStore {
  constructor(readonly dir: string) {}

  ensure(): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  newId(): string {
    return randomBytes(16).toString('hex');
  }

  #file(id: string, ext: 'pem' | 'json'): string {
    if (!ID_RE.test(id)) throw new SealError('INVALID_ARGUMENT', 'malformed key id');
    return path.join(this.dir, `${id}.${ext}`);
  }

  #atomicWrite(file: string, content: string): void {
    const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    writeSecretFile(tmp, content);
    renameSync(tmp, file);
  }

  save(meta: StoredObject, blobs: StoredBlobs): void {
    this.ensure();
    if (this.list().some((o) => o.label === meta.label && o.kind === meta.kind)) {
      throw new SealError('KEY_EXISTS', `an object labelled '${meta.label}' already exists in the key store`);
    }
    this.#atomicWrite(this.#file(meta.id, 'pem'), encodeKeyFile({ emptyAuth: meta.authSource === undefined, parent: meta.parent, ...blobs }));
    this.#atomicWrite(this.#file(meta.id, 'json'), `${JSON.stringify(meta, null, 2)}\n`);
  }

  list(): StoredObject[] {
    if (!existsSync(this.dir)) return [];
    const out: StoredObject[] = [];
    for (const name of readdirSync(this.dir)) {
      if (!name.endsWith('.json') || name === 'srk.json') continue;
      try {
        const meta = JSON.parse(readFileSync(path.join(this.dir, name), 'utf8')) as StoredObject;
        if (meta?.version === 1 && ID_RE.test(meta.id) && typeof meta.created === 'string') out.push(meta);
      } catch {
        // unreadable metadata is reported by doctor(), not fatal for listing
      }
    }
    return out.sort((a, b) => a.created.localeCompare(b.created));
  }

  /** The blobs of a record; a key file that does not parse is a damaged record (with `meta`). */
  blobs(id: string, meta?: Pick<StoredObject, 'id' | 'label'>): StoredBlobs {
    const file = this.#file(id, 'pem');
    if (!existsSync(file)) throw new SealError('KEY_NOT_FOUND', 'the key file of this object is missing from the key store');
    let k;
    try {
      k = decodeKeyFile(readFileSync(file, 'utf8'));
    } catch (e) {
      if (!meta) throw e;
      throw damagedRecord(meta, `its key file does not parse (${e instanceof Error ? e.message : String(e)})`);
    }
    return { public: k.public, private: k.private };
  }

  pemPath(id: string): string {
    return this.#file(id, 'pem');
  }

  remove(id: string): void {
    // metadata first: an interrupted removal leaves an orphaned key file, never a dangling claim
    rmSync(this.#file(id, 'json'), { force: true });
    rmSync(this.#file(id, 'pem'), { force: true });
  }

  /** Whether a metadata file parses as what list() accepts (list() skips the others silently). */
  #readable(name: string): boolean {
    try {
      const meta = JSON.parse(readFileSync(path.join(this.dir, name), 'utf8')) as StoredObject;
      return meta.version === 1 && ID_RE.test(meta.id);
    } catch {
      return false;
    }
  }

  /** Inconsistencies a crash can leave (key files without metadata, metadata without key file, unreadable metadata). */
  check(): string[] {
    if (!existsSync(this.dir)) return [];
    const names = new Set(readdirSync(this.dir));
    const problems: string[] = [];
    for (const n of names) {
      if (n.endsWith('.tmp')) problems.push(`${n}: interrupted write (safe to delete)`);
      if (n.endsWith('.pem') && !names.has(n.replace(/\.pem$/, '.json'))) problems.push(`${n}: key file without metadata (orphan; delete it or re-add metadata)`);
      if (n.endsWith('.json') && n !== 'srk.json' && !names.has(n.replace(/\.json$/, '.pem'))) problems.push(`${n}: metadata without key file (delete it)`);
      else if (n.endsWith('.json') && n !== 'srk.json' && !this.#readable(n)) problems.push(`${n}: metadata unreadable, its key is not listed (delete it and ${n.replace(/\.json$/, '.pem')})`);
    }
    return problems;
  }
}

// ---- record checks ----------------------------------------------------------------------------------

const MAX_DERIVE_PART = 32; // TPMS_DERIVE label and context: TPM2B_LABEL (TPM 2.0 Part 2, 10.4.10)

const damaged = new WeakMap<SealError, string>(); // error → what is wrong

/** The SealError for a damaged record: names it and what is wrong, never its content. */
export function damagedRecord(meta: Pick<StoredObject, 'id' | 'label'>, what: string): SealError {
  const e = new SealError('DEVICE_ERROR', `the key-store record ${meta.id} ('${String(meta.label).slice(0, 128)}') is damaged: ${what}; nothing of it was sent to the TPM (seal doctor lists it)`);
  damaged.set(e, what);
  return e;
}

/** What is wrong with the record when `e` is a damagedRecord error, else undefined. */
export function damageOf(e: unknown): string | undefined {
  return e instanceof SealError ? damaged.get(e) : undefined;
}

/**
 * Checks a record before anything of it reaches the TPM, and returns its public area. tpm2-tss's
 * ESYS context does not survive every malformed input (it answers every later call with
 * TSS2_ESYS_RC_BAD_SEQUENCE), and what a TPM answers to a damaged blob (TPM_RC_INTEGRITY,
 * TPM_RC_HASH, …) does not say where the damage is. Checked: the public area parses, names with
 * SHA-256 (as every object seal-bridge makes), and agrees with the metadata (object type, curve or
 * size, a unique of the right length, the sign/decrypt attributes the usages need, the recorded PCR
 * policy or none); the private blob is one well-formed TPM2B; a derived object's template is its
 * own public area with a TPMS_DERIVE. DEVICE_ERROR (damagedRecord) otherwise.
 */
export function checkRecord(meta: StoredObject, blobs: StoredBlobs): PublicArea {
  const bad = (what: string): SealError => damagedRecord(meta, what);
  if (!Array.isArray(meta.usages) || (meta.algorithm !== undefined && (typeof meta.algorithm !== 'object' || meta.algorithm === null))) throw bad('its metadata is malformed');
  if (meta.pcrPolicy !== undefined && typeof meta.pcrPolicy?.digest !== 'string') throw bad('its metadata is malformed');
  if (meta.derivation !== undefined && typeof meta.derivation?.template !== 'string') throw bad('its metadata is malformed');
  let area: PublicArea;
  try {
    area = decodePublic(blobs.public).area;
  } catch (e) {
    throw bad(`its public area does not parse (${e instanceof Error ? e.message : String(e)})`);
  }
  // a derived object has an empty one (it is re-created under its parent, never loaded)
  const privOk = blobs.private.length >= 2 && blobs.private.readUInt16BE(0) === blobs.private.length - 2 && (blobs.private.length > 2 || meta.derivation !== undefined);
  if (!privOk) throw bad('its private blob is not one TPM2B_PRIVATE');
  if (area.nameAlg !== ALG.SHA256) throw bad(`its public area names with algorithm 0x${area.nameAlg.toString(16)}, not SHA-256`);
  const has = (bit: number): boolean => (area.attributes & bit) !== 0;
  const uses = (u: KeyUsage): boolean => meta.usages.includes(u);
  const a = meta.algorithm;
  const expect = (ok: boolean, what: string): void => {
    if (!ok) throw bad(what);
  };
  if (meta.kind === 'data') {
    expect(area.type === 'keyedhash' && area.scheme.alg === ALG.NULL, 'sealed data that is not a sealed data object');
  } else if (!a) {
    throw bad('its metadata names no algorithm');
  } else if (a.name === 'ECDSA' || a.name === 'ECDH') {
    expect(area.type === 'ecc' && area.curve === CURVE[a.namedCurve], `an ${a.name} ${a.namedCurve} key whose public area is not one`);
    if (area.type === 'ecc') expect(area.x.length === COORDINATE[a.namedCurve] && area.y.length === COORDINATE[a.namedCurve], 'an EC public key of the wrong length');
    expect(a.name === 'ECDH' ? has(OBJ.decrypt) : !uses('sign') || has(OBJ.sign), `a key for ${a.name === 'ECDH' ? 'agreement' : 'signing'} without the attribute the TPM needs for it`);
  } else if (a.name === 'RSA') {
    expect(area.type === 'rsa' && area.keyBits === a.modulusLength, `an RSA-${a.modulusLength} key whose public area is not one`);
    if (area.type === 'rsa') expect(area.modulus.length * 8 === a.modulusLength, 'an RSA modulus of the wrong length');
    expect(!uses('sign') || has(OBJ.sign), 'a signing key without the sign attribute');
    expect(!(uses('decrypt') || uses('unwrapKey')) || has(OBJ.decrypt), 'a decryption key without the decrypt attribute');
  } else if (a.name === 'AES') {
    expect(area.type === 'symcipher' && area.symmetric.alg === ALG.AES && area.symmetric.keyBits === a.length, `an AES-${a.length} key whose public area is not one`);
    expect(!uses('encrypt') || has(OBJ.sign), 'an encryption key without the attribute the TPM needs for it');
    expect(!uses('decrypt') || has(OBJ.decrypt), 'a decryption key without the decrypt attribute');
  } else if (a.name === 'HMAC') {
    expect(area.type === 'keyedhash', 'an HMAC key whose public area is not a keyed hash');
    if (area.type === 'keyedhash') {
      if (meta.derivationParent) expect(area.scheme.alg === ALG.XOR && has(OBJ.restricted) && has(OBJ.decrypt), 'a derivation parent whose public area is not one');
      else expect(area.scheme.alg === ALG.HMAC && area.scheme.hash === HASH_ALG[a.hash] && (!uses('sign') || has(OBJ.sign)), `an HMAC ${a.hash} key whose public area is not one`);
    }
  } else {
    throw bad(`its metadata names ${String((a as { name?: unknown }).name).slice(0, 20)}, which the TPM backend does not keep`);
  }
  if (area.type === 'keyedhash' || area.type === 'symcipher') expect(area.unique.length === digestSize(area.nameAlg), 'its public area carries a unique value of the wrong length');
  if (meta.pcrPolicy) {
    expect(area.authPolicy.equals(Buffer.from(meta.pcrPolicy.digest, 'hex')) && !has(OBJ.userWithAuth), 'its public area does not carry the PCR policy its metadata records');
  } else {
    expect(area.authPolicy.length === 0, 'its public area carries a policy its metadata does not record');
  }
  if (meta.derivation) {
    const template = Buffer.from(meta.derivation.template, 'hex');
    if (template.length * 2 !== meta.derivation.template.length) throw bad('its derivation template is not hex');
    // the template is the public area without its unique, then TPMS_DERIVE { label, context }
    const empty = encodeDerivedTemplate(area, Buffer.alloc(0), Buffer.alloc(0));
    const head = empty.subarray(0, empty.length - 4);
    expect(template.subarray(0, head.length).equals(head), 'its derivation template is not its own public area');
    try {
      const r = new Reader(template.subarray(head.length), 'TPMS_DERIVE');
      const label = r.tpm2b();
      const context = r.tpm2b();
      r.end();
      if (label.length > MAX_DERIVE_PART || context.length > MAX_DERIVE_PART) throw new Error('label or context too long');
    } catch {
      throw bad('its derivation template does not end with a TPMS_DERIVE');
    }
  }
  return area;
}
