#!/usr/bin/env node
/**
 * Secret hygiene of a whole test run: fails when a known test secret appears anywhere outside
 * the files meant to hold it. `scripts/test-all` runs it after vitest, while the simulators'
 * directory still exists:
 *
 *   node scripts/check-secrets.mjs --sim-dir "$SEAL_SIM_DIR" --scan vitest.log --scan report.json [--tmp-since <epoch ms>]
 *
 * Secrets: the SoftHSM2 user and SO PINs (softhsm/user-pin, so-pin), the virtual PIV card's PIN,
 * PUK and management key (cards/piv/piv-pin, piv-puk, piv-mgmt-key), and every value a test
 * planted (hygiene/planted.jsonl, written by test/helpers/hygiene.ts, with the files that hold
 * them on purpose).
 *
 * Scanned: the files given with --scan (what vitest printed, its JSON report); every regular file
 * under the simulator directory (logs, key stores, CLI transcripts tests recorded under
 * hygiene/transcripts) except the secret files themselves and binary state (the cards'
 * state.json, the SoftHSM2 token store, swtpm's NVRAM); with --tmp-since, the `seal-*` work
 * directories tests made under the OS temporary directory during the run (a file whose whole
 * content is one secret is a secret file there, not a leak).
 *
 * Each secret is looked for as written, as lower-case hex of its bytes (8 characters or more,
 * unless it is hex already) and as base64 (12 or more); a short all-digit PIN only where no
 * digit touches it (so "123456" is not found inside a timestamp). A finding names the secret
 * and the file, line and column, never the value. Lines start with `hygiene:`; exit 1 on a leak.
 */
import { existsSync, lstatSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';

const args = process.argv.slice(2);
const opt = { simDir: process.env.SEAL_SIM_DIR, scan: [], tmpSince: undefined };
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--sim-dir') opt.simDir = args[++i];
  else if (a === '--scan') opt.scan.push(args[++i]);
  else if (a === '--tmp-since') opt.tmpSince = Number(args[++i]);
  else {
    console.error(`hygiene: unknown argument '${a}'`);
    process.exit(2);
  }
}
if (!opt.simDir || !existsSync(opt.simDir)) {
  console.error(`hygiene: no simulator directory (--sim-dir or SEAL_SIM_DIR): '${opt.simDir ?? ''}'`);
  process.exit(2);
}
const sim = resolve(opt.simDir);
const MAX_FILE = 64 * 1024 * 1024;

// ---- the secrets --------------------------------------------------------------------------------

/** @type {{ what: string, value: string }[]} */
const secrets = [];
/** Files meant to hold a secret: never scanned. */
const holders = new Set();

function secretFile(rel, what) {
  const p = join(sim, rel);
  holders.add(p);
  if (!existsSync(p)) return false;
  const value = readFileSync(p, 'utf8').replace(/\r?\n$/, '');
  if (value) secrets.push({ what, value });
  return true;
}

const simSecrets = [
  ['softhsm/user-pin', 'SoftHSM2 user PIN'],
  ['softhsm/so-pin', 'SoftHSM2 SO PIN'],
  ['cards/piv/piv-pin', 'PIV PIN'],
  ['cards/piv/piv-puk', 'PIV PUK'],
  ['cards/piv/piv-mgmt-key', 'PIV management key'],
].filter(([rel, what]) => secretFile(rel, what)).length;

const registry = join(sim, 'hygiene', 'planted.jsonl');
holders.add(registry);
let planted = 0;
if (existsSync(registry)) {
  for (const line of readFileSync(registry, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    let rec;
    try {
      rec = JSON.parse(line);
    } catch {
      console.log('hygiene: a line of hygiene/planted.jsonl is not JSON (a test was killed while writing it?)');
      continue;
    }
    if (typeof rec.holder === 'string') holders.add(resolve(rec.holder));
    if (typeof rec.secret === 'string' && rec.secret) {
      secrets.push({ what: `planted ${rec.what ?? 'secret'}`, value: rec.secret });
      planted++;
    }
  }
}

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** Every form a secret is looked for in, as [label, RegExp]. */
function patternsOf({ value }) {
  const out = [];
  const isHex = /^[0-9a-fA-F]+$/.test(value);
  const short = value.length < 4;
  if (short) return out;
  if (/^\d+$/.test(value) && value.length < 10) out.push(['as written', new RegExp(`(?<!\\d)${value}(?!\\d)`)]);
  else out.push(['as written', new RegExp(escapeRe(value), isHex ? 'i' : '')]);
  const bytes = Buffer.from(value, 'utf8');
  if (!isHex && value.length >= 8) out.push(['as hex', new RegExp(bytes.toString('hex'), 'i')]);
  if (value.length >= 12) {
    const b64 = bytes.toString('base64').replace(/=+$/, '');
    out.push(['as base64', new RegExp(escapeRe(b64))]);
    const url = bytes.toString('base64url');
    if (url !== b64) out.push(['as base64url', new RegExp(escapeRe(url))]);
  }
  return out;
}

const tooShort = secrets.filter((s) => s.value.length < 4).map((s) => s.what);
const checks = secrets.map((s) => ({ what: s.what, value: s.value, patterns: patternsOf(s) }));

// ---- what to scan ---------------------------------------------------------------------------------

/** Binary state under the simulator directory: not logs, and opaque to a text scan. */
function isBinaryState(p) {
  const rel = relative(sim, p);
  return /^cards\/[^/]+\/state\.json$/.test(rel) || rel.startsWith('softhsm/tokens/') || rel.startsWith('tpm/state/');
}

const files = [];
const skipped = { holders: 0, binaryState: 0, special: 0, large: 0, old: 0 };

function walk(dir, filter) {
  let names;
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  for (const name of names) {
    const p = join(dir, name);
    let st;
    try {
      st = lstatSync(p);
    } catch {
      continue; // removed meanwhile
    }
    if (st.isDirectory()) walk(p, filter);
    else if (!st.isFile()) skipped.special++; // sockets, ptys, symlinks: never opened
    else if (filter(p, st)) files.push({ path: p, origin: dir.startsWith(sim) ? 'sim' : 'tmp' });
  }
}

walk(sim, (p, st) => {
  if (holders.has(p)) return void skipped.holders++;
  if (isBinaryState(p)) return void skipped.binaryState++;
  if (st.size > MAX_FILE) return void skipped.large++;
  return true;
});

for (const f of opt.scan) {
  if (!existsSync(f)) {
    console.log(`hygiene: ${f} does not exist (nothing captured?)`);
    continue;
  }
  files.push({ path: resolve(f), origin: 'output' });
}

let tmpDirs = 0;
if (opt.tmpSince !== undefined && Number.isFinite(opt.tmpSince)) {
  const base = tmpdir();
  for (const name of readdirSync(base)) {
    const p = join(base, name);
    if (!name.startsWith('seal-') || p === sim || p.startsWith(`${sim}.`)) continue;
    let st;
    try {
      st = lstatSync(p);
    } catch {
      continue;
    }
    if (!st.isDirectory() || st.mtimeMs < opt.tmpSince) continue;
    tmpDirs++;
    walk(p, (f, fst) => {
      if (holders.has(f)) return void skipped.holders++;
      if (fst.size > MAX_FILE) return void skipped.large++;
      if (fst.mtimeMs < opt.tmpSince) return void skipped.old++;
      return true;
    });
  }
}

// ---- the scan -------------------------------------------------------------------------------------

const leaks = [];
let bytes = 0;
let binaryFiles = 0;
const byOrigin = { output: 0, sim: 0, tmp: 0 };
for (const f of files) {
  let buf;
  try {
    if (!statSync(f.path).isFile()) continue;
    buf = readFileSync(f.path);
  } catch {
    continue;
  }
  bytes += buf.length;
  byOrigin[f.origin]++;
  const text = buf.toString('latin1'); // byte for byte: a secret's UTF-8 bytes match as they are
  if (buf.subarray(0, 8192).includes(0)) binaryFiles++;
  for (const c of checks) {
    // a file that is nothing but one secret (a PIN file a test made) holds it on purpose
    if (f.origin === 'tmp' && text.replace(/\r?\n$/, '') === Buffer.from(c.value, 'utf8').toString('latin1')) {
      skipped.holders++;
      break;
    }
    for (const [form, re] of c.patterns) {
      const m = re.exec(text);
      if (!m) continue;
      const before = text.slice(0, m.index);
      const line = before.split('\n').length;
      const col = m.index - before.lastIndexOf('\n');
      leaks.push(`${c.what} (${form}) in ${f.path}:${line}:${col}`);
    }
  }
}

const names = [...new Set(secrets.filter((s) => !s.what.startsWith('planted')).map((s) => s.what))];
console.log(`hygiene: ${secrets.length} secrets: ${simSecrets} from the simulators (${names.join(', ') || 'none'}), ${planted} planted by tests`);
if (tooShort.length) console.log(`hygiene: too short to look for (under 4 characters): ${tooShort.join(', ')}`);
console.log(
  `hygiene: scanned ${files.length} files, ${(bytes / 1e6).toFixed(1)} MB (${byOrigin.output} test outputs, ${byOrigin.sim} under the simulator directory, ${byOrigin.tmp} in ${tmpDirs} temporary work directories; ${binaryFiles} of them binary); ` +
    `not scanned: ${skipped.holders} secret files, ${skipped.binaryState} binary state, ${skipped.special} sockets/ptys/links, ${skipped.large} over 64 MB, ${skipped.old} older than the run`,
);
for (const l of leaks) console.log(`hygiene: LEAK: ${l}`);
console.log(`hygiene: ${leaks.length} leak${leaks.length === 1 ? '' : 's'}`);
process.exit(leaks.length ? 1 : 0);
