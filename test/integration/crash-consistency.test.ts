/**
 * kill -9 in the middle of writes. A child process (the sources through the ts-loader, as
 * tpm2-backend.test.ts runs its crashing child) creates keys in a loop — some signed with, some
 * destroyed again, some sealed data — and is SIGKILLed at a random moment, several rounds over the
 * same store. Afterwards:
 *
 * - TPM key store: every `.pem` is a complete TSS2 key file (tpm2_print reads it), every `.json`
 *   parses and names its own id, `.tmp` files are interrupted writes (reported); `check()` names
 *   exactly the orphans a directory listing shows, nothing else; every listed key loads and signs
 *   (ECDSA verified by node:crypto); every key the child reported as created is there, every one
 *   it reported destroyed is gone; deleting what check() names leaves check() empty.
 * - PKCS#11 (the embedded SoftHSM2 token in a SEAL_HOME of this file's own): every key the child
 *   reported as created is a complete pair that signs (verified by node:crypto), destroyed ones
 *   are gone, and half pairs exist only for keys whose creation or destruction the kill cut
 *   short; what SoftHSM2 left is printed (`crash:` lines).
 *
 * The children and the verifying environment use a swtpm of this file's own: a killed child
 * leaves objects and sessions in a TPM without a resource manager, and `exclusive=on` (which
 * flushes them at connection) is only safe where this file is the TPM's only user. The PKCS#11
 * children use their own token for the same reason: a kill in the middle of a SoftHSM2 object
 * write must not damage the token other test files share.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createPublicKey, randomInt, verify as nodeVerify } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import pkcs11 from 'pkcs11js';
import type { Handle, PKCS11 } from 'pkcs11js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openEnvironment, type KeyHandle, type SecureEnvironment, type Tpm2Environment } from '../../src/index.js';
import { OwnSwtpm } from '../helpers/swtpm.js';

const root = resolve(import.meta.dirname, '..', '..');
const loader = join(root, 'test', 'integration', 'support', 'ts-loader.mjs');
const index = join(root, 'src', 'index.ts');
const ROUNDS = 6;
const data = Buffer.from('still signs after kill -9');
let work: string;

/** What a child reported before it was killed (lines `created <id> <label>`, `destroying <id>`, …). */
interface ChildLog {
  created: Map<string, string>; // id → label
  destroying: Set<string>;
  destroyed: Set<string>;
  sealed: Set<string>;
  /** Per round, the label of the key the child was making when it was killed. */
  inFlight: Set<string>;
}

const emptyLog = (): ChildLog => ({ created: new Map(), destroying: new Set(), destroyed: new Set(), sealed: new Set(), inFlight: new Set() });

/**
 * The child's loop: key i of round r is labelled `r<r>-k<i>`; it prints a line after each step,
 * synchronously (stdout is a pipe), so what it printed before the kill happened.
 */
function childCode(uri: string | undefined, round: number, kinds: 'tpm' | 'pkcs11'): string {
  return `
    const { openEnvironment } = await import(${JSON.stringify(index)});
    const env = await openEnvironment(${uri === undefined ? '' : JSON.stringify(uri)});
    const say = (l) => process.stdout.write(l + '\\n');
    say('ready');
    for (let i = 0; ; i++) {
      const label = 'r${round}-k' + i;
      const algorithm = ${kinds === 'tpm'
        ? "i % 3 === 2 ? { name: 'HMAC', hash: 'SHA-256' } : { name: 'ECDSA', namedCurve: 'P-256' }"
        : "i % 6 === 5 ? { name: 'RSA', modulusLength: 2048 } : { name: 'ECDSA', namedCurve: 'P-256' }"};
      const key = await env.generateKey({ label, algorithm, usages: ['sign', 'verify'] });
      say('created ' + key.id + ' ' + label);
      if (i % 4 === 1) await key.sign(Buffer.from('loaded'));
      if (i % 5 === 4) { say('destroying ' + key.id); await key.destroy(); say('destroyed ' + key.id); }
      ${kinds === 'tpm' ? "if (i % 7 === 3) { await env.writeData(label + '-data', Buffer.from(label)); say('sealed ' + label + '-data'); }" : ''}
    }`;
}

/** Runs one round: starts the child, waits for `ready`, kills it with SIGKILL after `afterMs`. */
async function killRound(round: number, code: string, env: NodeJS.ProcessEnv, afterMs: number, log: ChildLog): Promise<{ lines: number; stderr: string }> {
  const child = spawn(process.execPath, ['--import', loader, '--input-type=module', '-e', code], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
  const deadline = Date.now() + 60_000;
  while (!out.includes('ready\n')) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the child did not get ready: ${stderr.slice(-1500)}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, afterMs));
  child.kill('SIGKILL');
  const end = await exited;
  expect(end.signal, `the child ended before the kill: ${stderr.slice(-1500)}`).toBe('SIGKILL');
  // the pipe may still hold the last lines: let them arrive
  await new Promise<void>((r) => (child.stdout!.readableEnded ? r() : child.stdout!.once('end', () => r())));
  const lines = out.split('\n').filter((l) => l !== '');
  let lastIndex = -1;
  for (const l of lines) {
    const [what, a, b] = l.split(' ');
    if (what === 'created') {
      log.created.set(a!, b!);
      lastIndex = Number(/-k(\d+)$/.exec(b!)![1]);
    } else if (what === 'destroying') log.destroying.add(a!);
    else if (what === 'destroyed') log.destroyed.add(a!);
    else if (what === 'sealed') log.sealed.add(a!);
  }
  // the key after the last one reported may exist (made, but killed before the line was written)
  log.inFlight.add(`r${round}-k${lastIndex + 1}`);
  return { lines: lines.length, stderr };
}

const keyOf = (k: KeyHandle) => createPublicKey({ key: k.publicKey!, format: 'der', type: 'spki' });

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), 'seal-crash-'));
});

afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

// ---- TPM ----------------------------------------------------------------------------------------

describe('kill -9 during TPM key-store writes (own swtpm)', () => {
  let tpm: OwnSwtpm;
  let keystore: string;

  beforeAll(async () => {
    tpm = await OwnSwtpm.start(join(work, 'swtpm'));
    keystore = join(work, 'tpm-keys');
  });

  afterAll(async () => {
    await tpm?.stop();
  });

  it(`${ROUNDS} rounds of SIGKILL while creating, signing, destroying and sealing: no half-written file, check() names exactly the orphans, every listed key signs, the repair empties check()`, async () => {
    const log = emptyLog();
    // each child is the TPM's only user while it runs: exclusive=on flushes what the last one left
    const uri = tpm.uri(keystore, '&exclusive=on');
    let lines = 0;
    const delays: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const after = randomInt(100, 900);
      delays.push(after);
      lines += (await killRound(round, childCode(uri, round, 'tpm'), { ...process.env }, after, log)).lines;
    }
    const leftTransient = tpm.handles('handles-transient').length;
    const leftSessions = tpm.handles('handles-loaded-session').length;

    // ---- the files, read without the code under test
    const names = readdirSync(keystore);
    const pems = names.filter((n) => n.endsWith('.pem'));
    const jsons = names.filter((n) => n.endsWith('.json') && n !== 'srk.json');
    const tmps = names.filter((n) => n.endsWith('.tmp'));
    const others = names.filter((n) => !n.endsWith('.pem') && !n.endsWith('.json') && !n.endsWith('.tmp'));
    expect(others, 'only key files, metadata and interrupted writes').toEqual([]);
    for (const p of pems) {
      // tpm2-tools read the TSS2 PEM key file: a truncated or half-written one fails here
      const r = spawnSync('tpm2_print', ['-t', 'TSSPRIVKEY_OBJ', join(keystore, p)], { encoding: 'utf8' });
      expect(r.status, `${p}: ${r.stderr}`).toBe(0);
    }
    const metas = new Map<string, { id: string; label: string; kind: string }>();
    for (const j of jsons) {
      const meta = JSON.parse(readFileSync(join(keystore, j), 'utf8')) as { version: number; id: string; label: string; kind: string };
      expect(meta.version, j).toBe(1);
      expect(`${meta.id}.json`).toBe(j);
      metas.set(meta.id, meta);
    }
    const base = (n: string): string => n.replace(/\.(pem|json)$/, '');
    const orphanPems = pems.filter((p) => !jsons.includes(`${base(p)}.json`));
    const danglingJsons = jsons.filter((j) => !pems.includes(`${base(j)}.pem`));
    // metadata is written after its key file and removed before it: never metadata without a key file
    expect(danglingJsons).toEqual([]);

    const env = (await openEnvironment(uri)) as Tpm2Environment;
    try {
      const problems = await env.check();
      const named = problems.map((p) => /^(\S+?):/.exec(p)?.[1] ?? p).sort();
      expect(named, problems.join('\n')).toEqual([...tmps, ...orphanPems, ...danglingJsons].sort());
      expect(problems.filter((p) => /does not load/.test(p))).toEqual([]);

      // ---- what the child reported, against what the store lists
      const listed = await env.listKeys();
      const listedIds = new Set(listed.map((k) => k.id));
      const mustExist = [...log.created.keys()].filter((id) => !log.destroying.has(id));
      expect(mustExist.filter((id) => !listedIds.has(id)), 'every key reported created (and not being destroyed) is listed').toEqual([]);
      expect([...log.destroyed].filter((id) => listedIds.has(id) || existsSync(join(keystore, `${id}.json`))), 'destroyed keys are gone').toEqual([]);
      const unreported = listed.filter((k) => !log.created.has(k.id));
      for (const k of unreported) expect(log.inFlight, `${k.label} was never reported: only the key in flight at a kill may be`).toContain(k.label);
      let signed = 0;
      for (const k of listed) {
        if (k.algorithm.name === 'ECDSA') {
          expect(nodeVerify('sha256', data, keyOf(k), await k.sign(data)), k.label).toBe(true);
        } else {
          const mac = await k.mac(data);
          expect(mac.length).toBe(32);
          expect(await k.verify(data, mac)).toBe(true);
          expect((await k.mac(data)).equals(mac)).toBe(true);
        }
        signed++;
      }
      for (const label of log.sealed) expect((await env.readData(label)).toString()).toBe(label.replace(/-data$/, ''));

      // ---- the documented repair: delete what check() names
      for (const n of named) rmSync(join(keystore, n));
      expect(await env.check()).toEqual([]);
      expect((await env.listKeys()).length).toBe(listed.length);
      console.log(`crash: TPM key store after ${ROUNDS} kills at ${delays.join('/')} ms after ready: ${lines} steps reported, ${log.created.size} keys created, ${log.destroyed.size} destroyed (${log.destroying.size - log.destroyed.size} destroy cut short), ${log.sealed.size} sealed`);
      console.log(`crash: TPM files: ${pems.length} .pem, ${jsons.length} .json, ${tmps.length} .tmp (interrupted writes), ${orphanPems.length} key files without metadata, 0 metadata without key file; ${unreported.length} keys made but not reported; ${listed.length} listed keys all signed (${signed}); check() named ${problems.length}, repaired`);
      console.log(`crash: TPM objects the killed children left: ${leftTransient} transient, ${leftSessions} sessions (flushed by exclusive=on)`);
    } finally {
      await env.close();
    }
    expect(tpm.handles('handles-transient')).toEqual([]);
    expect(tpm.handles('handles-loaded-session')).toEqual([]);
  });

  it('metadata cut short (what a power loss can leave of a file renamed before it reached the disk) is named by check(), not silently skipped', async () => {
    const env = (await openEnvironment(tpm.uri(keystore, '&exclusive=on'))) as Tpm2Environment;
    try {
      const key = await env.generateKey({ label: 'cut-short', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign'] });
      const file = join(keystore, `${key.id}.json`);
      const text = readFileSync(file, 'utf8');
      writeFileSync(file, text.slice(0, Math.floor(text.length / 2)));
      expect((await env.listKeys({ label: 'cut-short' })).length).toBe(0);
      const problems = await env.check();
      expect(problems.map((p) => /^(\S+?):/.exec(p)?.[1])).toEqual([`${key.id}.json`]);
      expect(problems[0]).toMatch(/unreadable/);
      rmSync(file);
      rmSync(join(keystore, `${key.id}.pem`));
      expect(await env.check()).toEqual([]);
    } finally {
      await env.close();
    }
  });
});

// ---- PKCS#11 ------------------------------------------------------------------------------------

interface TokenObject {
  handle: Handle;
  cls: 'private' | 'public' | 'secret' | 'other';
  id: string;
  label: string;
  /** Public keys: whether the key material is there (CKA_EC_POINT of a point's length, CKA_MODULUS of 256 bytes). */
  material?: string;
}

interface RawToken {
  lib: PKCS11;
  slot: Handle;
}

const rawToken = (env: SecureEnvironment): RawToken => (env as unknown as { pool: RawToken }).pool;

function withSession<T>({ lib, slot }: RawToken, fn: (s: Handle) => T): T {
  const s = lib.C_OpenSession(slot, pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION);
  try {
    return fn(s);
  } finally {
    lib.C_CloseSession(s);
  }
}

/** Every object of the token, read through the module the environment loaded (a session of our own; the login is the token's). */
function tokenObjects(token: RawToken): TokenObject[] {
  const { lib } = token;
  return withSession(token, (s) => {
    lib.C_FindObjectsInit(s, []);
    const handles: Handle[] = [];
    for (let batch = lib.C_FindObjects(s, 100); batch.length > 0; batch = lib.C_FindObjects(s, 100)) handles.push(...batch);
    lib.C_FindObjectsFinal(s);
    return handles.map((h) => {
      const [c, id, label, kt] = lib.C_GetAttributeValue(s, h, [{ type: pkcs11.CKA_CLASS }, { type: pkcs11.CKA_ID }, { type: pkcs11.CKA_LABEL }, { type: pkcs11.CKA_KEY_TYPE }]);
      const n = (c!.value as Buffer).readUInt32LE(0);
      const cls = n === pkcs11.CKO_PRIVATE_KEY ? 'private' : n === pkcs11.CKO_PUBLIC_KEY ? 'public' : n === pkcs11.CKO_SECRET_KEY ? 'secret' : 'other';
      const o: TokenObject = { handle: h, cls, id: (id!.value as Buffer | undefined)?.toString('hex') ?? '', label: (label!.value as Buffer | undefined)?.toString('utf8') ?? '' };
      if (cls === 'public') {
        const keyType = (kt!.value as Buffer).readUInt32LE(0);
        const attr = keyType === pkcs11.CKK_RSA ? pkcs11.CKA_MODULUS : pkcs11.CKA_EC_POINT;
        const [v] = lib.C_GetAttributeValue(s, h, [{ type: attr }]);
        const len = (v!.value as Buffer | undefined)?.length ?? 0;
        // P-256: DER OCTET STRING 04 41 ‖ 04 ‖ X ‖ Y = 67 bytes; RSA-2048: 256 bytes of modulus
        const whole = keyType === pkcs11.CKK_RSA ? len === 256 : len === 67;
        o.material = whole ? 'complete' : `${keyType === pkcs11.CKK_RSA ? 'CKA_MODULUS' : 'CKA_EC_POINT'} of ${len} bytes`;
      }
      return o;
    });
  });
}

describe('kill -9 during PKCS#11 key creation (embedded SoftHSM2 token of its own)', () => {
  let home: string;
  let env: SecureEnvironment | undefined;
  const saved = process.env.SEAL_HOME;

  beforeAll(() => {
    home = join(work, 'seal-home');
  });

  afterAll(async () => {
    await env?.close();
    if (saved === undefined) delete process.env.SEAL_HOME;
    else process.env.SEAL_HOME = saved;
  });

  it(`${ROUNDS} rounds of SIGKILL while generating and destroying key pairs: reported keys are whole pairs that sign, destroyed ones are gone, half-made objects only where the kill cut an operation short; removing those leaves a clean listing`, async () => {
    const log = emptyLog();
    const childEnv: NodeJS.ProcessEnv = { ...process.env, SEAL_HOME: home };
    delete childEnv.SOFTHSM2_CONF;
    delete childEnv.SEAL_PIN;
    let lines = 0;
    const delays: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const after = randomInt(100, 900);
      delays.push(after);
      lines += (await killRound(round, childCode(undefined, round, 'pkcs11'), childEnv, after, log)).lines;
    }
    const objectFiles = readdirSync(join(home, 'tokens')).flatMap((t) => readdirSync(join(home, 'tokens', t)).filter((f) => f.endsWith('.object')));

    process.env.SEAL_HOME = home;
    env = await openEnvironment();
    expect(env.info.label).toBe('seal-default');
    const token = rawToken(env);
    const objects = tokenObjects(token);
    expect(objects.filter((o) => o.cls !== 'private' && o.cls !== 'public'), 'only key pairs were made').toEqual([]);
    const byId = new Map<string, TokenObject[]>();
    for (const o of objects) byId.set(o.id, [...(byId.get(o.id) ?? []), o]);
    const whole = (id: string): boolean => {
      const os = byId.get(id) ?? [];
      return os.length === 2 && os.some((o) => o.cls === 'private') && os.some((o) => o.cls === 'public' && o.material === 'complete');
    };
    const cutShort = (id: string, label: string): boolean => log.destroying.has(id) || (!log.created.has(id) && log.inFlight.has(label));
    const state = (id: string): string => (byId.get(id) ?? []).map((o) => `${o.cls}${o.material && o.material !== 'complete' ? ` with ${o.material}` : ''}`).join(' + ') || 'nothing';

    // a key whose generation returned and that nobody destroyed is a whole pair; destroyed keys are gone
    for (const [id, label] of log.created) if (!log.destroying.has(id)) expect(state(id), `${label} was reported created`).toBe(whole(id) ? state(id) : 'a whole pair');
    for (const id of log.destroyed) expect(byId.has(id), `${log.created.get(id)} was reported destroyed`).toBe(false);
    // anything else on the token belongs to an operation a kill cut short: a key of the round's
    // last label, or objects SoftHSM2 had created but not yet given their attributes (no id, no
    // label: at most one pair per kill)
    const suspects = [...byId].filter(([id]) => !log.created.has(id) || log.destroying.has(id));
    const anonymous = byId.get('')?.filter((o) => o.label === '') ?? [];
    expect(anonymous.length, `objects without id and label: ${state('')}`).toBeLessThanOrEqual(2 * ROUNDS);
    expect(anonymous.filter((o) => o.cls === 'public' && o.material === 'complete'), 'an anonymous public key with its point').toEqual([]);
    for (const [id, os] of suspects) if (id !== '') expect(cutShort(id, os[0]!.label), `${os[0]!.label} (${state(id)}) was never reported`).toBe(true);
    const damaged = suspects.filter(([id]) => !whole(id));
    const describeSuspect = ([id, os]: [string, TokenObject[]]): string =>
      id === '' ? `${os.length} objects without id or label: ${state(id)} (generation cut short before SoftHSM2 wrote their attributes)` : `${os[0]!.label}: ${state(id)} (${log.destroying.has(id) ? 'destroy' : 'generation'} cut short)`;

    // listKeys over what the kills left: a damaged object (a public key whose material SoftHSM2 had
    // not written yet) makes the whole listing fail today — see the test below
    let before = '';
    try {
      before = `${(await env.listKeys()).length} keys`;
    } catch (e) {
      const err = e as { code?: string; message?: string };
      before = `fails: ${err.code}: ${err.message}`;
      expect(damaged.filter(([, os]) => os.some((o) => o.material !== undefined && o.material !== 'complete')).length, `listKeys failed (${before}) without a damaged public key on the token`).toBeGreaterThan(0);
    }

    // every key reported created signs, found by its own label (node:crypto verifies)
    const mustExist = [...log.created].filter(([id]) => !log.destroying.has(id));
    for (const [, label] of mustExist) {
      const k = await env.getKey(label, 'private');
      expect(nodeVerify('sha256', data, keyOf(k), await k.sign(data)), label).toBe(true);
    }

    // the repair: remove every object of an operation cut short that did not leave a whole pair.
    // SoftHSM2 lists objects whose attributes it never wrote, but refuses to destroy them
    // (CKR_OBJECT_HANDLE_INVALID): only deleting their files from the token directory removes those
    const undestroyable: TokenObject[] = [];
    withSession(token, (s) => {
      for (const [, os] of damaged) {
        for (const o of os) {
          try {
            token.lib.C_DestroyObject(s, o.handle);
          } catch (e) {
            if (!/CKR_OBJECT_HANDLE_INVALID/.test(String(e))) throw e;
            undestroyable.push(o);
          }
        }
      }
    });
    let after = '';
    let signed = 0;
    const outcome = await env.listKeys().then((l) => l, (e: unknown) => e);
    if (Array.isArray(outcome)) {
      expect(mustExist.filter(([id]) => !outcome.some((k) => k.id === id)), 'every key reported created is listed').toEqual([]);
      for (const k of outcome) {
        expect(k.kind, `${k.label}: only whole pairs are left, listed by their private key`).toBe('private');
        expect(nodeVerify('sha256', data, keyOf(k), await k.sign(data)), k.label).toBe(true);
        signed++;
      }
      after = `${outcome.length} keys, all whole pairs, ${signed} signed and verified`;
    } else {
      // only the known bug below, and only while SoftHSM2 keeps an object it will not destroy
      expect(undestroyable.length, String(outcome)).toBeGreaterThan(0);
      expect(outcome).toMatchObject({ code: 'INVALID_ARGUMENT' });
      after = `still fails (KNOWN BUG): ${(outcome as Error).message}`;
    }
    console.log(`crash: PKCS#11 after ${ROUNDS} kills at ${delays.join('/')} ms after ready: ${lines} steps reported, ${log.created.size} key pairs created, ${log.destroyed.size} destroyed (${log.destroying.size - log.destroyed.size} destroy cut short); SoftHSM2 token: ${objectFiles.length} object files, ${byId.size} key ids`);
    console.log(`crash: PKCS#11 operations cut short: ${suspects.length}${suspects.length ? ` — ${suspects.map(describeSuspect).join('; ')}` : ''}`);
    console.log(`crash: PKCS#11 listKeys before the repair: ${before}; ${damaged.length} half-made keys removed${undestroyable.length ? ` (${undestroyable.length} objects without attributes SoftHSM2 refused to destroy: CKR_OBJECT_HANDLE_INVALID)` : ''}; after: ${after}; ${mustExist.length} keys reported created all signed by label`);
  });

  // Known bug (src/backends/pkcs11/environment.ts, listKeys → #record → spkiFromAttributes): an
  // object whose key material cannot be read — what a process killed inside C_GenerateKeyPair
  // leaves on SoftHSM2 — makes listKeys() fail for the whole token with INVALID_ARGUMENT
  // ('malformed CKA_EC_POINT'), where foreign key types (NOT_SUPPORTED) are skipped. Until that is
  // fixed this case checks the failure is exactly that one and says so (`crash: KNOWN BUG`); once
  // listKeys skips or reports such objects it checks the other keys are listed.
  it('one public key with unreadable material (as a kill inside C_GenerateKeyPair leaves it) and listKeys: KNOWN BUG, the whole listing fails', async () => {
    process.env.SEAL_HOME = home;
    env ??= await openEnvironment();
    const good = await env.generateKey({ label: 'good', algorithm: { name: 'ECDSA', namedCurve: 'P-256' }, usages: ['sign', 'verify'] });
    const token = rawToken(env);
    // what SoftHSM2 holds between creating the public object and writing its point: the
    // template's attributes, and no point
    const damaged = withSession(token, (s) =>
      token.lib.C_CreateObject(s, [
        { type: pkcs11.CKA_CLASS, value: pkcs11.CKO_PUBLIC_KEY },
        { type: pkcs11.CKA_KEY_TYPE, value: pkcs11.CKK_EC },
        { type: pkcs11.CKA_TOKEN, value: true },
        { type: pkcs11.CKA_LABEL, value: 'damaged' },
        { type: pkcs11.CKA_ID, value: Buffer.from('d4', 'hex') },
        { type: pkcs11.CKA_EC_PARAMS, value: Buffer.from('06082a8648ce3d030107', 'hex') }, // P-256
        { type: pkcs11.CKA_EC_POINT, value: Buffer.alloc(0) },
      ]),
    );
    try {
      expect(tokenObjects(token).find((o) => o.label === 'damaged')?.material).toBe('CKA_EC_POINT of 0 bytes');
      const outcome = await env.listKeys().then((l) => l, (e: unknown) => e);
      if (Array.isArray(outcome)) {
        expect(outcome.map((k) => k.label)).toContain('good');
        expect(outcome.filter((k) => k.label === 'damaged' && k.publicKey !== undefined)).toEqual([]);
      } else {
        expect(outcome).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'malformed CKA_EC_POINT' });
        console.log('crash: KNOWN BUG: one public key object without its point (left by a kill inside C_GenerateKeyPair) makes listKeys() fail for the whole token: INVALID_ARGUMENT malformed CKA_EC_POINT');
      }
      // a key asked for by its own label is not affected
      expect((await env.getKey('good')).publicKey!.equals(good.publicKey!)).toBe(true);
    } finally {
      withSession(token, (s) => token.lib.C_DestroyObject(s, damaged));
      await good.destroy();
    }
  });
});
