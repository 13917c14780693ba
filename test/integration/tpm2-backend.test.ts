/**
 * The TPM 2.0 backend against swtpm (no resource manager), cross-checked with openssl and
 * tpm2-tools: CLI keys verify with openssl and carry fixedtpm|fixedparent|sensitivedataorigin,
 * keys survive a TPM restart, quotes verify and any changed byte is refused, PCR-bound keys stop
 * after tpm2_pcrextend, keys wrapped for one TPM import there and nowhere else.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHmac, createPublicKey, generateKeyPairSync, randomBytes, verify as nodeVerify } from 'node:crypto';
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openEnvironment, SealError, tpmDerivedHmacKey, verifyCertify, verifyQuote, wrapForTpm } from '../../src/index.js';
import type { Tpm2Environment } from '../../src/index.js';
import { requireEnv } from '../helpers/env.js';

const root = resolve(import.meta.dirname, '..', '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const work = mkdtempSync(join(tmpdir(), 'seal-tpm-'));
const data = Buffer.from('signed inside the TPM');

function run(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

function canBind(port: number): Promise<boolean> {
  return new Promise((res) => {
    const s = createServer();
    s.once('error', () => res(false));
    s.listen(port, '127.0.0.1', () => s.close(() => res(true)));
  });
}

/** A free port P with P+1 free too: the swtpm TCTI finds the control port at P+1. */
async function freePortPair(): Promise<number> {
  for (;;) {
    const p = 20000 + Math.floor(Math.random() * 40000);
    if ((await canBind(p)) && (await canBind(p + 1))) return p;
  }
}

/** A swtpm of this test's own: loopback only, its own state directory, stopped by its pid. */
class Swtpm {
  #proc: ChildProcess | undefined;
  constructor(readonly state: string, readonly port: number, readonly ctrl: number) {}
  static async create(name: string): Promise<Swtpm> {
    const state = join(work, name);
    spawnSync('mkdir', ['-p', state]);
    const port = await freePortPair();
    return new Swtpm(state, port, port + 1);
  }
  get tcti(): string {
    return `swtpm:host=127.0.0.1,port=${this.port}`;
  }
  uri(keystore: string): string {
    return `tpm2:?tcti=${this.tcti}&keystore=${keystore}`;
  }
  async start(): Promise<void> {
    this.#proc = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${this.state}`,
      '--server', `type=tcp,port=${this.port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${this.ctrl},bindaddr=127.0.0.1`,
      '--flags', 'not-need-init,startup-clear'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    this.#proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    for (let i = 0; i < 100; i++) {
      const probe = run('tpm2_getcap', ['-T', this.tcti, 'properties-fixed']);
      if (probe.status === 0) return;
      stderr = probe.stderr.slice(0, 300);
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`swtpm did not start: ${stderr}`);
  }
  async stop(): Promise<void> {
    const p = this.#proc;
    this.#proc = undefined;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await exited;
  }
}

function transientHandles(tcti: string): string[] {
  const r = run('tpm2_getcap', ['-T', tcti, 'handles-transient']);
  expect(r.status, r.stderr).toBe(0);
  return r.stdout.split('\n').filter((l) => l.includes('0x'));
}

describe('TPM 2.0 backend on swtpm', () => {
  const a = { tpm: undefined as unknown as Swtpm, keystore: join(work, 'keys-a') };
  const b = { tpm: undefined as unknown as Swtpm, keystore: join(work, 'keys-b') };

  beforeAll(async () => {
    a.tpm = await Swtpm.create('tpm-a');
    b.tpm = await Swtpm.create('tpm-b');
    await a.tpm.start();
    await b.tpm.start();
  });

  afterAll(async () => {
    await a.tpm?.stop();
    await b.tpm?.stop();
  });

  it('seal key create → sign → openssl dgst -verify with seal pubkey; tpm2_print shows fixedtpm|fixedparent|sensitivedataorigin', () => {
    const uri = requireEnv('SEAL_TPM_URI');
    const label = `cli-${randomBytes(4).toString('hex')}`;
    const seal = (...args: string[]) => run(process.execPath, [cli, '--env', uri, ...args]);
    const created = seal('key', 'create', '--label', label, '--alg', 'ecdsa-p256');
    expect(created.status, created.stderr).toBe(0);
    const file = join(work, 'data.txt');
    writeFileSync(file, data);
    const pub = seal('pubkey', label);
    expect(pub.status, pub.stderr).toBe(0);
    writeFileSync(join(work, 'pub.pem'), pub.stdout);
    const sig = seal('sign', '--key', label, '--in', file, '--out', join(work, 'sig.der'));
    expect(sig.status, sig.stderr).toBe(0);
    const v = run('openssl', ['dgst', '-sha256', '-verify', join(work, 'pub.pem'), '-signature', join(work, 'sig.der'), file]);
    expect(v.stdout.trim()).toBe('Verified OK');
    // the key file in the store is a TSS2 PEM key file that tpm2-tools reads
    const keystore = new URLSearchParams(uri.slice(uri.indexOf('?') + 1)).get('keystore')!;
    const meta = readdirSync(keystore)
      .filter((f) => f.endsWith('.json') && f !== 'srk.json')
      .map((f) => JSON.parse(readFileSync(join(keystore, f), 'utf8')) as { id: string; label: string })
      .find((m) => m.label === label);
    expect(meta).toBeDefined();
    const printed = run('tpm2_print', ['-t', 'TSSPRIVKEY_OBJ', join(keystore, `${meta!.id}.pem`)]);
    expect(printed.status, printed.stderr).toBe(0);
    const attrs = (/attributes:\s*\n\s*value: (\S+)/.exec(printed.stdout)?.[1] ?? '').split('|');
    expect(attrs).toEqual(expect.arrayContaining(['fixedtpm', 'fixedparent', 'sensitivedataorigin', 'sign']));
    const del = seal('key', 'delete', label);
    expect(del.status, del.stderr).toBe(0);
  });

  it('keys keep working after swtpm is killed and restarted with the same state (reconnect, reload from blobs)', async () => {
    const env = (await openEnvironment(a.tpm.uri(a.keystore))) as Tpm2Environment;
    try {
      const key = await env.generateKey({ label: 'restart', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
      const spki = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
      const before = env.conn.reconnects;
      await a.tpm.stop();
      await a.tpm.start();
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
      expect(env.conn.reconnects).toBe(before + 1);
      // and a fresh environment finds it in the key store
      const again = await env.getKey('restart');
      expect(nodeVerify('sha256', data, spki, await again.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
    // nothing of ours stays loaded in a TPM without a resource manager
    expect(transientHandles(a.tpm.tcti)).toEqual([]);
  });

  it('a quote verifies with the library verifier; any changed byte, or another nonce, is refused', async () => {
    const env = (await openEnvironment(a.tpm.uri(a.keystore))) as Tpm2Environment;
    try {
      const ak = await env.createAttestationKey('ak');
      const nonce = randomBytes(20);
      const pcrs = [0, 7, 16];
      const quote = await env.quote(ak, pcrs, nonce);
      const values = await env.readPcrs(pcrs);
      const ok = verifyQuote(ak.publicKey!, quote, nonce, { pcrs, values });
      expect(ok.attest.extraData.equals(nonce)).toBe(true);
      let refused = 0;
      for (const part of ['attest', 'signature'] as const) {
        for (let i = 0; i < quote[part].length; i++) {
          const changed = { ...quote, [part]: Buffer.from(quote[part]) };
          changed[part][i] = changed[part][i]! ^ 0x01;
          expect(() => verifyQuote(ak.publicKey!, changed, nonce, { pcrs, values }), `${part} byte ${i}`).toThrow(SealError);
          refused++;
        }
      }
      expect(refused).toBe(quote.attest.length + quote.signature.length);
      const otherNonce = Buffer.from(nonce);
      otherNonce[0] = otherNonce[0]! ^ 0xff;
      expect(() => verifyQuote(ak.publicKey!, quote, otherNonce)).toThrow(/nonce/);
      // other PCR values than the quoted ones
      const wrongValues = values.map((v, i) => (i === 0 ? Buffer.alloc(v.length, 0xaa) : v));
      expect(() => verifyQuote(ak.publicKey!, quote, nonce, { pcrs, values: wrongValues })).toThrow(/PCR digest/);

      // certify: the key's Name is certified by the attestation key
      const key = await env.generateKey({ label: 'certified', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
      const cert = await key.certifyWith(ak, nonce);
      expect(verifyCertify(ak.publicKey!, cert, nonce, key.public).spki!.equals(key.publicKey!)).toBe(true);
      const other = await env.generateKey({ label: 'not-certified', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
      expect(() => verifyCertify(ak.publicKey!, cert, nonce, other.public)).toThrow(/Name/);
    } finally {
      await env.close();
    }
  });

  it('a PCR-bound key signs until tpm2_pcrextend changes its PCR, then the TPM refuses', async () => {
    const env = (await openEnvironment(a.tpm.uri(a.keystore))) as Tpm2Environment;
    try {
      const key = await env.generateKey({ label: 'pcr-bound', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { pcrs: [16] } });
      const spki = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
      const ext = run('tpm2_pcrextend', ['-T', a.tpm.tcti, `16:sha256=${randomBytes(32).toString('hex')}`]);
      expect(ext.status, ext.stderr).toBe(0);
      const e = await key.sign(data).then(() => undefined, (err: unknown) => err);
      expect(e).toBeInstanceOf(SealError);
      expect((e as SealError).code).toBe('USAGE_NOT_PERMITTED');
      expect((e as SealError).backendCode).toBe('TPM_RC_POLICY_FAIL');
      // sealed data bound to the new value unseals; after another extend it does not
      await env.writeData('pcr-secret', Buffer.from('only while PCR 16 is unchanged'), { pcrs: [16] });
      expect((await env.readData('pcr-secret')).toString()).toBe('only while PCR 16 is unchanged');
      expect(run('tpm2_pcrextend', ['-T', a.tpm.tcti, `16:sha256=${randomBytes(32).toString('hex')}`]).status).toBe(0);
      await expect(env.readData('pcr-secret')).rejects.toMatchObject({ code: 'USAGE_NOT_PERMITTED' });
    } finally {
      await env.close();
    }
  });

  it('a key wrapped by the server-side helper for this SRK imports and signs; the same blob fails on another TPM', async () => {
    const envA = (await openEnvironment(a.tpm.uri(a.keystore))) as Tpm2Environment;
    const envB = (await openEnvironment(b.tpm.uri(b.keystore))) as Tpm2Environment;
    try {
      const srk = await envA.storageKeyPublic();
      const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const blob = wrapForTpm(srk, privateKey);
      const imported = await envA.importWrapped(blob, { label: 'provisioned', usages: ['sign', 'verify'] });
      expect(imported.provenance.origin).toBe('imported');
      expect(imported.publicKey!.equals(publicKey.export({ type: 'spki', format: 'der' }))).toBe(true);
      expect(nodeVerify('sha256', data, publicKey, await imported.sign(data))).toBe(true);
      // a derivation secret imported the same way: keys derived inside equal what the server computes
      const secret = randomBytes(32);
      const parent = await envA.importWrapped(wrapForTpm(srk, { derivationSeed: secret }), { label: 'root', usages: ['deriveKey'] });
      const label = Buffer.from('connection');
      const context = randomBytes(16);
      const derived = await parent.deriveKey({ kdf: 'TPM-DERIVED-OBJECT', label, context }, { algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign'] });
      expect(derived.provenance.origin).toBe('derived-inside');
      expect((await derived.mac(data)).equals(createHmac('sha256', tpmDerivedHmacKey(secret, label, context)).update(data).digest())).toBe(true);
      const other = await parent.deriveKey({ kdf: 'TPM-DERIVED-OBJECT', label: Buffer.from('application'), context }, { algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign'] });
      expect((await other.mac(data)).equals(await derived.mac(data))).toBe(false);
      await expect(parent.sign(data)).rejects.toMatchObject({ code: 'USAGE_NOT_PERMITTED' });

      const e = await envB.importWrapped(blob, { label: 'stolen', usages: ['sign'] }).then(() => undefined, (err: unknown) => err);
      expect(e).toBeInstanceOf(SealError);
      expect((e as SealError).backendCode).toMatch(/^TPM_RC_/);
      expect((await envB.listKeys({ label: 'stolen' })).length).toBe(0);
    } finally {
      await envA.close();
      await envB.close();
    }
  });

  it('a key kept at a persistent handle is used there (Name checked) and removed from NV on destroy', async () => {
    const env = (await openEnvironment(a.tpm.uri(join(work, 'keys-persistent')))) as Tpm2Environment;
    const persistentHandles = (): string[] => run('tpm2_getcap', ['-T', a.tpm.tcti, 'handles-persistent']).stdout.split('\n').filter((l) => l.includes('0x')).map((l) => l.replace(/^- /, '').trim().toLowerCase());
    try {
      const key = await env.generateKey({ label: 'persistent', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { persistentHandle: 0x81000010 } });
      expect(persistentHandles()).toContain('0x81000010');
      const spki = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
      // tpm2-tools read the same public key at that handle
      const pub = run('tpm2_readpublic', ['-T', a.tpm.tcti, '-c', '0x81000010', '-f', 'pem', '-o', join(work, 'persistent.pem')]);
      expect(pub.status, pub.stderr).toBe(0);
      expect(createPublicKey(readFileSync(join(work, 'persistent.pem'))).export({ type: 'spki', format: 'der' }).equals(key.publicKey!)).toBe(true);
      await expect(env.generateKey({ label: 'same-handle', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { persistentHandle: 0x81000010 } })).rejects.toMatchObject({ code: 'KEY_EXISTS' });
      await key.destroy();
      expect(persistentHandles()).not.toContain('0x81000010');
    } finally {
      await env.close();
    }
    expect(transientHandles(a.tpm.tcti)).toEqual([]);
  });

  it('exclusive=on flushes what a crashed process left in a TPM without a resource manager', async () => {
    const keystore = join(work, 'keys-crash');
    // a process that loads a key and its salted session, then dies without closing
    const crash = run(process.execPath, ['--import', join(root, 'test', 'integration', 'support', 'ts-loader.mjs'), '--input-type=module', '-e', `
      const { openEnvironment } = await import(${JSON.stringify(join(root, 'src', 'index.ts'))});
      const env = await openEnvironment(${JSON.stringify(a.tpm.uri(keystore))});
      const key = await env.generateKey({ label: 'left-behind', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
      await key.sign(Buffer.from('x'));
      process.exit(0);`]);
    expect(crash.status, crash.stderr).toBe(0);
    expect(transientHandles(a.tpm.tcti).length).toBeGreaterThan(0);
    const sessions = (): string[] => run('tpm2_getcap', ['-T', a.tpm.tcti, 'handles-loaded-session']).stdout.split('\n').filter((l) => l.includes('0x'));
    expect(sessions().length).toBeGreaterThan(0);
    const env = (await openEnvironment(`${a.tpm.uri(keystore)}&exclusive=on`)) as Tpm2Environment;
    try {
      const key = await env.getKey('left-behind');
      expect(nodeVerify('sha256', data, createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' }), await key.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
    expect(transientHandles(a.tpm.tcti)).toEqual([]);
    expect(sessions()).toEqual([]);
  });

  it('check() (seal doctor) reports what a crash or a foreign key store leaves behind', async () => {
    const envA = (await openEnvironment(a.tpm.uri(join(work, 'keys-check-a')))) as Tpm2Environment;
    const envB = (await openEnvironment(b.tpm.uri(join(work, 'keys-check-b')))) as Tpm2Environment;
    try {
      const key = await envA.generateKey({ label: 'foreign', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
      expect(await envA.check()).toEqual([]);
      // a key file copied into another TPM's key store: present, but that TPM cannot load it
      for (const ext of ['pem', 'json']) copyFileSync(join(work, 'keys-check-a', `${key.id}.${ext}`), join(work, 'keys-check-b', `${key.id}.${ext}`));
      // what a kill -9 in the middle of a key-store write can leave
      writeFileSync(join(work, 'keys-check-b', '00112233.pem'), 'orphan');
      writeFileSync(join(work, 'keys-check-b', '44556677.json'), '{}');
      writeFileSync(join(work, 'keys-check-b', `${key.id}.json.1234.tmp`), '');
      const problems = await envB.check();
      expect(problems.some((p) => p.startsWith('00112233.pem') && /without metadata/.test(p))).toBe(true);
      expect(problems.some((p) => p.startsWith('44556677.json') && /without key file/.test(p))).toBe(true);
      expect(problems.some((p) => /\.tmp: interrupted write/.test(p))).toBe(true);
      expect(problems.some((p) => p.startsWith(`${key.id}.json`) && /does not load in this TPM \(TPM_RC_/.test(p))).toBe(true);
      expect(problems).toHaveLength(4);
    } finally {
      await envA.close();
      await envB.close();
    }
  });

  it('AES keys encrypt with TPM2_EncryptDecrypt2 (AES-CFB, asked for explicitly), in chunks, and decrypt back', async () => {
    const env = (await openEnvironment(a.tpm.uri(join(work, 'keys-aes')))) as Tpm2Environment;
    try {
      for (const length of [128, 256] as const) {
        const key = await env.generateKey({ label: `aes-${length}`, algorithm: { name: 'AES', length }, usages: ['encrypt', 'decrypt'] });
        expect(key.kind).toBe('secret');
        const plaintext = randomBytes(3000); // three TPM2_EncryptDecrypt2 calls, the IV chained
        await expect(key.encrypt(plaintext)).rejects.toMatchObject({ code: 'NOT_SUPPORTED' }); // AES-GCM: not in TPMs
        const { ciphertext, iv } = await key.encrypt(plaintext, { algorithm: 'AES-CFB' });
        expect(iv!.length).toBe(16);
        expect(ciphertext.length).toBe(plaintext.length);
        expect(ciphertext.equals(plaintext)).toBe(false);
        expect((await key.decrypt(ciphertext, { algorithm: 'AES-CFB', iv })).equals(plaintext)).toBe(true);
        // CFB: the same IV gives the same stream; a flipped ciphertext bit flips the same plaintext bit
        expect((await key.encrypt(plaintext, { algorithm: 'AES-CFB', iv: iv! })).ciphertext.equals(ciphertext)).toBe(true);
        const flipped = Buffer.from(ciphertext);
        flipped[2000] = flipped[2000]! ^ 0x01;
        const back = await key.decrypt(flipped, { algorithm: 'AES-CFB', iv });
        expect(back[2000]).toBe(plaintext[2000]! ^ 0x01);
        await expect(key.decrypt(ciphertext, { algorithm: 'AES-CFB' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      }
      await expect(env.generateKey({ label: 'aes-wrap', algorithm: { name: 'AES', length: 256 }, usages: ['wrapKey'] })).rejects.toMatchObject({ code: 'NOT_SUPPORTED' });
    } finally {
      await env.close();
    }
  });

  it('NV: an owner index is defined, written, read back (also by tpm2_nvread) and deleted', async () => {
    const env = (await openEnvironment(a.tpm.uri(join(work, 'keys-nv')))) as Tpm2Environment;
    const index = 0x01500020;
    try {
      const value = randomBytes(48);
      await env.nvWrite(index, value);
      expect((await env.nvRead(index, 48)).equals(value)).toBe(true);
      const r = run('tpm2_nvread', ['-T', a.tpm.tcti, '-C', 'o', '-s', '48', `0x${index.toString(16)}`, '-o', join(work, 'nv.bin')]);
      expect(r.status, r.stderr).toBe(0);
      expect(readFileSync(join(work, 'nv.bin')).equals(value)).toBe(true);
      await env.nvDelete(index);
      await expect(env.nvRead(index, 48)).rejects.toBeInstanceOf(SealError);
      await expect(env.nvWrite(0x00000001, value)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    } finally {
      await env.close();
    }
  });

  it('parameter encryption can be turned off; both modes sign, decrypt and unseal', async () => {
    for (const pe of ['on', 'off']) {
      const env = (await openEnvironment(`${a.tpm.uri(join(work, `keys-pe-${pe}`))}&param-encryption=${pe}`)) as Tpm2Environment;
      try {
        expect(env.conn.paramEncryption).toBe(pe === 'on');
        const rsa = await env.generateKey({ label: 'rsa', algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['decrypt', 'encrypt'] });
        const secret = randomBytes(32);
        const { ciphertext } = await rsa.encrypt(secret);
        expect((await rsa.decrypt(ciphertext)).equals(secret)).toBe(true);
        await env.writeData('sealed', secret);
        expect((await env.readData('sealed')).equals(secret)).toBe(true);
      } finally {
        await env.close();
      }
    }
  });
});

describe('TPM 2.0 auth values and the dictionary-attack lockout', () => {
  let tpm: Swtpm;
  const keystore = join(work, 'keys-da');

  beforeAll(async () => {
    tpm = await Swtpm.create('tpm-da');
    await tpm.start();
    // 3 failures allowed, one forgotten every 10 s; lockout auth empty on a fresh swtpm
    const r = run('tpm2_dictionarylockout', ['-T', tpm.tcti, '-s', '-n', '3', '-t', '10', '-l', '10']);
    expect(r.status, r.stderr).toBe(0);
  });

  afterAll(async () => {
    delete process.env.SEAL_TEST_KEY_AUTH;
    await tpm?.stop();
  });

  const lockoutCounter = (): number => {
    const r = run('tpm2_getcap', ['-T', tpm.tcti, 'properties-variable']);
    const m = /TPM2_PT_LOCKOUT_COUNTER:\s*(?:raw:\s*)?(0x[0-9a-fA-F]+|\d+)/.exec(r.stdout);
    expect(m, r.stdout.slice(0, 400)).not.toBeNull();
    return Number(m![1]);
  };

  it('a wrong auth value costs exactly one try and says how many are left; the lockout is PIN_LOCKED with its recovery time', async () => {
    process.env.SEAL_TEST_KEY_AUTH = 'x7-planted-good-auth';
    const env = (await openEnvironment(tpm.uri(keystore))) as Tpm2Environment;
    try {
      const key = await env.generateKey({ label: 'with-auth', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'], tpm: { authSource: 'env:SEAL_TEST_KEY_AUTH' } });
      const spki = createPublicKey({ key: key.publicKey!, format: 'der', type: 'spki' });
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
      expect(lockoutCounter()).toBe(0);

      process.env.SEAL_TEST_KEY_AUTH = 'x7-planted-bad-auth';
      const first = await key.sign(data).then(() => undefined, (e: unknown) => e);
      expect(first).toBeInstanceOf(SealError);
      expect((first as SealError).code).toBe('PIN_INCORRECT');
      expect((first as SealError).triesLeft).toBe(2);
      expect((first as SealError).message).not.toContain('x7-planted-bad-auth');
      expect(lockoutCounter()).toBe(1); // one call, one try: nothing retried

      for (const left of [1, 0]) {
        await expect(key.sign(data)).rejects.toMatchObject({ code: 'PIN_INCORRECT', triesLeft: left });
      }
      const locked = await key.sign(data).then(() => undefined, (e: unknown) => e);
      expect((locked as SealError).code).toBe('PIN_LOCKED');
      expect((locked as SealError).message).toMatch(/lockout.*about \d+ s/);
      expect(lockoutCounter()).toBe(3);

      // the owner of lockout auth clears it; the right value works again
      expect(run('tpm2_dictionarylockout', ['-T', tpm.tcti, '-c']).status).toBe(0);
      process.env.SEAL_TEST_KEY_AUTH = 'x7-planted-good-auth';
      expect(nodeVerify('sha256', data, spki, await key.sign(data))).toBe(true);
    } finally {
      await env.close();
    }
  });
});
