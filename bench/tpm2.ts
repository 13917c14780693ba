/**
 * TPM 2.0 on swtpm (no resource manager): seal-bridge ECDSA P-256 sign against a raw ESAPI loop
 * in C over the same kind of session (password; salted HMAC session with AES-128-CFB parameter
 * encryption), and against one `tpm2_sign` process per signature. One swtpm of the benchmark's
 * own, on 127.0.0.1, its own state directory, stopped by its pid.
 */
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openEnvironment } from '../src/index.js';
import type { Tpm2Environment } from '../src/index.js';
import { concurrent, freePortPair, fromCount, runSync, sequential, startProcess, takeTurns, type Measurement, type Row } from './lib.js';

const root = new URL('..', import.meta.url).pathname;

function buildAnchor(): string {
  const out = join(root, 'bench', 'build');
  mkdirSync(out, { recursive: true });
  const bin = join(out, 'esapi-sign');
  const r = runSync('gcc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, join(root, 'bench', 'tpm2', 'esapi-sign.c'), '-ltss2-esys', '-ltss2-tctildr']);
  if (r.status !== 0) throw new Error(`cannot build the ESAPI anchor: ${r.stderr}`);
  return bin;
}

export async function tpm2Cases(seconds: number): Promise<Row[]> {
  const work = mkdtempSync(join(tmpdir(), 'seal-bench-tpm-'));
  const port = await freePortPair();
  const tcti = `swtpm:host=127.0.0.1,port=${port}`;
  const swtpm = startProcess('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${work}`,
    '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${port + 1},bindaddr=127.0.0.1`,
    '--flags', 'not-need-init,startup-clear']);
  const rows: Row[] = [];
  try {
    for (let i = 0; i < 100 && runSync('tpm2_getcap', ['-T', tcti, 'properties-fixed']).status !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    const anchor = buildAnchor();
    const raw = (mode: 'password' | 'encrypted', secs: number): Measurement => {
      const r = runSync(anchor, [tcti, mode, String(secs)]);
      if (r.status !== 0) throw new Error(`ESAPI anchor failed: ${r.stderr}`);
      const j = JSON.parse(r.stdout) as { ops: number; seconds: number };
      return fromCount(j.ops, j.seconds);
    };
    const data = Buffer.from('benchmark message');
    for (const [mode, pe] of [['password', 'off'], ['encrypted', 'on']] as const) {
      const env = (await openEnvironment(`tpm2:?tcti=${tcti}&keystore=${join(work, `keys-${pe}`)}&param-encryption=${pe}`)) as Tpm2Environment;
      try {
        const key = await env.generateKey({ label: 'bench', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
        await key.sign(data); // loaded
        // anchor and library take turns, so a load change on the machine touches both alike
        const { anchor: anchorResult, seal } = await takeTurns(seconds, { anchor: (s) => raw(mode, s), seal: (s) => sequential(s, () => key.sign(data)) });
        rows.push({
          case: `TPM ECDSA P-256 sign, ${mode === 'password' ? 'password session' : 'salted HMAC session + param encryption'}`,
          seal,
          anchor: `raw ESAPI loop in C (${mode === 'password' ? 'password' : 'salted, AES-128-CFB both ways'})`,
          anchorResult,
          ratio: seal.opsPerSecond / anchorResult.opsPerSecond,
          target: 0.9,
          ...(mode === 'encrypted' ? { note: 'seal-bridge encrypts only parameters that carry secrets; a sign carries none' } : {}),
        });
        if (mode === 'password') {
          const { anchor: flightAnchorResult, seal: inFlight } = await takeTurns(seconds, { anchor: (s) => raw(mode, s), seal: (s) => concurrent(s, 64, () => key.sign(data)) });
          rows.push({ case: 'TPM ECDSA P-256 sign, 64 callers in flight (calls queue back to back)', seal: inFlight, anchor: 'raw ESAPI loop in C (password)', anchorResult: flightAnchorResult, ratio: inFlight.opsPerSecond / flightAnchorResult.opsPerSecond, target: 0.9 });
        }
      } finally {
        await env.close();
      }
    }
    // one tpm2_sign process per signature, on a saved key context
    const ctx = join(work, 'tools');
    mkdirSync(ctx, { recursive: true });
    // without a resource manager every tool leaves what it loaded in the TPM: flush after each step
    const t = (args: string[]): number => {
      const started = performance.now();
      const r = runSync(args[0]!, ['-T', tcti, ...args.slice(1)]);
      const ms = performance.now() - started;
      if (r.status !== 0) throw new Error(`${args[0]} failed: ${r.stderr}`);
      runSync('tpm2_flushcontext', ['-T', tcti, '-t']);
      return ms;
    };
    t(['tpm2_createprimary', '-C', 'o', '-G', 'ecc256', '-c', join(ctx, 'primary.ctx')]);
    t(['tpm2_create', '-C', join(ctx, 'primary.ctx'), '-G', 'ecc256', '-u', join(ctx, 'key.pub'), '-r', join(ctx, 'key.priv')]);
    t(['tpm2_load', '-C', join(ctx, 'primary.ctx'), '-u', join(ctx, 'key.pub'), '-r', join(ctx, 'key.priv'), '-c', join(ctx, 'key.ctx')]);
    writeFileSync(join(ctx, 'data'), data);
    const n = Math.max(5, Math.round(seconds * 10));
    let toolMs = 0;
    for (let i = 0; i < n; i++) toolMs += t(['tpm2_sign', '-c', join(ctx, 'key.ctx'), '-g', 'sha256', '-o', join(ctx, 'sig'), join(ctx, 'data')]);
    const toolSecs = toolMs / 1000;
    const seal = rows[0]!.seal;
    rows.push({ case: 'TPM ECDSA P-256 sign vs one tpm2_sign process per signature', seal, anchor: 'tpm2_sign per signature', anchorResult: fromCount(n, toolSecs), ratio: seal.opsPerSecond / (n / toolSecs) });
  } finally {
    await swtpm.stop();
  }
  return rows;
}
