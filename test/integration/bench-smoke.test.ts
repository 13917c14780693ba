/**
 * The bounded form of `npm run bench` inside the suite: the PKCS#11 and TPM groups for a fraction
 * of a second per case, so that the benchmark keeps running as the code changes. It checks what a
 * benchmark run must deliver — every case measured on both sides, ratios that are the quotient of
 * the two, the memory figure, the failures of node-webcrypto-p11 under concurrent calls counted —
 * and never a timing.
 */
import { describe, expect, it } from 'vitest';
import { pkcs11Cases } from '../../bench/pkcs11.js';
import { tpm2Cases } from '../../bench/tpm2.js';
import { table, type Row } from '../../bench/lib.js';
import { requireEnv } from '../helpers/env.js';

function checkRows(rows: Row[]): void {
  for (const r of rows) {
    expect(r.seal.ops, `${r.case}: seal-bridge completed calls`).toBeGreaterThan(0);
    expect(r.seal.opsPerSecond).toBeGreaterThan(0);
    if (r.anchorResult) {
      expect(r.anchorResult.ops, `${r.case}: the anchor completed calls`).toBeGreaterThan(0);
      expect(r.ratio).toBeCloseTo(r.seal.opsPerSecond / r.anchorResult.opsPerSecond, 6);
    }
  }
  const md = table(rows).split('\n');
  expect(md[0]).toMatch(/^\| case \| ops\/s \|/);
  expect(md).toHaveLength(rows.length + 2);
}

describe('npm run bench, bounded', () => {
  it('PKCS#11 group: every case on both sides, seal-bridge without failures, node-webcrypto-p11 failures counted, memory growth reported', async () => {
    requireEnv('SEAL_SOFTHSM_URI');
    const rows = await pkcs11Cases(0.3, { memorySigns: 3000 });
    checkRows(rows);
    const names = rows.map((r) => `${r.case} / ${r.anchor ?? ''}`);
    for (const want of [/one call at a time \/ raw pkcs11js C_SignInit\+C_Sign/, /1000 in flight \/ raw pkcs11js C_SignInit\+C_Sign/, /1000 in flight \/ raw pkcs11js \*Async/, /node-webcrypto-p11/, /openssl speed/, /RSA-2048/, /AES-256-GCM/, /HMAC/, /ECDH/, /resident-set growth/]) {
      expect(names.some((n) => want.test(n)), `a row for ${want}`).toBe(true);
    }
    for (const r of rows.filter((x) => x.seal.failures !== undefined)) expect(r.seal.failures, r.case).toBe(0);
    const webcrypto = rows.find((r) => r.anchor?.startsWith('node-webcrypto-p11'));
    expect(webcrypto?.note, 'node-webcrypto-p11 ran').toBeUndefined();
    expect(webcrypto?.anchorResult?.failures, 'its failures under 1,000 concurrent calls are counted').toBeGreaterThan(0);
    const memory = rows.find((r) => r.growthMiB !== undefined);
    expect(Number.isFinite(memory?.growthMiB)).toBe(true);
    expect(memory?.seal.ops).toBeGreaterThanOrEqual(3000);
  });

  it('TPM group: seal-bridge and the raw ESAPI loop over both session types, and tpm2_sign processes', async () => {
    const rows = await tpm2Cases(0.3);
    checkRows(rows);
    expect(rows.map((r) => r.anchor)).toEqual(expect.arrayContaining([expect.stringMatching(/raw ESAPI loop in C \(password\)/), expect.stringMatching(/raw ESAPI loop in C \(salted/), 'tpm2_sign per signature']));
  });
});
