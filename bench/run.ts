/**
 * `npm run bench` (full) and `npm run bench -- --quick` (about a minute): every case measures
 * seal-bridge and its anchor in the same run on this machine, prints a Markdown table and writes
 * bench/results/latest.json. Benchmarks report ratios; tests never assert timings.
 *   --only tpm2        run one group
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { table, type Row } from './lib.js';
import { tpm2Cases } from './tpm2.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const only = args.includes('--only') ? args[args.indexOf('--only') + 1]?.split(',') : undefined;
const seconds = quick ? 3 : 10;

const groups: Record<string, (s: number) => Promise<Row[]>> = { tpm2: tpm2Cases };

const rows: Row[] = [];
for (const [name, run] of Object.entries(groups)) {
  if (only && !only.includes(name)) continue;
  process.stderr.write(`bench: ${name} (${seconds} s per case)\n`);
  rows.push(...(await run(seconds)));
}
const out = join(new URL('..', import.meta.url).pathname, 'bench', 'results');
mkdirSync(out, { recursive: true });
const report = {
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, model: cpus()[0]?.model ?? '', node: process.version },
  quick,
  rows,
};
writeFileSync(join(out, 'latest.json'), `${JSON.stringify(report, null, 2)}\n`);
console.log(table(rows));
for (const r of rows) if (r.target !== undefined && r.ratio !== undefined && r.ratio < r.target) console.log(`below target: ${r.case}: ${r.ratio.toFixed(2)} < ${r.target}`);
