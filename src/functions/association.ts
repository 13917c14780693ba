/**
 * A security association between two parties that share a key: AES-GCM protected messages with
 * a sequence number bound in the additional data and a replay window on the receiving side.
 * The device side keeps its key inside the secure environment (a KeyHandle); the message
 * format is plain so that a peer can implement it with any AES-GCM library.
 *
 *   message = seq (8 bytes BE) ‖ iv (12) ‖ ciphertext‖tag;  AAD = "seal-sa/1" ‖ saId ‖ direction ‖ seq
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { SealError } from '../core/errors.js';
import type { EncryptOptions, EncryptResult, KeyHandle } from '../core/types.js';

/** What an association needs of its key: AES-GCM encrypt/decrypt (a KeyHandle inside a module, or a host key). */
export type AeadKey = Pick<KeyHandle, 'encrypt' | 'decrypt'>;

/**
 * An AES-256-GCM key held in host memory, for environments whose key agreement hands the shared
 * secret to the host (TPM2_ECDH_ZGen, PIV, IoT SAFE): the association then protects messages on
 * the host, and says so. The key bytes are copied in and never handed out again.
 */
export function hostAeadKey(key: Buffer): AeadKey {
  if (key.length !== 32) throw new SealError('INVALID_ARGUMENT', 'a host association key is 32 bytes');
  const k = Buffer.from(key);
  return {
    async encrypt(data: Buffer, options: EncryptOptions = {}): Promise<EncryptResult> {
      const iv = options.iv ?? randomBytes(12);
      const c = createCipheriv('aes-256-gcm', k, iv);
      if (options.additionalData) c.setAAD(options.additionalData);
      return { ciphertext: Buffer.concat([c.update(data), c.final(), c.getAuthTag()]), iv };
    },
    async decrypt(data: Buffer, options: EncryptOptions = {}): Promise<Buffer> {
      if (!options.iv || data.length < 16) throw new SealError('DECRYPTION_FAILED', 'decryption failed');
      try {
        const d = createDecipheriv('aes-256-gcm', k, options.iv);
        if (options.additionalData) d.setAAD(options.additionalData);
        d.setAuthTag(data.subarray(data.length - 16));
        return Buffer.concat([d.update(data.subarray(0, data.length - 16)), d.final()]);
      } catch {
        throw new SealError('DECRYPTION_FAILED', 'decryption failed');
      }
    },
  };
}

export type Direction = 'initiator' | 'responder';

export function associationAad(saId: Buffer, sender: Direction, seq: bigint): Buffer {
  const s = Buffer.alloc(8);
  s.writeBigUInt64BE(seq);
  return Buffer.concat([Buffer.from('seal-sa/1'), saId, Buffer.from([sender === 'initiator' ? 1 : 2]), s]);
}

export function encodeMessage(seq: bigint, iv: Buffer, ciphertext: Buffer): Buffer {
  const s = Buffer.alloc(8);
  s.writeBigUInt64BE(seq);
  return Buffer.concat([s, iv, ciphertext]);
}

export function decodeMessage(message: Buffer): { seq: bigint; iv: Buffer; ciphertext: Buffer } {
  if (!Buffer.isBuffer(message) || message.length < 8 + 12 + 16) throw new SealError('INVALID_ARGUMENT', 'message too short');
  return { seq: message.readBigUInt64BE(0), iv: message.subarray(8, 20), ciphertext: message.subarray(20) };
}

/** Sliding replay window (RFC 4303 §3.4.3 style) over 64 sequence numbers. */
export class ReplayWindow {
  #highest = 0n;
  #bitmap = 0n;
  static readonly SIZE = 64n;

  /** Throws REPLAY for a number seen before or too old; records it otherwise. */
  check(seq: bigint): void {
    if (seq === 0n) throw new SealError('INVALID_ARGUMENT', 'sequence numbers start at 1');
    if (seq > this.#highest) {
      const shift = seq - this.#highest;
      this.#bitmap = shift >= ReplayWindow.SIZE ? 1n : ((this.#bitmap << shift) | 1n) & ((1n << ReplayWindow.SIZE) - 1n);
      this.#highest = seq;
      return;
    }
    const offset = this.#highest - seq;
    if (offset >= ReplayWindow.SIZE || (this.#bitmap >> offset) & 1n) {
      throw new SealError('INVALID_ARGUMENT', `message ${seq} replayed or too old; refused`);
    }
    this.#bitmap |= 1n << offset;
  }
}

export class SecurityAssociation {
  readonly #key: AeadKey;
  readonly #saId: Buffer;
  readonly #me: Direction;
  #sendSeq = 0n;
  readonly #window = new ReplayWindow();

  constructor(key: AeadKey, saId: Buffer, me: Direction) {
    this.#key = key;
    this.#saId = Buffer.from(saId);
    this.#me = me;
  }

  async protect(plaintext: Buffer): Promise<Buffer> {
    const seq = ++this.#sendSeq;
    const { ciphertext, iv } = await this.#key.encrypt(plaintext, { additionalData: associationAad(this.#saId, this.#me, seq) });
    return encodeMessage(seq, iv!, ciphertext);
  }

  /** Decrypts inside the module; a replayed, reordered-too-far or altered message is refused. */
  async unprotect(message: Buffer): Promise<Buffer> {
    const { seq, iv, ciphertext } = decodeMessage(message);
    const peer: Direction = this.#me === 'initiator' ? 'responder' : 'initiator';
    const plain = await this.#key.decrypt(ciphertext, { iv, additionalData: associationAad(this.#saId, peer, seq) });
    this.#window.check(seq); // only authentic messages move the window
    return plain;
  }
}
