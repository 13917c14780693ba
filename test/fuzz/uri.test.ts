/**
 * Fuzz: SealUri.parse over arbitrary strings, mutated valid URIs and oversized input, and
 * parseSecretSource over arbitrary pin-source values (test/unit/uri.test.ts covers the RFC 7512
 * examples and the round trip of generated attribute maps; this covers input nobody generated).
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MAX_URI_LENGTH, SealUri } from '../../src/core/uri.js';
import { parseSecretSource } from '../../src/core/secrets.js';
import { FUZZ_RUNS, fuzz, sealOnly, timeoutFor } from './support.js';

const SEEDS = [
  'pkcs11:token=gw-hsm;object=device-id;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:SEAL_PIN',
  'pkcs11:token=seal-default;object=device-id;id=%A8%7E%00%FF;type=private',
  'tpm2:object=device-id?tcti=swtpm:host=127.0.0.1,port=2321&keystore=/var/lib/seal/tpm2',
  'pcsc:reader=Yubico%20YubiKey;applet=piv;slot=9a?pin-source=env:PIV_PIN&mgmt-key-source=file:/etc/seal/piv-mgmt',
  'at:port=/dev/ttyUSB2;applet=iotsafe;object=client-key?baud=115200&timeout-ms=5000',
  'pkcs11:object=x?pin-value=1234',
];

/** Characters that matter to the grammar, percent sequences (good and broken), and anything else. */
const uriText = fc.oneof(
  {
    weight: 3,
    arbitrary: fc
      .tuple(
        fc.constantFrom(...SEEDS),
        fc.array(
          fc.tuple(
            fc.nat(),
            fc.nat({ max: 6 }),
            fc.oneof(
              fc.constantFrom(';', '?', '&', '=', '%', '%4', '%zz', '%00', '%C3%A9', '#', ':', ' ', '\u0000', '\u007f', '\ud800', '😀', 'pin-value=9', 'a=b', '=', ';;', '??'),
              fc.string({ maxLength: 8 }),
            ),
          ),
          { maxLength: 5 },
        ),
      )
      .map(([seed, edits]) =>
        edits.reduce((s, [at, del, ins]) => {
          const i = at % (s.length + 1);
          return s.slice(0, i) + ins + s.slice(i + del);
        }, seed),
      ),
  },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 200 }) },
  { weight: 1, arbitrary: fc.string({ unit: fc.constantFrom('a', '=', ';', '?', '&', '%', '4', '1', ':', 'p'), maxLength: 300 }) },
  {
    weight: 1,
    // around the length bound: the scheme and a long value (percent-encoded or not)
    arbitrary: fc
      .tuple(fc.integer({ min: MAX_URI_LENGTH - 40, max: MAX_URI_LENGTH + 40 }), fc.constantFrom('a', '%41', '%'))
      .map(([n, unit]) => `pkcs11:object=${unit.repeat(Math.ceil(n / unit.length))}`.slice(0, n)),
  },
);

describe('fuzz: SealUri.parse', () => {
  it(
    'refuses with INVALID_URI or parses to a URI whose printed form parses to the same attributes, never printing a pin-value',
    () => {
      fuzz('SealUri.parse', uriText, (text) => {
        const uri = sealOnly(() => SealUri.parse(text), ['INVALID_URI']);
        if (!uri) return;
        expect(text.length).toBeLessThanOrEqual(MAX_URI_LENGTH);
        // the printed form carries no pin-value attribute, in the path or in the query
        const printed = SealUri.parse(uri.toString());
        expect([...printed.pathNames, ...printed.queryNames]).not.toContain('pin-value');
        const again = SealUri.parse(uri.format({ includeSecrets: true }));
        expect(again.scheme).toBe(uri.scheme);
        expect(again.pathNames).toEqual(uri.pathNames);
        expect(again.queryNames).toEqual(uri.queryNames);
        for (const n of uri.pathNames) expect(again.getBytes(n)!.equals(uri.getBytes(n)!)).toBe(true);
        for (const n of uri.queryNames) expect(again.query(n)).toBe(uri.query(n));
      }, { examples: [...SEEDS, 'pkcs11:pin-value=1234;object=x', 'tpm2:object=k;pin-value=%31%32?pin-value=1'] });
    },
    timeoutFor(1),
  );

  it('refuses every string longer than MAX_URI_LENGTH, however it is made', () => {
    fuzz('SealUri.parse (oversized)', fc.integer({ min: MAX_URI_LENGTH + 1, max: 200_000 }), (n) => {
      expect(() => SealUri.parse(`pkcs11:object=${'x'.repeat(n)}`.slice(0, n))).toThrow(/longer than/);
    }, { runs: Math.min(FUZZ_RUNS, 200) });
  });

  it(
    'parseSecretSource: SECRET_SOURCE or a well-formed env:/file: source',
    () => {
      const sourceText = fc.oneof(
        fc.string({ maxLength: 40 }),
        fc.tuple(fc.constantFrom('env:', 'file:', 'file://', 'ENV:', 'value:', ''), fc.string({ unit: 'binary', maxLength: 30 })).map(([a, b]) => a + b),
      );
      fuzz('parseSecretSource', sourceText, (text) => {
        const src = sealOnly(() => parseSecretSource(text), ['SECRET_SOURCE']);
        if (!src) return;
        if (src.kind === 'env') expect(src.name).toMatch(/^[A-Za-z_][A-Za-z0-9_]*$/);
        else if (src.kind === 'file') expect(src.path.length).toBeGreaterThan(0);
        else expect.fail('a pin-source never yields a literal value');
      });
    },
    timeoutFor(1),
  );
});
