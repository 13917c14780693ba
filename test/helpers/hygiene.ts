/**
 * Planted secrets and captured outputs, for the secret-hygiene checks: a test plants a distinctive
 * value (`planted-PIN-…`), drives error paths with it, and asserts it shows up nowhere; the value
 * is also registered in `$SEAL_SIM_DIR/hygiene/planted.jsonl` (0600) so the whole-run check
 * (scripts/check-secrets.mjs) looks for it in everything the run printed or wrote. Files meant to
 * hold a planted value (a PIN file a test writes) are registered as holders and not scanned.
 * CLI outputs a test captures go to `$SEAL_SIM_DIR/hygiene/transcripts/`, which the check scans.
 */
import { appendFileSync, mkdirSync, writeFileSync, chmodSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import { join, resolve } from 'node:path';
import { requireEnv } from './env.js';

function hygieneDir(): string {
  const d = join(requireEnv('SEAL_SIM_DIR'), 'hygiene');
  mkdirSync(join(d, 'transcripts'), { recursive: true, mode: 0o700 });
  return d;
}

function register(record: Record<string, string>): void {
  appendFileSync(join(hygieneDir(), 'planted.jsonl'), `${JSON.stringify(record)}\n`, { mode: 0o600 });
}

/** A distinctive value, registered for the whole-run check: `planted-<what>-<16 hex digits>`. */
export function plant(what: string): string {
  const value = `planted-${what}-${randomBytes(8).toString('hex')}`;
  register({ secret: value, what });
  return value;
}

/** A distinctive value of exactly 8 characters (a PIV PIN has 6 to 8), registered like plant(). */
export function plantShort(what: string): string {
  const alphabet = 'abcdefghjkmnpqrstuvwxyz';
  const value = `p${[...randomBytes(7)].map((b) => alphabet[b % alphabet.length]).join('')}`;
  register({ secret: value, what });
  return value;
}

/** Registers a secret that the test did not make (e.g. a PIN seal-bridge generated) for the whole-run check. */
export function registerSecret(value: string, what: string): void {
  register({ secret: value, what });
}

/** Writes `value` to `path` with `mode` (a secret file on purpose: the whole-run check skips it). */
export function writeSecretHolder(path: string, value: string, mode = 0o600): string {
  register({ holder: resolve(path) });
  writeFileSync(path, `${value}\n`, { mode });
  chmodSync(path, mode); // the umask does not get a say
  return path;
}

/** Registers a file that holds a secret on purpose (written by seal-bridge or a tool). */
export function registerHolder(path: string): void {
  register({ holder: resolve(path) });
}

let transcriptSeq = 0;
/** Keeps a captured output (CLI stdout/stderr) where the whole-run check reads it. */
export function recordTranscript(name: string, text: string): void {
  const safe = name.replace(/[^\w.-]+/g, '_').slice(0, 80);
  writeFileSync(join(hygieneDir(), 'transcripts', `${process.pid}-${++transcriptSeq}-${safe}.txt`), text, { mode: 0o600 });
}

/**
 * Every rendering of an error a caller, a log or a CLI could show: message, String(), toJSON()
 * (what `--json` prints), the stack, and util.inspect (own properties and the whole cause chain).
 */
export function renderings(e: unknown): Record<string, string> {
  const err = e as { message?: unknown; stack?: unknown; toJSON?: () => unknown };
  return {
    message: String(err?.message ?? ''),
    string: String(e),
    json: typeof err?.toJSON === 'function' ? JSON.stringify(err.toJSON()) : JSON.stringify(e) ?? '',
    stack: String(err?.stack ?? ''),
    inspect: inspect(e, { depth: 8, showHidden: false }),
  };
}

/** Where any of `secrets` (or their hex form) occurs in `texts`: "<text name>: <secret name>" entries, never the value. */
export function findSecrets(texts: Record<string, string>, secrets: Record<string, string>): string[] {
  const found: string[] = [];
  for (const [where, text] of Object.entries(texts)) {
    for (const [name, value] of Object.entries(secrets)) {
      if (text.includes(value)) found.push(`${where}: ${name}`);
      else if (value.length >= 6 && text.toLowerCase().includes(Buffer.from(value, 'utf8').toString('hex'))) found.push(`${where}: ${name} (hex)`);
    }
  }
  return found;
}
