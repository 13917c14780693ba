/**
 * What the virtual PIV card remembers between runs, in its state directory (0700):
 *   state.json    keys (PKCS#8), data objects (certificates, CHUID, CCC), retry counters, serial
 *   piv-pin       the PIN (6–8 digits)          piv-puk       the PUK (8 digits)
 *   piv-mgmt-key  the management key, hex       piv-mgmt-alg  3des | aes128 | aes192 | aes256
 * Every file is 0600 and replaced atomically (temp file, fsync, rename) after every change, so a
 * test that reads a secret file always sees the value the card checks against. Test code only.
 */
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync, chmodSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import { MGMT_ALGS, type KeyAlg, type MgmtAlgName, type StoredKey } from './piv-crypto.js';

/** PIN policies (YubiKey tag AA): 1 never, 2 once per session, 3 always (before every use). */
export const PIN_POLICY = { NEVER: 1, ONCE: 2, ALWAYS: 3 } as const;
/** Touch policies (YubiKey tag AB): recorded and reported; a virtual card has no button to press. */
export const TOUCH_POLICY = { NEVER: 1, ALWAYS: 2, CACHED: 3 } as const;

export interface SlotKey extends StoredKey {
  pinPolicy: number;
  touchPolicy: number;
  origin: 'generated' | 'imported';
}

export interface Counter {
  max: number;
  left: number;
}

export interface PivState {
  format: 1;
  serial: number;
  pin: Counter;
  puk: Counter;
  /** Key slots by lower-case hex reference ("9a", "82", "f9"). */
  keys: Record<string, SlotKey>;
  /** Data objects by lower-case hex tag ("5fc105"), the value of their `53` wrapper, base64. */
  objects: Record<string, string>;
}

export interface PivSecrets {
  pin: string;
  puk: string;
  mgmtKey: Buffer;
  mgmtAlg: MgmtAlgName;
}

export const DEFAULT_PIN = '123456';
export const DEFAULT_PUK = '12345678';
export const DEFAULT_MGMT_KEY = Buffer.from('010203040506070801020304050607080102030405060708', 'hex');

const STATE_FILE = 'state.json';
const FILES = { pin: 'piv-pin', puk: 'piv-puk', mgmtKey: 'piv-mgmt-key', mgmtAlg: 'piv-mgmt-alg' } as const;

/** Writes `content` to `path` through a 0600 temp file in the same directory and a rename. */
export function writeAtomic(path: string, content: string): void {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const fd = openSync(tmp, 'wx', 0o600);
  try {
    writeSync(fd, content);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(tmp, path);
  } catch (e) {
    try {
      unlinkSync(tmp);
    } catch {
      /* already gone */
    }
    throw e;
  }
}

const randomDigits = (n: number): string => Array.from({ length: n }, () => String(randomInt(10))).join('');

export class PivStore {
  readonly dir: string;
  state: PivState;
  secrets: PivSecrets;
  /** True when this open created the card (no state file was there). */
  readonly created: boolean;

  constructor(dir: string, mgmtAlg: MgmtAlgName, makeState: (serial: number) => PivState) {
    this.dir = dir;
    const statePath = join(dir, STATE_FILE);
    if (existsSync(statePath)) {
      this.created = false;
      this.state = JSON.parse(readFileSync(statePath, 'utf8')) as PivState;
      this.secrets = this.readSecrets();
    } else {
      this.created = true;
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      chmodSync(dir, 0o700);
      const alg = MGMT_ALGS[mgmtAlg] ? mgmtAlg : '3des';
      this.secrets = {
        pin: randomDigits(6 + randomInt(3)),
        puk: randomDigits(8),
        mgmtKey: randomBytes(MGMT_ALGS[alg].keyLength),
        mgmtAlg: alg,
      };
      this.state = makeState(10_000_000 + randomInt(80_000_000));
      this.saveSecrets();
      this.save();
    }
  }

  private readSecrets(): PivSecrets {
    const read = (name: string): string => readFileSync(join(this.dir, name), 'utf8').replace(/\r?\n$/, '');
    const mgmtAlg = read(FILES.mgmtAlg) as MgmtAlgName;
    if (!MGMT_ALGS[mgmtAlg]) throw new Error(`virtual PIV card: ${FILES.mgmtAlg} names no known algorithm`);
    const mgmtKey = Buffer.from(read(FILES.mgmtKey), 'hex');
    if (mgmtKey.length !== MGMT_ALGS[mgmtAlg].keyLength) throw new Error(`virtual PIV card: ${FILES.mgmtKey} has the wrong length for ${mgmtAlg}`);
    return { pin: read(FILES.pin), puk: read(FILES.puk), mgmtKey, mgmtAlg };
  }

  /** Persists the state file (keys, objects, counters). */
  save(): void {
    writeAtomic(join(this.dir, STATE_FILE), JSON.stringify(this.state, null, 1) + '\n');
  }

  /** Persists the secret files. */
  saveSecrets(): void {
    writeAtomic(join(this.dir, FILES.pin), this.secrets.pin + '\n');
    writeAtomic(join(this.dir, FILES.puk), this.secrets.puk + '\n');
    writeAtomic(join(this.dir, FILES.mgmtKey), this.secrets.mgmtKey.toString('hex') + '\n');
    writeAtomic(join(this.dir, FILES.mgmtAlg), this.secrets.mgmtAlg + '\n');
  }
}

export function slotHex(slot: number): string {
  return slot.toString(16).padStart(2, '0');
}

export type { KeyAlg };
