/**
 * Fuzz: messages a security association receives from the network (src/functions/association.ts):
 * altered, truncated, extended, replayed and reordered messages. The peer is a second association
 * on the same host key; node:crypto's AES-256-GCM is the only cipher involved. The properties are
 * the association's promises: nothing but a SealError comes out of `unprotect`, an altered message
 * never yields plaintext, and no message is accepted twice.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { randomBytes } from 'node:crypto';
import { ReplayWindow, SecurityAssociation, decodeMessage, hostAeadKey } from '../../src/functions/association.js';
import { applyMutations, fuzz, fuzzAsync, mutationList, sealOnly, sealOnlyAsync, timeoutFor } from './support.js';

describe('fuzz: security association messages', () => {
  it(
    'unprotect: an altered message is refused with a SealError and never yields plaintext; the genuine one is accepted once',
    async () => {
      const key = randomBytes(32);
      const saId = Buffer.from('sa-fuzz');
      const sender = new SecurityAssociation(hostAeadKey(key), saId, 'initiator');
      const plain = Buffer.from('meter reading 42');
      await fuzzAsync(
        'SecurityAssociation.unprotect',
        fc.record({ reorder: fc.boolean(), extra: fc.integer({ min: 0, max: 3 }), changes: fc.array(fc.tuple(fc.nat(), mutationList(3)), { minLength: 1, maxLength: 8 }) }),
        async ({ reorder, extra, changes }) => {
          // a fresh receiver, a few genuine messages (accepted once each), then altered copies
          const receiver = new SecurityAssociation(hostAeadKey(key), saId, 'responder');
          const genuine = [await sender.protect(plain)];
          for (let i = 0; i < extra; i++) genuine.push(await sender.protect(plain));
          const order = reorder ? [...genuine].reverse() : genuine;
          for (const m of order) expect((await receiver.unprotect(m)).equals(plain)).toBe(true);
          for (const m of order) expect(await sealOnlyAsync(() => receiver.unprotect(m), ['INVALID_ARGUMENT'])).toBeUndefined();
          for (const [which, ms] of changes) {
            const v = applyMutations(genuine[which % genuine.length]!, ms);
            const out = await sealOnlyAsync(() => receiver.unprotect(v), ['INVALID_ARGUMENT', 'DECRYPTION_FAILED']);
            expect(out, 'an altered or replayed message was accepted').toBeUndefined();
          }
        },
      );
    },
    timeoutFor(4),
  );

  it('decodeMessage: INVALID_ARGUMENT for anything shorter than seq ‖ iv ‖ tag, else the three parts in place', () => {
    fuzz('decodeMessage', fc.uint8Array({ maxLength: 80 }).map((a) => Buffer.from(a)), (m) => {
      const d = sealOnly(() => decodeMessage(m), ['INVALID_ARGUMENT']);
      if (!d) return expect(m.length).toBeLessThan(36);
      expect(d.iv.length).toBe(12);
      expect(Buffer.concat([m.subarray(0, 8), d.iv, d.ciphertext]).equals(m)).toBe(true);
    });
  });

  it('ReplayWindow: accepts each sequence number at most once, whatever the order (RFC 4303 3.4.3 model)', () => {
    fuzz('ReplayWindow.check', fc.array(fc.oneof(fc.bigInt({ min: 0n, max: 200n }), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })), { maxLength: 60 }), (seqs) => {
      const w = new ReplayWindow();
      const accepted = new Set<bigint>();
      let highest = 0n;
      for (const s of seqs) {
        const ok = sealOnly(() => {
          w.check(s);
          return true;
        }, ['INVALID_ARGUMENT']);
        if (ok) {
          expect(accepted.has(s), `sequence ${s} accepted twice`).toBe(false);
          expect(s > 0n && (s > highest || highest - s < 64n)).toBe(true);
          accepted.add(s);
          if (s > highest) highest = s;
        }
      }
    });
  });
});
