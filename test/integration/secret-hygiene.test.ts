/**
 * Secret hygiene on every backend: distinctive planted PINs and auth values (`planted-PIN-…`,
 * registered for the whole-run check in scripts/check-secrets.mjs) drive the error paths — a
 * wrong PIN from pin-value, a pin-source file and the environment on the SoftHSM2 token, a wrong
 * TPM key auth value from `tpm: { authSource }`, a wrong PIV PIN and management key, the `seal`
 * CLI with --json — and no rendering of the error (message, String, toJSON, stack, util.inspect
 * with the cause chain) and no CLI stdout/stderr carries the value. Secret files seal-bridge
 * creates are 0600 (directories 0700) and a PIN or auth file others can read is refused before
 * anything is sent to the module (PIN counters from outside tools prove no try was spent).
 *
 * The TPM cases run on a swtpm of this file's own: wrong auth values count against the TPM's
 * dictionary-attack lockout, which must not spill into the simulator's shared swtpm.
 */
import { spawnSync } from 'node:child_process';
import { createPublicKey, randomBytes, verify as nodeVerify } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openEnvironment, SealError, SealUri, type ErrorCode, type KeyHandle, type SecureEnvironment, type Tpm2Environment } from '../../src/index.js';
import { requireEnv, softhsmUri } from '../helpers/env.js';
import { findSecrets, plant, plantShort, recordTranscript, registerHolder, registerSecret, renderings, writeSecretHolder } from '../helpers/hygiene.js';
import { OwnSwtpm } from '../helpers/swtpm.js';

const root = resolve(import.meta.dirname, '..', '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const data = Buffer.from('secret hygiene');
let work: string;

interface CliRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the `seal` CLI; its output is kept for the whole-run check too. */
function seal(name: string, args: string[], env: Record<string, string | undefined> = {}): CliRun {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  const run = { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
  recordTranscript(`cli-${name}`, `$ seal ${args.length} arguments (not shown: they carry planted secrets)\n--- stdout\n${run.stdout}\n--- stderr\n${run.stderr}\n`);
  return run;
}

async function caught(p: Promise<unknown> | (() => unknown)): Promise<unknown> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    return e;
  }
  return undefined;
}

/** The error is a SealError with `code`, and none of `secrets` shows in any of its renderings. */
function expectClean(e: unknown, code: ErrorCode, secrets: Record<string, string>): SealError {
  expect(e, `expected SealError ${code}, the call succeeded`).toBeDefined();
  expect(e).toBeInstanceOf(SealError);
  expect((e as SealError).code, (e as Error).message).toBe(code);
  expect(findSecrets(renderings(e), secrets)).toEqual([]);
  return e as SealError;
}

/** A CLI failure: exit 1, the JSON error on stdout with `code`, one `seal: CODE: …` line on stderr, no secret anywhere. */
function expectCliError(r: CliRun, code: ErrorCode, secrets: Record<string, string>): Record<string, unknown> {
  expect(findSecrets({ stdout: r.stdout, stderr: r.stderr }, secrets)).toEqual([]);
  expect(r.status, r.stderr).toBe(1);
  const j = JSON.parse(r.stdout) as { error: Record<string, unknown> };
  expect(j.error.code, r.stdout).toBe(code);
  expect(r.stderr).toMatch(new RegExp(`^seal: ${code}: `, 'm'));
  return j.error;
}

const mode = (p: string): number => statSync(p).mode & 0o777;

beforeAll(() => {
  expect(existsSync(cli), 'dist/cli/main.js is built by npm ci / scripts/bootstrap').toBe(true);
  work = mkdtempSync(join(tmpdir(), 'seal-hygiene-'));
});

afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

// ---- PKCS#11 ----------------------------------------------------------------------------------------

describe('secret hygiene: PKCS#11 on the simulator token', () => {
  const simPin = (): string => readFileSync(/pin-source=file:([^&]+)/.exec(softhsmUri())![1]!, 'utf8').replace(/\r?\n$/, '');
  /** The simulator URI with its PIN source replaced (pin-value kept in the string form). */
  const withPin = (query: Record<string, string | undefined>): string => SealUri.parse(softhsmUri()).withQuery({ 'pin-source': undefined, ...query }).format({ includeSecrets: true });

  afterAll(async () => {
    // a successful login clears what the wrong ones set (CKF_USER_PIN_COUNT_LOW) on the shared token
    const env = await openEnvironment(softhsmUri());
    await env.close();
  });

  it('a wrong PIN from pin-value, a 0600 pin-source file and env: is PIN_INCORRECT and in no rendering of the error or the environment', async () => {
    const planted = plant('PIN');
    const file = writeSecretHolder(join(work, 'p11-wrong-pin'), planted);
    process.env.SEAL_HYGIENE_P11_PIN = planted;
    const secrets = { planted, 'token PIN': simPin() };
    try {
      for (const [how, uri] of [
        ['pin-value', withPin({ 'pin-value': planted })],
        ['pin-source=file:', withPin({ 'pin-source': `file:${file}` })],
        ['pin-source=env:', withPin({ 'pin-source': 'env:SEAL_HYGIENE_P11_PIN' })],
      ] as const) {
        const e = expectClean(await caught(openEnvironment(uri)), 'PIN_INCORRECT', secrets);
        expect(e.backendCode, how).toBe('CKR_PIN_INCORRECT');
      }
      // the PIN is also never part of what an open environment or its keys print
      const env = await openEnvironment(withPin({ 'pin-value': simPin() }));
      try {
        const key = await env.generateKey({ label: `hygiene-${randomBytes(4).toString('hex')}`, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
        try {
          expect(findSecrets({ envUri: env.uri, keyUri: key.uri, info: JSON.stringify(env.info), key: JSON.stringify({ ...key, uri: key.uri }) }, { 'token PIN': simPin() })).toEqual([]);
          // an error raised with the environment open (a label taken) carries no PIN either
          expectClean(await caught(env.generateKey({ label: key.label, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] })), 'KEY_EXISTS', { 'token PIN': simPin() });
        } finally {
          await key.destroy();
        }
      } finally {
        await env.close();
      }
    } finally {
      delete process.env.SEAL_HYGIENE_P11_PIN;
    }
  });

  it('a PIN file readable by group or others is refused (SECRET_SOURCE) naming the file, not its content', async () => {
    const planted = plant('PIN');
    const file = writeSecretHolder(join(work, 'p11-loose-pin'), planted, 0o644);
    const e = expectClean(await caught(openEnvironment(withPin({ 'pin-source': `file:${file}` }))), 'SECRET_SOURCE', { planted });
    expect(e.message).toContain(file);
    expect(e.message).toMatch(/chmod 600/);
    // the same content at 0600 is read (and refused by the token, as it is the wrong PIN)
    chmodSync(file, 0o600);
    expectClean(await caught(openEnvironment(withPin({ 'pin-source': `file:${file}` }))), 'PIN_INCORRECT', { planted });
  });

  it('seal --json: a wrong PIN by pin-value, pin-source file, SEAL_PIN and a key URI; a bad URI and a module that does not load carry pin-value: no PIN in stdout or stderr', () => {
    const planted = plant('PIN');
    const file = writeSecretHolder(join(work, 'p11-cli-pin'), planted);
    const secrets = { planted, 'token PIN': simPin() };
    const bare = SealUri.parse(softhsmUri()).withQuery({ 'pin-source': undefined }).toString();
    expectCliError(seal('p11-pin-value', ['--env', withPin({ 'pin-value': planted }), '--json', 'key', 'list']), 'PIN_INCORRECT', secrets);
    expectCliError(seal('p11-pin-file', ['--env', withPin({ 'pin-source': `file:${file}` }), '--json', 'random', '16']), 'PIN_INCORRECT', secrets);
    expectCliError(seal('p11-seal-pin', ['--env', bare, '--json', 'key', 'list'], { SEAL_PIN: planted }), 'PIN_INCORRECT', secrets);
    // a key URI carrying the PIN opens its own environment
    const keyUri = SealUri.parse(withPin({ 'pin-value': planted })).withPath({ object: 'no-such-key' }).format({ includeSecrets: true });
    expectCliError(seal('p11-key-uri', ['--json', 'sign', '--key', keyUri, '--in', join(root, 'package.json')]), 'PIN_INCORRECT', secrets);
    // refused before any login: an unknown attribute, a module that does not load, a doctor report
    expectCliError(seal('p11-bad-uri', ['--env', `${withPin({ 'pin-value': planted })}&colour=blue`, '--json', 'key', 'list']), 'INVALID_URI', secrets);
    const noModule = SealUri.parse(withPin({ 'pin-value': planted })).withQuery({ 'module-path': join(work, 'no-such-module.so') }).format({ includeSecrets: true });
    expectCliError(seal('p11-no-module', ['--env', noModule, '--json', 'key', 'list']), 'MODULE_LOAD_FAILED', secrets);
    const doctor = seal('p11-doctor', ['--env', withPin({ 'pin-value': planted }), '--json', 'doctor']);
    expect(findSecrets({ stdout: doctor.stdout, stderr: doctor.stderr }, secrets)).toEqual([]);
    expect(doctor.status).toBe(1);
    const report = JSON.parse(doctor.stdout) as { environments: Array<{ reachable: boolean; error?: { code: string } }> };
    expect(report.environments[0]).toMatchObject({ reachable: false, error: { code: 'PIN_INCORRECT' } });
    // a usage error with the PIN on the command line: commander does not echo the URI
    const usage = seal('p11-usage', ['--env', withPin({ 'pin-value': planted }), 'key', 'create', '--alg', 'ecdsa-p256']);
    expect(usage.status).not.toBe(0);
    expect(findSecrets({ stdout: usage.stdout, stderr: usage.stderr }, secrets)).toEqual([]);
    // and the right PIN through pin-value works without printing it
    const ok = seal('p11-ok', ['--env', withPin({ 'pin-value': simPin() }), '--json', 'random', '8']);
    expect(ok.status, ok.stderr).toBe(0);
    expect(findSecrets({ stdout: ok.stdout, stderr: ok.stderr }, secrets)).toEqual([]);
  });

  it('the embedded default: home 0700, PIN files and configuration 0600; a PIN file opened to others is refused, its PIN printed nowhere', () => {
    const home = join(work, 'embedded-home');
    const env = { SEAL_HOME: home, SOFTHSM2_CONF: undefined, SEAL_PIN: undefined };
    const created = seal('embedded-create', ['--json', 'key', 'create', '--label', 'hygiene', '--alg', 'ecdsa-p256'], env);
    expect(created.status, created.stderr).toBe(0);
    const userPin = readFileSync(join(home, 'user-pin'), 'utf8').trim();
    const soPin = readFileSync(join(home, 'so-pin'), 'utf8').trim();
    for (const [value, what, file] of [[userPin, 'embedded user PIN', 'user-pin'], [soPin, 'embedded SO PIN', 'so-pin']] as const) {
      registerSecret(value, what);
      registerHolder(join(home, file));
    }
    const secrets = { 'user PIN': userPin, 'SO PIN': soPin };
    expect(findSecrets({ stdout: created.stdout, stderr: created.stderr }, secrets)).toEqual([]);
    expect(mode(home)).toBe(0o700);
    expect(mode(join(home, 'user-pin'))).toBe(0o600);
    expect(mode(join(home, 'so-pin'))).toBe(0o600);
    expect(mode(join(home, 'softhsm2.conf'))).toBe(0o600);
    expect(mode(join(home, 'tokens')) & 0o077).toBe(0);
    // nothing else in the home holds a PIN in clear (SoftHSM2 keeps only encrypted objects)
    const texts: Record<string, string> = {};
    const walk = (d: string): void => {
      for (const n of readdirSync(d, { withFileTypes: true })) {
        const p = join(d, n.name);
        if (n.isDirectory()) walk(p);
        else if (n.isFile() && !['user-pin', 'so-pin'].includes(n.name)) texts[p] = readFileSync(p).toString('latin1');
      }
    };
    walk(home);
    expect(Object.keys(texts).length).toBeGreaterThan(1);
    expect(findSecrets(texts, secrets)).toEqual([]);
    chmodSync(join(home, 'user-pin'), 0o640);
    const refused = seal('embedded-loose', ['--json', 'key', 'list'], env);
    const err = expectCliError(refused, 'SECRET_SOURCE', secrets);
    expect(String(err.message)).toContain(join(home, 'user-pin'));
  });
});

// ---- TPM 2.0 --------------------------------------------------------------------------------------

describe('secret hygiene: TPM 2.0 auth values (own swtpm)', () => {
  let tpm: OwnSwtpm;
  let keystore: string;
  let env: Tpm2Environment;
  const lockoutCounter = (): number => {
    const r = spawnSync('tpm2_getcap', ['-T', tpm.tcti, 'properties-variable'], { encoding: 'utf8' });
    const m = /TPM2_PT_LOCKOUT_COUNTER:\s*(?:raw:\s*)?(0x[0-9a-fA-F]+|\d+)/.exec(r.stdout);
    expect(m, r.stdout.slice(0, 300)).not.toBeNull();
    return Number(m![1]);
  };

  beforeAll(async () => {
    tpm = await OwnSwtpm.start(join(work, 'swtpm'));
    // room for the failures below: 32 before the lockout, one forgotten every 10 s
    const r = spawnSync('tpm2_dictionarylockout', ['-T', tpm.tcti, '-s', '-n', '32', '-t', '10', '-l', '10'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    keystore = join(work, 'tpm-keys');
    env = (await openEnvironment(tpm.uri(keystore))) as Tpm2Environment;
  });

  afterAll(async () => {
    delete process.env.SEAL_HYGIENE_TPM_AUTH;
    await env?.close();
    await tpm?.stop();
  });

  it('a wrong auth value from env: and from a 0600 file is PIN_INCORRECT (one try each), in no rendering; the key store holds only the source names', async () => {
    const good = plant('TPM-auth');
    const bad = plant('TPM-auth');
    const secrets = { good, bad };
    process.env.SEAL_HYGIENE_TPM_AUTH = good;
    const key = await env.generateKey({ label: 'auth-env', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { authSource: 'env:SEAL_HYGIENE_TPM_AUTH' } });
    const spki = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
    expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
    const before = lockoutCounter();
    process.env.SEAL_HYGIENE_TPM_AUTH = bad;
    const e = expectClean(await caught(key.sign(data)), 'PIN_INCORRECT', secrets);
    expect(e.backendCode).toMatch(/^TPM_RC_(AUTH_FAIL|BAD_AUTH)/);
    expect(lockoutCounter()).toBe(before + 1);

    const file = writeSecretHolder(join(work, 'tpm-auth'), good);
    const fkey = await env.generateKey({ label: 'auth-file', algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['sign', 'decrypt'], tpm: { authSource: `file:${file}` } });
    expect(nodeVerify('sha256', data, createPublicKey({ key: fkey.publicKey!, format: 'der', type: 'spki' }), await fkey.sign(data))).toBe(true);
    writeSecretHolder(file, bad);
    expectClean(await caught(fkey.sign(data)), 'PIN_INCORRECT', secrets);
    expectClean(await caught(fkey.decrypt(randomBytes(256))), 'PIN_INCORRECT', secrets);
    expect(lockoutCounter()).toBe(before + 3);

    // what the key store keeps: the source's name, never a value
    const texts: Record<string, string> = {};
    for (const n of readdirSync(keystore)) texts[n] = readFileSync(join(keystore, n), 'utf8');
    expect(findSecrets(texts, secrets)).toEqual([]);
    expect(texts[`${key.id}.json`]).toContain('env:SEAL_HYGIENE_TPM_AUTH');
  });

  it('an auth file or owner-auth file readable by others is refused (SECRET_SOURCE) before the TPM sees a try', async () => {
    const good = plant('TPM-auth');
    const file = writeSecretHolder(join(work, 'tpm-auth-loose'), good);
    const key = await env.generateKey({ label: 'auth-loose', algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign', 'verify'], tpm: { authSource: `file:${file}` } });
    const mac = await key.mac(data);
    expect(mac.length).toBe(32);
    chmodSync(file, 0o604);
    const before = lockoutCounter();
    const e = expectClean(await caught(key.mac(data)), 'SECRET_SOURCE', { good });
    expect(e.message).toContain(file);
    expect(lockoutCounter()).toBe(before);
    // creating a key with a loose auth file fails the same way, and leaves nothing in the store
    const count = readdirSync(keystore).length;
    expectClean(await caught(env.generateKey({ label: 'never', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { authSource: `file:${file}` } })), 'SECRET_SOURCE', { good });
    expect(readdirSync(keystore).length).toBe(count);
    const owner = plant('TPM-owner-auth');
    const ownerFile = writeSecretHolder(join(work, 'tpm-owner-loose'), owner, 0o644);
    expectClean(await caught(openEnvironment(`${tpm.uri(join(work, 'tpm-keys-owner'))}&owner-auth-source=file:${ownerFile}`)), 'SECRET_SOURCE', { owner });
  });

  it('the key store: directory 0700, key files, metadata and the SRK record 0600', async () => {
    await env.generateKey({ label: 'modes', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
    await env.writeData('sealed', Buffer.from('sealed value'));
    expect(mode(keystore)).toBe(0o700);
    const names = readdirSync(keystore);
    expect(names).toContain('srk.json');
    expect(names.filter((n) => n.endsWith('.pem')).length).toBeGreaterThanOrEqual(5);
    for (const n of names) expect(mode(join(keystore, n)), n).toBe(0o600);
  });

  it('seal --json on the TPM: a wrong auth value and a loose auth file: the JSON error and stderr carry no value', async () => {
    const good = plant('TPM-auth');
    const bad = plant('TPM-auth');
    const secrets = { good, bad };
    const uri = tpm.uri(join(work, 'tpm-keys-cli'));
    const file = writeSecretHolder(join(work, 'tpm-cli-auth'), good);
    // the CLI has no auth option: the key is made here, in the same key store, and used by the CLI
    const e2 = (await openEnvironment(uri)) as Tpm2Environment;
    try {
      await e2.generateKey({ label: 'cli-auth', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { authSource: `file:${file}` } });
    } finally {
      await e2.close();
    }
    const input = join(work, 'tpm-cli-data');
    writeFileSync(input, data);
    const ok = seal('tpm-ok', ['--env', uri, '--json', 'sign', '--key', 'cli-auth', '--in', input]);
    expect(ok.status, ok.stderr).toBe(0);
    writeSecretHolder(file, bad);
    const wrong = expectCliError(seal('tpm-wrong', ['--env', uri, '--json', 'sign', '--key', 'cli-auth', '--in', input]), 'PIN_INCORRECT', secrets);
    expect(wrong.triesLeft).toEqual(expect.any(Number));
    chmodSync(file, 0o644);
    expectCliError(seal('tpm-loose', ['--env', uri, '--json', 'sign', '--key', 'cli-auth', '--in', input]), 'SECRET_SOURCE', secrets);
  });
});

// ---- PIV ----------------------------------------------------------------------------------------

describe('secret hygiene: PIV card (virtual card through pcscd)', () => {
  const pivDir = (): string => join(requireEnv('SEAL_SIM_DIR'), 'cards', 'piv');
  const cardSecret = (n: 'piv-pin' | 'piv-puk' | 'piv-mgmt-key'): string => readFileSync(join(pivDir(), n), 'utf8').replace(/\r?\n$/, '');
  const cardSecrets = (): Record<string, string> => ({ 'PIV PIN': cardSecret('piv-pin'), 'PIV PUK': cardSecret('piv-puk'), 'PIV management key': cardSecret('piv-mgmt-key') });
  /** The simulator's URI with some query attributes replaced. */
  const pivUri = (query: Record<string, string | undefined>): string => SealUri.parse(requireEnv('SEAL_PIV_URI')).withQuery(query).format({ includeSecrets: true });
  let slot = '';
  let good: SecureEnvironment;
  let key: KeyHandle;

  /** PIN tries left, from an empty VERIFY sent by opensc-tool (SP 800-73-4: 63Cx). */
  const triesLeft = (): number => {
    const r = spawnSync('opensc-tool', ['-r', requireEnv('SEAL_PIV_READER'), '-s', '00:A4:04:00:05:A0:00:00:03:08', '-s', '00:20:00:80'], { encoding: 'utf8', timeout: 30_000 });
    const sws = [...`${r.stdout}${r.stderr}`.matchAll(/SW1=0x([0-9A-F]{2}), SW2=0x([0-9A-F]{2})/gi)].map((m) => `${m[1]}${m[2]}`.toUpperCase());
    expect(sws[1], r.stdout).toMatch(/^63C[0-9A-F]$/);
    return parseInt(sws[1]!.slice(3), 16);
  };
  /** A successful signature with the card's own PIN: the counter is back to full. */
  const restore = async (): Promise<void> => {
    const k = await good.getKey(slot);
    await k.sign(data);
  };

  beforeAll(async () => {
    good = await openEnvironment(requireEnv('SEAL_PIV_URI'));
    slot = await good.containerFor!({ name: 'ECDSA', namedCurve: 'P-256' }, ['sign']);
    key = await good.generateKey({ label: slot, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'], replace: true });
    await key.sign(data);
  });

  afterAll(async () => {
    if (good) {
      await restore().catch(() => undefined);
      await good.close();
    }
  });

  it('a wrong PIN from a 0600 pin-source file and from pin-value: PIN_INCORRECT, exactly one try, in no rendering', async () => {
    const full = triesLeft();
    for (const how of ['file', 'value'] as const) {
      const planted = plantShort('PIV-PIN');
      const uri = how === 'file' ? pivUri({ 'pin-source': `file:${writeSecretHolder(join(work, 'piv-wrong-pin'), planted)}` }) : pivUri({ 'pin-source': undefined, 'pin-value': planted });
      const bad = await openEnvironment(uri);
      try {
        expect(findSecrets({ uri: bad.uri }, { planted })).toEqual([]);
        const k = await bad.getKey(slot);
        const e = expectClean(await caught(k.sign(data)), 'PIN_INCORRECT', { planted, ...cardSecrets() });
        expect(e.triesLeft).toBe(full - 1);
        expect(e.backendCode).toBe(`SW_63C${(full - 1).toString(16).toUpperCase()}`);
        // the card's own counter (outside seal-bridge) agrees: one try spent, and only one
        if (how === 'file') expect(triesLeft()).toBe(full - 1);
      } finally {
        await bad.close();
      }
      await restore();
    }
    expect(triesLeft()).toBe(full);
  });

  it('a PIN file or management-key file readable by others is refused (SECRET_SOURCE) without a try; a wrong management key is refused and printed nowhere', async () => {
    const full = triesLeft();
    const planted = plantShort('PIV-PIN');
    const loose = writeSecretHolder(join(work, 'piv-loose-pin'), planted, 0o644);
    const env1 = await openEnvironment(pivUri({ 'pin-source': `file:${loose}` }));
    try {
      const e = expectClean(await caught(async () => (await env1.getKey(slot)).sign(data)), 'SECRET_SOURCE', { planted });
      expect(e.message).toContain(loose);
    } finally {
      await env1.close();
    }
    expect(triesLeft()).toBe(full);

    const mgmt = randomBytes(24).toString('hex');
    registerSecret(mgmt, 'PIV management key');
    const looseKey = writeSecretHolder(join(work, 'piv-loose-mgmt'), mgmt, 0o640);
    const env2 = await openEnvironment(pivUri({ 'mgmt-key-source': `file:${looseKey}` }));
    try {
      expectClean(await caught(env2.generateKey({ label: slot, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], replace: true })), 'SECRET_SOURCE', { mgmt });
      chmodSync(looseKey, 0o600);
      // SP 800-73-4: the card answers a failed mutual authentication with 6982
      const e = expectClean(await caught(env2.generateKey({ label: slot, algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], replace: true })), 'NOT_LOGGED_IN', { mgmt, ...cardSecrets() });
      expect(e.backendCode).toBe('SW_6982');
    } finally {
      await env2.close();
    }
    // the key in the slot is still the one made before (the wrong management key changed nothing)
    const still = await good.getKey(slot);
    expect(still.publicKey!.equals(key.publicKey!)).toBe(true);
  });

  it('seal --json on the PIV card: a wrong PIN from a file and from SEAL_PIN: the JSON error and stderr carry no PIN', async () => {
    const full = triesLeft();
    const input = join(work, 'piv-cli-data');
    writeFileSync(input, data);
    const secrets = (planted: string): Record<string, string> => ({ planted, ...cardSecrets() });
    const planted = plantShort('PIV-PIN');
    const file = writeSecretHolder(join(work, 'piv-cli-pin'), planted);
    const r1 = seal('piv-wrong-file', ['--env', pivUri({ 'pin-source': `file:${file}` }), '--json', 'sign', '--key', slot, '--in', input]);
    const e1 = expectCliError(r1, 'PIN_INCORRECT', secrets(planted));
    expect(e1.triesLeft).toBe(full - 1);
    await restore();
    const planted2 = plantShort('PIV-PIN');
    const r2 = seal('piv-wrong-env', ['--env', pivUri({ 'pin-source': undefined }), '--json', 'sign', '--key', slot, '--in', input], { SEAL_PIN: planted2 });
    expectCliError(r2, 'PIN_INCORRECT', secrets(planted2));
    await restore();
    expect(triesLeft()).toBe(full);
    const ok = seal('piv-ok', ['--env', requireEnv('SEAL_PIV_URI'), '--json', 'sign', '--key', slot, '--in', input]);
    expect(ok.status, ok.stderr).toBe(0);
    expect(findSecrets({ stdout: ok.stdout, stderr: ok.stderr }, cardSecrets())).toEqual([]);
  });

  it('the IoT SAFE applet has no PIN: a pin-value in its URI is refused as INVALID_URI without echoing the value', async () => {
    const planted = plant('PIN');
    const uri = SealUri.parse(requireEnv('SEAL_IOTSAFE_URI')).withQuery({ 'pin-value': planted }).format({ includeSecrets: true });
    const e = expectClean(await caught(openEnvironment(uri)), 'INVALID_URI', { planted });
    expect(e.message).toMatch(/no PIN/);
    expectCliError(seal('iotsafe-pin', ['--env', uri, '--json', 'key', 'list']), 'INVALID_URI', { planted });
  });
});
