/**
 * The virtual PIV card (test/sim/cards/piv-card.ts) as outside tools see it through pcscd + vpcd:
 * yubico-piv-tool 2.2 (status, generate, import-certificate, verify-pin, test-signature,
 * test-decipher, attest, unblock-pin) and OpenSC 0.23 (pkcs11-tool, opensc-tool), with openssl
 * checking every signature and certificate. Expected values come from those tools, openssl and
 * node:crypto, never from the card's code.
 *
 * The card is the one the simulator runs (`SEAL_PIV_READER`, secrets in
 * `$SEAL_SIM_DIR/cards/piv/`). This file replaces the key and certificate in slot 9A (OpenSC lists
 * only 9A/9C/9D/9E) and uses retired slots 82 and 83 for RSA and P-384; the PIN retry counter is
 * put back to full before the file ends. Secrets go to the tools on stdin (yubico-piv-tool
 * --stdin-input) or through a pseudo-terminal (pkcs11-tool reads its PIN only from a terminal),
 * never on a command line.
 *
 * yubico-piv-tool 2.2 cannot create certificates on this system (selfsign-certificate and
 * request-certificate fail inside the tool with OpenSSL 3, Yubico/yubico-piv-tool#388, before any
 * APDU is sent), so certificates for the card's keys are issued by a throw-away openssl CA.
 *
 * yubico-piv-tool 2.2 knows only 3DES management keys; the AES variants are checked against the
 * card object directly at the end.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { createCipheriv, createDecipheriv, createHash, createPublicKey, randomBytes, randomInt, verify as nodeVerify } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireEnv } from '../helpers/env.js';
import { openEnvironment } from '../../src/index.js';
import { openVirtualPivCard } from '../sim/cards/piv-card.js';

const OPENSC_MODULE = '/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so';
const PIV_SELECT = '00:A4:04:00:05:A0:00:00:03:08';

const reader = (): string => requireEnv('SEAL_PIV_READER');
const pivDir = (): string => join(requireEnv('SEAL_SIM_DIR'), 'cards', 'piv');
const secret = (name: 'piv-pin' | 'piv-puk' | 'piv-mgmt-key' | 'piv-mgmt-alg'): string =>
  readFileSync(join(pivDir(), name), 'utf8').replace(/\r?\n$/, '');

interface Run {
  status: number | null;
  out: string;
}

function run(cmd: string, args: string[], input?: string): Run {
  const r = spawnSync(cmd, args, { input: input ?? '', encoding: 'utf8', timeout: 60_000 });
  if (r.error) throw r.error;
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

const ykpiv = (args: string[], input?: string): Run => run('yubico-piv-tool', ['-r', reader(), ...args], input);
/** An action that needs the management key: `-k` without a value plus --stdin-input reads it from stdin. */
const withMgmtKey = (args: string[]): Run => ykpiv(['--stdin-input', '-k', ...args], secret('piv-mgmt-key') + '\n');
/** verify-pin first, the PIN from stdin, then `args`. */
const withPin = (args: string[], pin = secret('piv-pin')): Run => ykpiv(['--stdin-input', '-a', 'verify-pin', ...args], pin + '\n');

function pinTriesLeft(): number {
  const r = ykpiv(['-a', 'status']);
  expect(r.status, r.out).toBe(0);
  const m = /PIN tries left:\s*(\d+)/.exec(r.out);
  expect(m, r.out).not.toBeNull();
  return Number(m![1]);
}

/** Status word of an empty VERIFY (SP 800-73-4: 63Cx = x tries left, 6983 = blocked), sent raw by opensc-tool. */
function emptyVerifySw(): string {
  const r = run('opensc-tool', ['-r', reader(), '-s', PIV_SELECT, '-s', '00:20:00:80']);
  const sws = [...r.out.matchAll(/SW1=0x([0-9A-F]{2}), SW2=0x([0-9A-F]{2})/gi)].map((m) => `${m[1]}${m[2]}`.toUpperCase());
  expect(sws, r.out).toHaveLength(2);
  expect(sws[0], 'SELECT of the PIV application').toBe('9000');
  return sws[1]!;
}

/** A PIN of the right form that is not the card's. */
function wrongPin(): string {
  const pin = secret('piv-pin');
  for (;;) {
    const candidate = String(randomInt(1_000_000)).padStart(6, '0');
    if (candidate !== pin) return candidate;
  }
}

const shellQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** The first descendant of `root` whose command name is `name` (from /proc/<pid>/stat). */
function descendantNamed(root: number, name: string): number | undefined {
  const procs: { pid: number; ppid: number; comm: string }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      procs.push({ pid: Number(entry), comm: stat.slice(stat.indexOf('(') + 1, close), ppid: Number(stat.slice(close + 2).split(' ')[1]) });
    } catch {
      // the process ended while we looked
    }
  }
  const family = new Set([root]);
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of procs) if (family.has(p.ppid) && !family.has(p.pid)) (family.add(p.pid), (grew = true));
  }
  return procs.find((p) => p.comm === name && family.has(p.pid))?.pid;
}

/** True while `pid` sits in read(0, …) — for pkcs11-tool, the moment after its PIN prompt turned echo off. */
function readingStdin(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/syscall`, 'utf8').startsWith('0 0x0 ');
  } catch {
    return false;
  }
}

/**
 * Runs pkcs11-tool on OpenSC's module, limited to the PIV reader, under a pseudo-terminal (util-linux
 * `script`; pkcs11-tool 0.23 reads a PIN only from a terminal) and answers each PIN prompt with the
 * next of `pins`. A PIN is written only once pkcs11-tool waits in read() on the terminal, i.e.
 * after it switched echo off and flushed its input, so the PIN is neither echoed nor lost. The
 * output never carries a PIN: any occurrence is masked and reported as `leaked`.
 */
function pkcs11Tool(args: string[], pins: string[] = []): Promise<Run & { leaked: boolean }> {
  const command = ['pkcs11-tool', '--module', OPENSC_MODULE, '--slot-description', reader(), ...args].map(shellQuote).join(' ');
  return new Promise((resolve, reject) => {
    const child = spawn('script', ['-qefc', command, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let prompts = 0;
    let answered = 0;
    let poller: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const answer = (): void => {
      if (poller || answered >= prompts) return;
      poller = setInterval(() => {
        const pid = descendantNamed(child.pid!, 'pkcs11-tool');
        if (pid === undefined || !readingStdin(pid)) return;
        clearInterval(poller);
        poller = undefined;
        const pin = pins[answered++];
        child.stdin.write(pin === undefined ? '\n' : pin + '\n');
        answer();
      }, 10);
    };
    const onData = (d: Buffer): void => {
      out += d.toString('utf8');
      prompts = out.match(/PIN:/g)?.length ?? 0;
      answer();
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      clearInterval(poller);
      let leaked = false;
      for (const pin of pins) {
        if (pin && out.includes(pin)) {
          leaked = true;
          out = out.split(pin).join('<PIN>');
        }
      }
      resolve({ status, out, leaked });
    });
  });
}

function spkiOfPem(pem: string): Buffer {
  return createPublicKey(pem).export({ format: 'der', type: 'spki' });
}

describe('virtual PIV card through pcscd, seen by yubico-piv-tool, OpenSC and openssl', () => {
  let work: string;
  let caKey: string;
  let caCert: string;
  const pub: Record<string, string> = {};

  /** A certificate for `pubPem`, issued by the throw-away CA (openssl 3 `x509 -new -force_pubkey`). */
  function issueCertificate(slot: string, pubPem: string): string {
    const pubFile = join(work, `pub-${slot}.pem`);
    const certFile = join(work, `cert-${slot}.pem`);
    writeFileSync(pubFile, pubPem);
    const r = run('openssl', ['x509', '-new', '-force_pubkey', pubFile, '-subj', `/CN=seal-piv-${slot}`, '-CA', caCert, '-CAkey', caKey, '-days', '2', '-out', certFile]);
    expect(r.status, r.out).toBe(0);
    return certFile;
  }

  function generate(slot: string, algorithm: string): string {
    const out = join(work, `generated-${slot}.pem`);
    const r = withMgmtKey(['-a', 'generate', '-s', slot, '-A', algorithm, '-o', out]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successfully generated a new private key.');
    return readFileSync(out, 'utf8');
  }

  function importCertificate(slot: string, certFile: string): void {
    const r = withMgmtKey(['-a', 'import-certificate', '-s', slot, '-i', certFile]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successfully imported a new certificate.');
  }

  beforeAll(() => {
    reader();
    pivDir();
    work = mkdtempSync(join(tmpdir(), 'seal-piv-tools-'));
    caKey = join(work, 'ca.key');
    caCert = join(work, 'ca.pem');
    let r = run('openssl', ['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', caKey]);
    expect(r.status, r.out).toBe(0);
    r = run('openssl', ['req', '-x509', '-new', '-key', caKey, '-subj', '/CN=seal-piv-test-ca', '-days', '2', '-out', caCert]);
    expect(r.status, r.out).toBe(0);
  });

  afterAll(() => {
    // leave the PIN counter full whatever happened above: unblock with the PUK, or one right PIN
    try {
      const tries = pinTriesLeft();
      if (tries === 0) ykpiv(['--stdin-input', '-a', 'unblock-pin'], `${secret('piv-puk')}\n${secret('piv-pin')}\n`);
      else if (tries < 3) withPin([]);
    } finally {
      if (work) rmSync(work, { recursive: true, force: true });
    }
  });

  it('keeps its secrets in 0600 files of a 0700 directory, the management key 3DES for yubico-piv-tool 2.2', () => {
    expect(statSync(pivDir()).mode & 0o777).toBe(0o700);
    for (const name of ['piv-pin', 'piv-puk', 'piv-mgmt-key', 'piv-mgmt-alg'] as const) {
      expect(statSync(join(pivDir(), name)).mode & 0o777, name).toBe(0o600);
    }
    expect(secret('piv-pin')).toMatch(/^\d{6,8}$/);
    expect(secret('piv-puk')).toMatch(/^\d{8}$/);
    expect(secret('piv-mgmt-alg')).toBe('3des');
    expect(secret('piv-mgmt-key')).toMatch(/^[0-9a-f]{48}$/);
  });

  it('yubico-piv-tool status: version, serial (the same as GET SERIAL sent by opensc-tool), CHUID, CCC, 3 PIN tries', () => {
    // one right PIN puts the counter at its maximum whatever ran before
    expect(withPin([]).status).toBe(0);
    const r = ykpiv(['-a', 'status']);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toMatch(/Version:\s*5\.\d+\.\d+/);
    const serial = Number(/Serial Number:\s*(\d+)/.exec(r.out)?.[1]);
    expect(serial).toBeGreaterThan(0);
    expect(r.out).toMatch(/CHUID:\s*3019/); // FASC-N (tag 30, 25 bytes) opens the CHUID
    expect(r.out).toMatch(/CCC:\s*f015/); // card identifier (tag F0, 21 bytes) opens the CCC
    expect(r.out).toMatch(/PIN tries left:\s*3/);

    const apdu = run('opensc-tool', ['-r', reader(), '-s', PIV_SELECT, '-s', '00:F8:00:00']);
    const hex = /Sending: 00 F8 00 00\s*Received \(SW1=0x90, SW2=0x00\):\s*([0-9A-F]{2}(?: [0-9A-F]{2}){3})/i.exec(apdu.out)?.[1];
    expect(hex, apdu.out).toBeDefined();
    expect(Buffer.from(hex!.replace(/ /g, ''), 'hex').readUInt32BE(0)).toBe(serial);
  });

  it('generates a P-256 key in slot 9A only with the right management key', () => {
    const refused = ykpiv(['--stdin-input', '-k', '-a', 'generate', '-s', '9a', '-A', 'ECCP256', '-o', join(work, 'x.pem')], randomBytes(24).toString('hex') + '\n');
    expect(refused.status).not.toBe(0);
    expect(refused.out).not.toContain('Successfully generated');

    pub['9a'] = generate('9a', 'ECCP256');
    const key = createPublicKey(pub['9a']);
    expect(key.asymmetricKeyType).toBe('ec');
    expect(key.asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
  });

  it('imports a certificate for 9A and gives it back unchanged', () => {
    const certFile = issueCertificate('9a', pub['9a']!);
    importCertificate('9a', certFile);
    const back = join(work, 'back-9a.pem');
    const r = ykpiv(['-a', 'read-certificate', '-s', '9a', '-o', back]);
    expect(r.status, r.out).toBe(0);
    const der = (file: string): Buffer => spawnSync('openssl', ['x509', '-in', file, '-outform', 'DER']).stdout;
    expect(der(back).length).toBeGreaterThan(100);
    expect(der(back)).toEqual(der(certFile));
  });

  it('signs with 9A after verify-pin (yubico-piv-tool test-signature checks the ECDSA signature against the certificate)', () => {
    const r = withPin(['-a', 'test-signature', '-s', '9a', '-i', join(work, 'cert-9a.pem')]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successfully verified PIN.');
    expect(r.out).toContain('Successful ECDSA verification.');
  });

  it('refuses to sign with 9A without the PIN', () => {
    const r = ykpiv(['-a', 'test-signature', '-s', '9a', '-i', join(work, 'cert-9a.pem')]);
    expect(r.status).not.toBe(0);
    expect(r.out).not.toContain('Successful ECDSA verification.');
  });

  it('OpenSC lists the 9A certificate and public key, and after login the private key', async () => {
    const listed = await pkcs11Tool(['--list-objects']);
    expect(listed.status, listed.out).toBe(0);
    expect(listed.out).toContain('Certificate for PIV Authentication');
    expect(listed.out).toContain('CN=seal-piv-9a');
    // the EC_POINT OpenSC shows is the DER OCTET STRING (04 41 …) of the point yubico-piv-tool printed
    const point = spkiOfPem(pub['9a']!).subarray(-65);
    expect(listed.out.toLowerCase()).toContain(`0441${point.toString('hex')}`);

    const pin = secret('piv-pin');
    const logged = await pkcs11Tool(['--login', '--list-objects', '--type', 'privkey'], [pin]);
    expect(logged.status, logged.out).toBe(0);
    expect(logged.out).toMatch(/Private Key Object; EC/);
    expect(logged.out).toMatch(/ID:\s*01/);
    expect(logged.leaked).toBe(false);
  });

  it('OpenSC signs with ECDSA on 9A and openssl verifies it with the public key OpenSC read', async () => {
    const digest = randomBytes(32);
    const digestFile = join(work, 'digest.bin');
    const sigFile = join(work, 'sig-9a.der');
    const pubFile = join(work, 'opensc-pub-9a.der');
    writeFileSync(digestFile, digest);
    const pin = secret('piv-pin');
    const signed = await pkcs11Tool(['--login', '--sign', '--mechanism', 'ECDSA', '--id', '01', '-i', digestFile, '-o', sigFile, '--signature-format', 'openssl'], [pin]);
    expect(signed.status, signed.out).toBe(0);
    expect(signed.leaked).toBe(false);
    const read = await pkcs11Tool(['--read-object', '--type', 'pubkey', '--id', '01', '-o', pubFile]);
    expect(read.status, read.out).toBe(0);
    // OpenSC's public key is the one the card generated
    expect(createPublicKey({ key: readFileSync(pubFile), format: 'der', type: 'spki' }).export({ format: 'der', type: 'spki' })).toEqual(spkiOfPem(pub['9a']!));
    const verified = run('openssl', ['pkeyutl', '-verify', '-pubin', '-keyform', 'DER', '-inkey', pubFile, '-in', digestFile, '-sigfile', sigFile]);
    expect(verified.status, verified.out).toBe(0);
    expect(verified.out).toContain('Signature Verified Successfully');
    // and a signature over another digest does not verify
    writeFileSync(digestFile, randomBytes(32));
    expect(run('openssl', ['pkeyutl', '-verify', '-pubin', '-keyform', 'DER', '-inkey', pubFile, '-in', digestFile, '-sigfile', sigFile]).status).not.toBe(0);

    // a signature made through seal-bridge verifies with openssl against the key OpenSC read
    const env = await openEnvironment(requireEnv('SEAL_PIV_URI'));
    try {
      const message = randomBytes(200);
      const messageFile = join(work, 'message.bin');
      const sealSig = join(work, 'seal-sig-9a.der');
      writeFileSync(messageFile, message);
      writeFileSync(sealSig, await (await env.getKey('9a')).sign(message));
      const pem = join(work, 'opensc-pub-9a.pem');
      writeFileSync(pem, createPublicKey({ key: readFileSync(pubFile), format: 'der', type: 'spki' }).export({ format: 'pem', type: 'spki' }));
      const ok = run('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', sealSig, messageFile]);
      expect(ok.out.trim()).toBe('Verified OK');
    } finally {
      await env.close();
    }
  });

  it('attests 9A: the certificate carries the slot public key and verifies under the F9 attestation certificate', () => {
    const attestation = join(work, 'attest-9a.pem');
    const f9 = join(work, 'f9.pem');
    let r = ykpiv(['-a', 'attest', '-s', '9a', '-o', attestation]);
    expect(r.status, r.out).toBe(0);
    r = ykpiv(['-a', 'read-certificate', '-s', 'f9', '-o', f9]);
    expect(r.status, r.out).toBe(0);
    const verified = run('openssl', ['verify', '-CAfile', f9, attestation]);
    expect(verified.status, verified.out).toBe(0);
    const attestedKey = run('openssl', ['x509', '-in', attestation, '-noout', '-pubkey']).out;
    expect(spkiOfPem(attestedKey)).toEqual(spkiOfPem(pub['9a']!));
    const text = run('openssl', ['x509', '-in', attestation, '-noout', '-subject', '-ext', '1.3.6.1.4.1.41482.3.7']).out;
    expect(text).toContain('YubiKey PIV Attestation 9a');
    // a certificate made outside the card does not verify under F9
    expect(run('openssl', ['verify', '-CAfile', f9, join(work, 'cert-9a.pem')]).status).not.toBe(0);
  });

  it('a wrong PIN costs exactly one try (yubico-piv-tool status and a raw empty VERIFY agree); the right PIN restores the counter', () => {
    expect(pinTriesLeft()).toBe(3);
    expect(emptyVerifySw()).toBe('63C3');
    const r = withPin([], wrongPin());
    expect(r.status).not.toBe(0);
    expect(r.out).toContain('2 tries left');
    expect(pinTriesLeft()).toBe(2);
    expect(emptyVerifySw()).toBe('63C2');
    expect(withPin([]).status).toBe(0);
    expect(pinTriesLeft()).toBe(3);
  });

  it('a wrong PIN through OpenSC costs exactly one try too', async () => {
    expect(pinTriesLeft()).toBe(3);
    const r = await pkcs11Tool(['--login', '--list-objects', '--type', 'privkey'], [wrongPin()]);
    expect(r.status).not.toBe(0);
    expect(r.out).toContain('CKR_PIN_INCORRECT');
    expect(r.leaked).toBe(false);
    expect(pinTriesLeft()).toBe(2);
    expect(withPin([]).status).toBe(0);
    expect(pinTriesLeft()).toBe(3);
  });

  it('three wrong PINs block it; the right PIN is refused then; the PUK unblocks it', () => {
    for (let i = 0; i < 3; i++) expect(withPin([], wrongPin()).status).not.toBe(0);
    expect(pinTriesLeft()).toBe(0);
    expect(emptyVerifySw()).toBe('6983');
    const blocked = withPin([]);
    expect(blocked.status).not.toBe(0);
    expect(blocked.out).toContain('blocked');
    // unblock-pin reads the PUK and then the new PIN (the same PIN again, so the secret file stays right)
    const unblocked = ykpiv(['--stdin-input', '-a', 'unblock-pin'], `${secret('piv-puk')}\n${secret('piv-pin')}\n`);
    expect(unblocked.status, unblocked.out).toBe(0);
    expect(pinTriesLeft()).toBe(3);
    expect(withPin([]).status).toBe(0);
  });

  it('RSA-2048 in retired slot 82: long answers (61xx), chained import, raw RSA sign and decrypt', () => {
    pub['82'] = generate('82', 'RSA2048');
    const key = createPublicKey(pub['82']);
    expect(key.asymmetricKeyType).toBe('rsa');
    expect(key.asymmetricKeyDetails?.modulusLength).toBe(2048);
    expect(key.asymmetricKeyDetails?.publicExponent).toBe(65537n);
    const certFile = issueCertificate('82', pub['82']);
    importCertificate('82', certFile);
    let r = withPin(['-a', 'test-signature', '-s', '82', '-i', certFile]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successful RSA verification.');
    r = withPin(['-a', 'test-decipher', '-s', '82', '-i', certFile]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successfully performed RSA decryption!');
  });

  it('P-384 in retired slot 83: ECDH and ECDSA', () => {
    pub['83'] = generate('83', 'ECCP384');
    expect(createPublicKey(pub['83']).asymmetricKeyDetails?.namedCurve).toBe('secp384r1');
    const certFile = issueCertificate('83', pub['83']);
    importCertificate('83', certFile);
    let r = withPin(['-a', 'test-decipher', '-s', '83', '-i', certFile]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successfully performed ECDH exchange with card.');
    r = withPin(['-a', 'test-signature', '-s', '83', '-i', certFile]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Successful ECDSA verification.');
  });
});

/** The card object itself, without pcscd: what no installed tool can drive (AES management keys) and its answers to bad commands. */
describe('virtual PIV card object (AES management keys, malformed commands, state files)', () => {
  let dirs: string[] = [];
  const newDir = (): string => {
    const d = join(mkdtempSync(join(tmpdir(), 'seal-piv-card-')), 'piv');
    dirs.push(d);
    return d;
  };
  afterAll(() => {
    for (const d of dirs) rmSync(join(d, '..'), { recursive: true, force: true });
    dirs = [];
  });

  const hex = (s: string): Buffer => Buffer.from(s.replace(/\s/g, ''), 'hex');
  const swOf = (r: Buffer): string => r.subarray(-2).toString('hex').toUpperCase();
  const SELECT = hex('00A4040005A000000308');
  const AES = { aes128: ['aes-128-ecb', 0x08], aes192: ['aes-192-ecb', 0x0a], aes256: ['aes-256-ecb', 0x0c] } as const;

  for (const [name, [cipher, alg]] of Object.entries(AES)) {
    it(`mutual authentication with an ${name} management key (SP 800-73-4 witness / challenge)`, async () => {
      const dir = newDir();
      const card = openVirtualPivCard(dir, { mgmtAlg: name as keyof typeof AES });
      expect(readFileSync(join(dir, 'piv-mgmt-alg'), 'utf8').trim()).toBe(name);
      const key = Buffer.from(readFileSync(join(dir, 'piv-mgmt-key'), 'utf8').trim(), 'hex');
      expect(key.length).toBe({ aes128: 16, aes192: 24, aes256: 32 }[name]);
      const ecb = (encrypt: boolean, block: Buffer): Buffer => {
        const c = encrypt ? createCipheriv(cipher, key, null) : createDecipheriv(cipher, key, null);
        c.setAutoPadding(false);
        return Buffer.concat([c.update(block), c.final()]);
      };
      const putData = hex('00DB3FFF0C 5C035FC109 5305 0102030405');
      expect(swOf(await card.transmit(SELECT))).toBe('9000');
      expect(swOf(await card.transmit(putData)), 'PUT DATA before authentication').toBe('6982');
      // 3DES (03) is refused when the key is AES
      expect(swOf(await card.transmit(hex('0087039B047C028000')))).toBe('6A86');

      const witnessAnswer = await card.transmit(Buffer.from([0x00, 0x87, alg, 0x9b, 0x04, 0x7c, 0x02, 0x80, 0x00]));
      expect(swOf(witnessAnswer)).toBe('9000');
      expect(witnessAnswer.subarray(0, 4)).toEqual(Buffer.from([0x7c, 0x12, 0x80, 0x10]));
      const witness = ecb(false, witnessAnswer.subarray(4, 20));
      const challenge = randomBytes(16);
      const step2 = Buffer.concat([Buffer.from([0x00, 0x87, alg, 0x9b, 0x26, 0x7c, 0x24, 0x80, 0x10]), witness, Buffer.from([0x81, 0x10]), challenge]);
      const answer = await card.transmit(step2);
      expect(swOf(answer)).toBe('9000');
      expect(answer.subarray(4, 20)).toEqual(ecb(true, challenge));
      expect(swOf(await card.transmit(putData)), 'PUT DATA after authentication').toBe('9000');

      // a wrong witness is refused and leaves the card unauthenticated
      await card.transmit(Buffer.from([0x00, 0x87, alg, 0x9b, 0x04, 0x7c, 0x02, 0x80, 0x00]));
      const bad = Buffer.concat([Buffer.from([0x00, 0x87, alg, 0x9b, 0x26, 0x7c, 0x24, 0x80, 0x10]), randomBytes(16), Buffer.from([0x81, 0x10]), challenge]);
      expect(swOf(await card.transmit(bad))).toBe('6982');
      expect(swOf(await card.transmit(putData))).toBe('6982');
    });
  }

  it('answers malformed and unknown commands with ISO 7816-4 status words and keeps working', async () => {
    const card = openVirtualPivCard(newDir());
    expect(swOf(await card.transmit(hex('00CB3FFF055C035FC105'))), 'GET DATA before SELECT').toBe('6D00');
    expect(swOf(await card.transmit(SELECT))).toBe('9000');
    expect(swOf(await card.transmit(hex('00A4040005A000000999'))), 'SELECT of an absent AID').toBe('6A82');
    expect(swOf(await card.transmit(hex('00990000'))), 'unknown INS').toBe('6D00');
    expect(swOf(await card.transmit(hex('80CB3FFF055C035FC105'))), 'proprietary CLA').toBe('6E00');
    expect(swOf(await card.transmit(hex('00CB3FFE055C035FC105'))), 'GET DATA P1P2').toBe('6A86');
    expect(swOf(await card.transmit(hex('00CB3FFF055C035F'))), 'Lc longer than the data').toBe('6700');
    expect(swOf(await card.transmit(hex('00CB3F'))), 'truncated header').toBe('6700');
    expect(swOf(await card.transmit(hex('00CB3FFF045C045FC1'))), 'truncated tag list').toBe('6A80');
    expect(swOf(await card.transmit(hex('0087119A037C0482'))), 'truncated dynamic authentication template').toBe('6A80');
    expect(swOf(await card.transmit(hex('002000800401020304'))), 'VERIFY with 4 bytes').toBe('6700');
    expect(swOf(await card.transmit(hex('0047009A05AC03800111'))), 'GENERATE without management key').toBe('6982');
    expect(swOf(await card.transmit(hex('00CB3FFF055C035FC105'))), 'empty certificate object').toBe('6A82');
    const discovery = await card.transmit(hex('00CB3FFF035C017E'));
    expect(swOf(discovery)).toBe('9000');
    expect(discovery.subarray(0, 4)).toEqual(hex('7E124F0B'));
    // GET RESPONSE with nothing pending, then a normal command still works
    expect(swOf(await card.transmit(hex('00C0000000')))).toBe('6985');
    expect(swOf(await card.transmit(hex('0020008000'))).startsWith('63C')).toBe(true);
  });

  /** Mutual authentication with the card's 3DES management key, computed with node:crypto. */
  async function authenticate3des(card: ReturnType<typeof openVirtualPivCard>, dir: string): Promise<void> {
    const key = Buffer.from(readFileSync(join(dir, 'piv-mgmt-key'), 'utf8').trim(), 'hex');
    const des = (encrypt: boolean, block: Buffer): Buffer => {
      const c = encrypt ? createCipheriv('des-ede3', key, null) : createDecipheriv('des-ede3', key, null);
      c.setAutoPadding(false);
      return Buffer.concat([c.update(block), c.final()]);
    };
    const w = await card.transmit(hex('0087039B047C028000'));
    expect(swOf(w)).toBe('9000');
    const challenge = randomBytes(8);
    const r = await card.transmit(Buffer.concat([hex('0087039B167C148008'), des(false, w.subarray(4, 12)), hex('8108'), challenge]));
    expect(swOf(r)).toBe('9000');
    expect(r.subarray(4, 12)).toEqual(des(true, challenge));
  }

  it('enforces PIN policies: 9A once per session, 9C before every signature, 9E never; ECDSA verifies with node:crypto', async () => {
    const dir = newDir();
    const card = openVirtualPivCard(dir);
    const pin = Buffer.alloc(8, 0xff);
    pin.write(readFileSync(join(dir, 'piv-pin'), 'utf8').trim(), 'latin1');
    expect(swOf(await card.transmit(SELECT))).toBe('9000');
    await authenticate3des(card, dir);
    const keys: Record<string, ReturnType<typeof createPublicKey>> = {};
    for (const slot of ['9A', '9C', '9E']) {
      const g = await card.transmit(hex(`004700${slot}05AC03800111`));
      expect(swOf(g)).toBe('9000');
      // 7F49 41 86 41 04 X Y (SP 800-73-4 Part 2 Table 13); build a JWK to let node:crypto check it is a P-256 point
      expect(g.subarray(0, 5)).toEqual(hex('7F49438641'));
      const point = g.subarray(5, 70);
      keys[slot] = createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33, 65).toString('base64url') }, format: 'jwk' });
    }
    const message = randomBytes(64);
    const digest = createHash('sha256').update(message).digest();
    const sign = async (slot: string): Promise<Buffer> => card.transmit(Buffer.concat([hex(`008711${slot}267C2482008120`), digest]));
    const signatureOf = (answer: Buffer): Buffer => {
      // 7C L 82 L DER-signature
      expect(answer[0]).toBe(0x7c);
      expect(answer[answer[1] === 0x81 ? 3 : 2]).toBe(0x82);
      return answer.subarray(answer[1] === 0x81 ? 5 : 4, -2);
    };

    expect(swOf(await sign('9A')), '9A without PIN').toBe('6982');
    expect(swOf(await sign('9C')), '9C without PIN').toBe('6982');
    const e = await sign('9E');
    expect(swOf(e), '9E needs no PIN').toBe('9000');
    expect(nodeVerify('sha256', message, keys['9E']!, signatureOf(e))).toBe(true);

    expect(swOf(await card.transmit(Buffer.concat([hex('0020008008'), pin])))).toBe('9000');
    for (let i = 0; i < 2; i++) {
      const a = await sign('9A');
      expect(swOf(a), `9A use ${i + 1} after one VERIFY`).toBe('9000');
      expect(nodeVerify('sha256', message, keys['9A']!, signatureOf(a))).toBe(true);
    }
    const c = await sign('9C');
    expect(swOf(c), '9C right after VERIFY').toBe('9000');
    expect(nodeVerify('sha256', message, keys['9C']!, signatureOf(c))).toBe(true);
    expect(swOf(await sign('9C')), '9C again without a new VERIFY').toBe('6982');
    // a signature by 9A does not verify under 9C's key
    expect(nodeVerify('sha256', message, keys['9C']!, signatureOf(await sign('9A')))).toBe(false);
    // a new session (card reset) forgets the PIN
    card.reset();
    expect(swOf(await card.transmit(SELECT))).toBe('9000');
    expect(swOf(await sign('9A')), '9A after reset').toBe('6982');
  });

  it('writes state and secrets 0600 through temp files, keeps counters across reopen, forgets the PIN on reset', async () => {
    const dir = newDir();
    const card = openVirtualPivCard(dir);
    expect(swOf(await card.transmit(SELECT))).toBe('9000');
    const wrong = Buffer.alloc(8, 0xff);
    wrong.write(secret0(dir) === '000000' ? '111111' : '000000', 'latin1');
    expect(swOf(await card.transmit(Buffer.concat([hex('0020008008'), wrong])))).toBe('63C2');
    const right = Buffer.alloc(8, 0xff);
    right.write(secret0(dir), 'latin1');

    expect(statSync(dir).mode & 0o777).toBe(0o700);
    for (const f of readdirSync(dir)) expect(statSync(join(dir, f)).mode & 0o777, f).toBe(0o600);
    expect(readdirSync(dir).filter((f) => f.includes('.tmp'))).toEqual([]);

    const again = openVirtualPivCard(dir);
    expect(swOf(await again.transmit(SELECT))).toBe('9000');
    expect(swOf(await again.transmit(hex('00200080'))), 'the counter survived the reopen').toBe('63C2');
    expect(swOf(await again.transmit(Buffer.concat([hex('0020008008'), right])))).toBe('9000');
    expect(swOf(await again.transmit(hex('00200080'))), 'verified').toBe('9000');
    again.reset();
    expect(swOf(await again.transmit(SELECT))).toBe('9000');
    expect(swOf(await again.transmit(hex('00200080'))), 'reset forgot the PIN, counter full again').toBe('63C3');
  });

  function secret0(dir: string): string {
    return readFileSync(join(dir, 'piv-pin'), 'utf8').replace(/\r?\n$/, '');
  }
});
