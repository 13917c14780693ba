/**
 * `npm run bench` (full) and `npm run bench -- --quick` (about a minute per group): every case
 * measures seal-bridge and its anchor in the same run on this machine, prints a Markdown table and
 * writes bench/results/latest.json. Benchmarks report ratios; tests never assert timings.
 *   --only pkcs11,tpm2     run some groups
 * The simulators (SoftHSM2 token, virtual cards) come from `scripts/sim start` in a state
 * directory of the benchmark's own, stopped again at the end; the TPM group starts its own swtpm.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { table, type Row } from './lib.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const only = args.includes('--only') ? args[args.indexOf('--only') + 1]?.split(',') : undefined;
const seconds = quick ? 3 : 10;
const root = new URL('..', import.meta.url).pathname;

const wanted = (name: string): boolean => !only || only.includes(name);

// simulators first: SoftHSM2 reads SOFTHSM2_CONF when the module is initialized
let simDir: string | undefined;
if ((wanted('pkcs11') || wanted('cards')) && !process.env.SEAL_SOFTHSM_URI) {
  simDir = mkdtempSync(join(tmpdir(), 'seal-bench-sim-'));
  const out = execFileSync(join(root, 'scripts', 'sim'), ['start'], { env: { ...process.env, SEAL_SIM_DIR: simDir }, encoding: 'utf8' });
  for (const m of out.matchAll(/^export (\w+)='([^']*)'$/gm)) process.env[m[1]!] = m[2]!;
}

const rows: Row[] = [];
try {
  const groups: Record<string, () => Promise<Row[]>> = {
    pkcs11: async () => (await import('./pkcs11.js')).pkcs11Cases(seconds, { memorySigns: quick ? 100_000 : 1_000_000 }),
    tpm2: async () => (await import('./tpm2.js')).tpm2Cases(seconds),
    cards: async () => (await import('./cards.js')).cardCases(seconds),
  };
  for (const [name, run] of Object.entries(groups)) {
    if (!wanted(name)) continue;
    process.stderr.write(`bench: ${name} (${seconds} s per case)\n`);
    rows.push(...(await run()));
  }
} finally {
  if (simDir) execFileSync(join(root, 'scripts', 'sim'), ['stop'], { env: { ...process.env, SEAL_SIM_DIR: simDir }, stdio: 'inherit' });
}
const out = join(root, 'bench', 'results');
mkdirSync(out, { recursive: true });
const report = {
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, model: cpus()[0]?.model ?? '', node: process.version },
  quick,
  rows,
};
writeFileSync(join(out, 'latest.json'), `${JSON.stringify(report, null, 2)}\n`);
console.log(table(rows));
for (const r of rows) if (r.note) console.log(`note: ${r.case}: ${r.note}`);
for (const r of rows) if (r.target !== undefined && r.ratio !== undefined && r.ratio < r.target) console.log(`below target: ${r.case}: ${r.ratio.toFixed(2)} < ${r.target}`);
