#!/usr/bin/env node
// Builds every native shim in native-shims/*/ that has a binding.gyp, using
// node-gyp (local node_modules copy if present, else the one bundled with npm).
// Runs as the package "install" script, so it must only use node builtins:
// node_modules/ may be partially populated at that point.
//
// A shim is skipped when its newest build/Release/*.node is newer than every
// source file (everything in the shim directory except build/). Pass --force
// (or set SEAL_FORCE_SHIM_BUILD=1) to rebuild regardless. One line per shim;
// the compiler output is only shown when a build fails. Exit status 1 if any
// required build fails. A shim with a shim.json `{ "optional": true,
// "requiresHeaders": [...] }` is skipped (with a note) when a header it needs is
// missing, and its failure does not fail the install: the backend it serves then
// reports itself unavailable, and every other backend still works.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const shimsDir = path.join(root, 'native-shims');
const force = process.argv.includes('--force') || process.env.SEAL_FORCE_SHIM_BUILD === '1';

function log(line) {
  process.stdout.write(`build-shims: ${line}\n`);
}

/** Newest mtime (ms) of all files below dir, skipping the top-level build/ and dot entries. */
function newestSource(dir, top = true) {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.name.startsWith('.') || (top && entry.name === 'build')) continue;
    const p = path.join(dir, entry.name);
    const m = entry.isDirectory() ? newestSource(p, false) : statSync(p).mtimeMs;
    if (m > newest) newest = m;
  }
  return newest;
}

/** Newest mtime (ms) of build/Release/*.node, or 0 when there is none. */
function newestOutput(dir) {
  const release = path.join(dir, 'build', 'Release');
  if (!existsSync(release)) return 0;
  let newest = 0;
  for (const name of readdirSync(release)) {
    if (!name.endsWith('.node')) continue;
    const m = statSync(path.join(release, name)).mtimeMs;
    if (m > newest) newest = m;
  }
  return newest;
}

function findNodeGyp() {
  const candidates = [
    path.join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    path.join(path.dirname(process.execPath), '../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'),
  ];
  // When run by npm, npm_execpath points at npm-cli.js inside the npm package.
  if (process.env.npm_execpath) {
    candidates.push(path.join(path.dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  }
  return candidates.find((c) => existsSync(c));
}

function gypArgs() {
  const args = ['rebuild'];
  // Use the headers installed next to this node binary (distro / tarball
  // installs ship include/node) instead of downloading them, unless npm or the
  // user already chose a nodedir.
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (!process.env.npm_config_nodedir && existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) {
    args.push(`--nodedir=${prefix}`);
  }
  return args;
}

const shims = existsSync(shimsDir)
  ? readdirSync(shimsDir, { withFileTypes: true })
      .filter((e) => e.isDirectory() && existsSync(path.join(shimsDir, e.name, 'binding.gyp')))
      .map((e) => e.name)
      .sort()
  : [];

let failures = 0;
let nodeGyp;
function shimConfig(dir) {
  const file = path.join(dir, 'shim.json');
  return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) : {};
}

function headerPresent(header) {
  return ['/usr/include', '/usr/local/include'].some((d) => existsSync(path.join(d, header)));
}

for (const name of shims) {
  const dir = path.join(shimsDir, name);
  const config = shimConfig(dir);
  const absent = (config.requiresHeaders ?? []).filter((h) => !headerPresent(h));
  if (absent.length > 0) {
    log(`${name}: skipped (missing ${absent.join(', ')}; ${config.optional ? 'optional' : 'required'})`);
    if (!config.optional) failures++;
    continue;
  }
  const built = newestOutput(dir);
  if (!force && built > 0 && built > newestSource(dir)) {
    log(`${name}: up to date`);
    continue;
  }
  nodeGyp ??= findNodeGyp();
  if (!nodeGyp) {
    log(`${name}: FAILED (node-gyp not found in node_modules nor next to npm)`);
    failures++;
    continue;
  }
  const started = Date.now();
  const r = spawnSync(process.execPath, [nodeGyp, ...gypArgs()], {
    cwd: dir,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 64 * 1024 * 1024,
  });
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  if (r.status === 0 && newestOutput(dir) > 0) {
    log(`${name}: built in ${secs}s`);
  } else {
    log(`${name}: FAILED (${r.error ? r.error.message : `node-gyp exit ${r.status ?? r.signal}`})`);
    process.stderr.write(`${r.stdout ?? ''}${r.stderr ?? ''}\n`);
    if (!config.optional) failures++;
  }
}

process.exitCode = failures > 0 ? 1 : 0;
