/**
 * The `seal` command end to end on a SoftHSM2 token initialized outside seal-bridge (by
 * softhsm2-util in scripts/sim), cross-checked with openssl and OpenSC's pkcs11-tool.
 */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, it, expect, beforeAll } from 'vitest';
import { softhsmUri, requireEnv } from '../helpers/env.js';

const root = resolve(import.meta.dirname, '..', '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const work = mkdtempSync(join(tmpdir(), 'seal-cli-'));
const outputs: string[] = [];

function seal(args: string[], env: Record<string, string | undefined> = {}, input?: Buffer): SpawnSyncReturns<string> {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, input, timeout: 120_000 });
  outputs.push(r.stdout ?? '', r.stderr ?? '');
  return r;
}

function run(cmd: string, args: string[], env: Record<string, string | undefined> = {}): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  outputs.push(r.stdout ?? '', r.stderr ?? '');
  return r;
}

const uri = (): string => softhsmUri();
const pinFile = (): string => /pin-source=file:([^&]+)/.exec(uri())![1]!;
const pin = (): string => readFileSync(pinFile(), 'utf8').trim();
/** The token's URI without any PIN source: the PIN then comes from SEAL_PIN. */
const bareUri = (): string => uri().replace(/&?pin-source=[^&]+/, '');

describe('seal CLI on a user-initialized SoftHSM2 token', () => {
  const label = `cli-ec-${randomBytes(4).toString('hex')}`;
  let keyUri = '';

  beforeAll(() => {
    expect(existsSync(cli), 'dist/cli/main.js is built by npm ci / scripts/bootstrap').toBe(true);
  });

  it('creates a key and prints a re-openable URI without a PIN', () => {
    const r = seal(['--env', uri(), '--json', 'key', 'create', '--label', label, '--alg', 'ecdsa-p256']);
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { uri: string; provenance: { origin: string; neverExtractable: boolean } };
    expect(j.uri).toMatch(/^pkcs11:token=seal-sim;object=/);
    expect(j.uri).not.toContain('pin-value');
    expect(j.uri).not.toContain(pin());
    expect(j.provenance.origin).toBe('generated-inside');
    expect(j.provenance.neverExtractable).toBe(true);
    keyUri = j.uri;
  });

  it('signs a file; openssl verifies it with the PEM from `seal pubkey`', () => {
    const data = join(work, 'data.bin');
    writeFileSync(data, randomBytes(1000));
    const keyNoPin = keyUri.replace(/&?pin-source=[^&]+/, '');
    const s = seal(['sign', '--key', keyNoPin, '--in', data, '--out', join(work, 'sig.der')], { SEAL_PIN: pin() });
    expect(s.status, s.stderr).toBe(0);
    const p = seal(['pubkey', '--key', keyNoPin, '--out', join(work, 'pub.pem')], { SEAL_PIN: pin() });
    expect(p.status, p.stderr).toBe(0);
    const v = run('openssl', ['dgst', '-sha256', '-verify', join(work, 'pub.pem'), '-signature', join(work, 'sig.der'), data]);
    expect(v.stdout).toContain('Verified OK');
    writeFileSync(join(work, 'other.bin'), randomBytes(1000));
    const bad = run('openssl', ['dgst', '-sha256', '-verify', join(work, 'pub.pem'), '-signature', join(work, 'sig.der'), join(work, 'other.bin')]);
    expect(bad.status).not.toBe(0);
    const sv = seal(['verify', '--key', keyUri, '--in', data, '--sig', join(work, 'sig.der')]);
    expect(sv.status).toBe(0);
    const sv2 = seal(['verify', '--key', keyUri, '--in', join(work, 'other.bin'), '--sig', join(work, 'sig.der')]);
    expect(sv2.status).toBe(1);
  });

  it('pkcs11-tool sees the private key as sensitive, always sensitive, never extractable, and cannot read it', () => {
    const env = { SOFTHSM2_CONF: requireEnv('SOFTHSM2_CONF') };
    const module = requireEnv('SEAL_SOFTHSM_MODULE');
    const l = run('pkcs11-tool', ['--module', module, '--token-label', 'seal-sim', '--login', '--pin', pin(), '--list-objects', '--type', 'privkey', '--label', label], env);
    expect(l.status, l.stderr).toBe(0);
    const block = l.stdout.split(/(?=Private Key Object)/).find((b) => new RegExp(`label:\\s+${label}\\n`).test(b));
    expect(block, l.stdout).toBeDefined();
    expect(block).toMatch(/Access:\s+sensitive, always sensitive, never extractable, local/);
    // OpenSC 0.23 does not even try private keys: it writes nothing and says so
    const outFile = join(work, 'privkey.out');
    const r = run('pkcs11-tool', ['--module', module, '--token-label', 'seal-sim', '--login', '--pin', pin(), '--read-object', '--type', 'privkey', '--label', label, '-o', outFile], env);
    expect(existsSync(outFile)).toBe(false);
    expect(r.stdout + r.stderr).toMatch(/not \(yet\) supported|failed|error/i);
    // for a secret key it asks the module for CKA_VALUE, and the module refuses
    const secret = `cli-sec-${randomBytes(3).toString('hex')}`;
    expect(seal(['--env', uri(), 'key', 'create', '--label', secret, '--alg', 'aes-256']).status).toBe(0);
    const s = run('pkcs11-tool', ['--module', module, '--token-label', 'seal-sim', '--login', '--pin', pin(), '--read-object', '--type', 'secrkey', '--label', secret, '-o', join(work, 'secret.out')], env);
    expect(s.status).not.toBe(0);
    expect(s.stderr).toContain('CKR_ATTRIBUTE_SENSITIVE');
    expect(existsSync(join(work, 'secret.out'))).toBe(false);
  });

  it('makes a CSR that openssl verifies, with the public key `seal pubkey` prints', () => {
    const csr = join(work, 'req.pem');
    const c = seal(['csr', '--key', keyUri, '--subject', 'CN=gw-17, O=Example', '--dns', 'gw-17.example', '--out', csr]);
    expect(c.status, c.stderr).toBe(0);
    const v = run('openssl', ['req', '-in', csr, '-verify', '-noout', '-subject']);
    expect(v.status, v.stderr).toBe(0);
    expect(v.stdout + v.stderr).toMatch(/verify OK/i);
    expect(v.stdout).toMatch(/CN\s*=\s*gw-17/);
    const pubFromCsr = run('openssl', ['req', '-in', csr, '-pubkey', '-noout']).stdout.trim();
    const pub = seal(['pubkey', '--key', keyUri]).stdout.trim();
    expect(pubFromCsr).toBe(pub);
  });

  it('creates every algorithm of the CLI and lists them', () => {
    const algs = ['ecdsa-p384', 'ed25519', 'rsa-2048', 'ecdh-p256', 'ecdh-p384', 'aes-128', 'aes-256', 'hmac-sha256'];
    const tag = randomBytes(3).toString('hex');
    for (const alg of algs) {
      const r = seal(['--env', uri(), '--json', 'key', 'create', '--label', `cli-${alg}-${tag}`, '--alg', alg]);
      expect(r.status, `${alg}: ${r.stderr}`).toBe(0);
      expect((JSON.parse(r.stdout) as { algorithm: string }).algorithm).toBe(alg);
    }
    const list = seal(['--env', uri(), '--json', 'key', 'list']);
    const labels = (JSON.parse(list.stdout) as Array<{ label: string }>).map((k) => k.label);
    for (const alg of algs) expect(labels).toContain(`cli-${alg}-${tag}`);
  });

  it('encrypts and decrypts with AES-GCM through files; a flipped bit is refused', () => {
    const l = `cli-aes-${randomBytes(3).toString('hex')}`;
    expect(seal(['--env', uri(), 'key', 'create', '--label', l, '--alg', 'aes-256']).status).toBe(0);
    const plain = join(work, 'p.txt');
    writeFileSync(plain, 'the launch code is not here');
    expect(seal(['--env', uri(), 'encrypt', '--key', l, '--in', plain, '--out', join(work, 'c.bin')]).status).toBe(0);
    const d = seal(['--env', uri(), 'decrypt', '--key', l, '--in', join(work, 'c.bin')]);
    expect(d.stdout).toBe('the launch code is not here');
    const c = readFileSync(join(work, 'c.bin'));
    c[c.length - 1]! ^= 1;
    writeFileSync(join(work, 'c2.bin'), c);
    const bad = seal(['--env', uri(), 'decrypt', '--key', l, '--in', join(work, 'c2.bin')]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^seal: DECRYPTION_FAILED: /);
  });

  it('random N gives N bytes of hex', () => {
    const r = seal(['--env', uri(), 'random', '32']);
    expect(r.stdout.trim()).toMatch(/^[0-9a-f]{64}$/);
  });

  it('deletes a key; showing it afterwards is KEY_NOT_FOUND', () => {
    const l = `cli-del-${randomBytes(3).toString('hex')}`;
    expect(seal(['--env', uri(), 'key', 'create', '--label', l, '--alg', 'ecdsa-p256']).status).toBe(0);
    expect(seal(['--env', uri(), 'key', 'delete', l]).status).toBe(0);
    const s = seal(['--env', uri(), 'key', 'show', l]);
    expect(s.status).toBe(1);
    expect(s.stderr).toMatch(/^seal: KEY_NOT_FOUND: /);
  });
});

describe('seal CLI: bad input gets one typed line and leaves the token unchanged', () => {
  const count = (): number => (JSON.parse(seal(['--env', uri(), '--json', 'key', 'list']).stdout) as unknown[]).length;

  it.each([
    ['malformed URI', ['--env', 'pkcs11:token=%zz', 'key', 'list'], /^seal: INVALID_URI: /],
    ['unknown URI scheme', ['--env', 'nope:x=1', 'key', 'list'], /^seal: INVALID_URI: /],
    ['missing module', ['--env', 'pkcs11:token=x?module-path=/nonexistent/libnothing.so&pin-value=1234', 'key', 'list'], /^seal: MODULE_LOAD_FAILED: /],
    ['unknown token', ['--env', '@URI@', 'key', 'list'], /^seal: TOKEN_NOT_FOUND: /],
  ])('%s', (_name, args, expected) => {
    const before = count();
    const realArgs = args.map((a) => (a === '@URI@' ? uri().replace('token=seal-sim', 'token=no-such-token') : a));
    const r = seal(realArgs);
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(expected);
    expect(count()).toBe(before);
  });

  it('unknown algorithm is a usage error naming the choices', () => {
    const before = count();
    const r = seal(['--env', uri(), 'key', 'create', '--label', 'x', '--alg', 'rsa-1024']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('Allowed choices are');
    expect(count()).toBe(before);
  });

  it('a wrong PIN is one PIN_INCORRECT line without the PIN', () => {
    const wrong = 'wrong-pin-0000';
    const r = seal(['--env', bareUri(), 'key', 'list'], { SEAL_PIN: wrong });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^seal: PIN_INCORRECT: .*not tried again/);
    expect(r.stderr + r.stdout).not.toContain(wrong);
  });

  it('a usage the key lacks is refused before the module is asked', () => {
    const l = `cli-nosign-${randomBytes(3).toString('hex')}`;
    expect(seal(['--env', uri(), 'key', 'create', '--label', l, '--alg', 'ecdh-p256']).status).toBe(0);
    const before = count();
    writeFileSync(join(work, 'd'), 'x');
    const r = seal(['--env', uri(), 'sign', '--key', l, '--in', join(work, 'd')]);
    expect(r.stderr).toMatch(/^seal: USAGE_NOT_PERMITTED: /);
    expect(count()).toBe(before);
  });

  it('oversized data is DATA_TOO_LARGE', () => {
    const l = `cli-big-${randomBytes(3).toString('hex')}`;
    expect(seal(['--env', uri(), 'key', 'create', '--label', l, '--alg', 'aes-128']).status).toBe(0);
    const big = join(work, 'big.bin');
    writeFileSync(big, Buffer.alloc(16 * 1024 * 1024 + 1));
    const r = seal(['--env', uri(), 'encrypt', '--key', l, '--in', big, '--out', join(work, 'big.enc')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^seal: DATA_TOO_LARGE: /);
  });

  it('--json errors are objects with a stable code', () => {
    const r = seal(['--json', '--env', 'pkcs11:token=%zz', 'key', 'list']);
    expect(JSON.parse(r.stdout)).toMatchObject({ error: { code: 'INVALID_URI' } });
  });
});

describe('the embedded default', () => {
  const home = join(mkdtempSync(join(tmpdir(), 'seal-home-')), 'home');
  const env = { SEAL_HOME: home, SOFTHSM2_CONF: undefined, SEAL_PIN: undefined, SEAL_SOFTHSM_URI: undefined };

  it('is created on first use with a 0600 PIN file and reports protection level 1', () => {
    const r = seal(['--json', 'doctor'], env);
    expect(r.status, r.stderr).toBe(0);
    const d = JSON.parse(r.stdout) as { environments: Array<{ name: string; reachable: boolean; info: { protectionLevel: number; label: string } }> };
    const e = d.environments.find((x) => x.name === 'embedded default')!;
    expect(e.reachable).toBe(true);
    expect(e.info.protectionLevel).toBe(1);
    expect(e.info.label).toBe('seal-default');
    expect(statSync(join(home, 'user-pin')).mode & 0o777).toBe(0o600);
    expect(statSync(home).mode & 0o777).toBe(0o700);
    const pinValue = readFileSync(join(home, 'user-pin'), 'utf8').trim();
    expect(r.stdout).not.toContain(pinValue);
  });

  it('keys made in one process are found by the next, by their URI', () => {
    const c = seal(['--json', 'key', 'create', '--label', 'device-id', '--alg', 'ecdsa-p256'], env);
    expect(c.status, c.stderr).toBe(0);
    const keyUri = (JSON.parse(c.stdout) as { uri: string }).uri;
    expect(keyUri).toMatch(/^pkcs11:token=seal-default;object=device-id;id=/);
    expect(keyUri).not.toContain('module-path');
    const s = seal(['--json', 'key', 'show', keyUri], env);
    expect(s.status, s.stderr).toBe(0);
    expect((JSON.parse(s.stdout) as { label: string }).label).toBe('device-id');
  });

  it('refuses a PIN file others can read', async () => {
    const { chmodSync } = await import('node:fs');
    chmodSync(join(home, 'user-pin'), 0o644);
    const r = seal(['key', 'list'], env);
    chmodSync(join(home, 'user-pin'), 0o600);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^seal: SECRET_SOURCE: .*chmod 600/);
  });

  it('minProtectionLevel 2 refuses it', () => {
    const r = seal(['--min-level', '2', 'key', 'list'], env);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^seal: PROTECTION_LEVEL_TOO_LOW: /);
  });

  it('`seal demo` walks the life-cycle and every export attempt is refused', () => {
    const r = seal(['--json', 'demo'], env);
    expect(r.status, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout) as { ok: boolean; steps: Array<{ step: string; lines: string[] }> };
    expect(res.ok).toBe(true);
    const exports = res.steps.find((s) => s.step === '5 export attempts')!;
    expect(exports.lines.length).toBeGreaterThanOrEqual(10);
    for (const l of exports.lines) expect(l).toMatch(/refused \(CKR_/);
    expect(res.steps.map((s) => s.step)).toEqual(['environment', '1 initialization', '2 service bootstrap', '3 service connection', '4 security association', '5 export attempts', 'cleanup']);
  });
});

describe('secret hygiene of the CLI', () => {
  it('no output of this file contained the token PIN', () => {
    expect(outputs.length).toBeGreaterThan(20);
    const p = pin();
    for (const o of outputs) expect(o.includes(p)).toBe(false);
  });
});
