/**
 * The TPM key store: one directory, and per object a TSS2 PEM key file (`<id>.pem`, readable by
 * other TPM tools) plus a metadata file (`<id>.json`: label, algorithm, usages, policy). Both are
 * written to a temporary file and renamed, 0600, the metadata last: a crash leaves at most an
 * orphaned key file, never metadata that points at nothing. The private blob is encrypted by the
 * TPM's storage key and useless anywhere else.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { SealError } from '../../core/errors.js';
import { writeSecretFile } from '../../core/secrets.js';
import type { KeyAlgorithm, KeyUsage } from '../../core/algorithms.js';
import type { KeyOrigin } from '../../core/types.js';
import { decodeKeyFile, encodeKeyFile } from './keyfile.js';

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

  blobs(id: string): StoredBlobs {
    const file = this.#file(id, 'pem');
    if (!existsSync(file)) throw new SealError('KEY_NOT_FOUND', 'the key file of this object is missing from the key store');
    const k = decodeKeyFile(readFileSync(file, 'utf8'));
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
