#!/usr/bin/env node
/**
 * The `seal` command. Human output by default, `--json` for scripts, `--env <uri>` everywhere
 * (no --env: the embedded default). Errors end with a non-zero exit code and one line naming
 * the error code and reason; no PIN or secret is ever printed.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { openEnvironment, registeredSchemes } from '../index.js';
import { SealError, asSealError } from '../core/errors.js';
import { algorithmShortName, checkUsages, shortAlgorithm, type KeyUsage } from '../core/algorithms.js';
import { PROTECTION_LEVELS } from '../core/protection.js';
import { SealUri } from '../core/uri.js';
import type { KeyHandle, SecureEnvironment } from '../core/types.js';
import { createCsr } from '../functions/csr.js';
import { runDemo } from '../functions/demo.js';
import { loadKdfShim, kdfShimUnavailableReason } from '../backends/pkcs11/kdf-native.js';

interface Globals {
  env?: string;
  json?: boolean;
  minLevel?: string;
}

const program = new Command();
program
  .name('seal')
  .description('seal-bridge: keys that never leave a secure environment (PKCS#11 HSMs, SoftHSM2, TPM 2.0, smart cards)')
  .option('--env <uri>', 'environment URI (default: the embedded SoftHSM2 token)')
  .option('--json', 'machine-readable output')
  .option('--min-level <n>', 'refuse an environment below this protection level (0-3)')
  .showHelpAfterError()
  .exitOverride();

const globals = (): Globals => program.opts<Globals>();

function out(human: string, json: unknown): void {
  if (globals().json) process.stdout.write(JSON.stringify(json, null, 2) + '\n');
  else if (human) process.stdout.write(human.endsWith('\n') ? human : human + '\n');
}

async function withEnv<T>(fn: (env: SecureEnvironment) => Promise<T>, uri?: string): Promise<T> {
  const g = globals();
  const options = g.minLevel !== undefined ? { minProtectionLevel: Number(g.minLevel) } : {};
  const env = await openEnvironment(uri ?? g.env, options);
  try {
    return await fn(env);
  } finally {
    await env.close();
  }
}

/** A key named by URI opens its own environment unless --env says otherwise. */
async function withKey<T>(keyRef: string, fn: (key: KeyHandle, env: SecureEnvironment) => Promise<T>): Promise<T> {
  if (!keyRef) throw new SealError('INVALID_ARGUMENT', 'name a key with --key <uri|label>');
  const isUri = /^[a-z][a-z0-9+.-]*:/.test(keyRef);
  const envUri = globals().env ?? (isUri ? envOfKeyUri(keyRef) : undefined);
  return withEnv(async (env) => fn(await env.getKey(keyRef), env), envUri);
}

function envOfKeyUri(keyUri: string): string {
  const u = SealUri.parse(keyUri);
  return u.withPath({ object: undefined, id: undefined, type: undefined }).format({ includeSecrets: true });
}

function readInput(path: string): Buffer {
  try {
    return path === '-' ? readFileSync(0) : readFileSync(path);
  } catch {
    throw new SealError('INVALID_ARGUMENT', `cannot read ${path}`);
  }
}

function writeOutput(path: string | undefined, data: Buffer | string): void {
  if (path === undefined || path === '-') process.stdout.write(data);
  else writeFileSync(path, data);
}

function keySummary(k: KeyHandle): Record<string, unknown> {
  return {
    uri: k.uri,
    label: k.label,
    id: k.id,
    kind: k.kind,
    algorithm: algorithmShortName(k.algorithm),
    usages: k.usages,
    provenance: k.provenance,
    ...(k.publicKey ? { publicKeyPem: k.publicKeyPem() } : {}),
  };
}

// ---- doctor ----------------------------------------------------------------------------------

program
  .command('doctor')
  .description('check which environments are reachable; show their info, protection level and capabilities')
  .action(async () => {
    const g = globals();
    const targets: Array<[string, string | undefined]> = g.env
      ? [['--env', g.env]]
      : [['embedded default', undefined], ...['SEAL_SOFTHSM_URI', 'SEAL_TPM_URI', 'SEAL_PIV_URI', 'SEAL_IOTSAFE_URI', 'SEAL_MODEM_URI'].filter((n) => process.env[n]).map((n): [string, string] => [n, process.env[n] ?? ''])];
    const report: Record<string, unknown>[] = [];
    let human = `schemes: ${registeredSchemes().join(', ')}\npkcs11-kdf shim: ${loadKdfShim() ? 'loaded (HKDF, SP 800-108, AES-ECB-ENCRYPT-DATA)' : `unavailable: ${kdfShimUnavailableReason()}`}\n`;
    let failed = false;
    for (const [name, uri] of targets) {
      try {
        await withEnv(async (env) => {
          const i = env.info;
          report.push({ name, reachable: true, uri: env.uri, info: i, capabilities: env.capabilities });
          human += `\n${name}: reachable\n  uri: ${env.uri}\n  token: ${i.label} — ${i.manufacturer} ${i.model}, serial ${i.serial}, firmware ${i.firmware}\n  backend: ${i.backend}\n  protection level: ${i.protectionLevel} (${PROTECTION_LEVELS[i.protectionLevel].name}) — ${i.protectionReason}\n  capabilities:\n`;
          const byAlg = new Map<string, string[]>();
          for (const c of env.capabilities) byAlg.set(c.algorithm, [...(byAlg.get(c.algorithm) ?? []), `${c.operation}${c.result === 'key-inside' ? '*' : c.result === 'secret-leaves' ? '!' : ''}`]);
          for (const [alg, ops] of byAlg) human += `    ${alg.padEnd(14)} ${[...new Set(ops)].join(' ')}\n`;
          human += '    (* result stays inside the module; ! a secret leaves the module)\n';
          if (env.check) {
            const problems = await env.check();
            (report[report.length - 1] as Record<string, unknown>).problems = problems;
            human += problems.length === 0 ? '  records: consistent with the module\n' : `  records: ${problems.length} problem(s)\n${problems.map((p) => `    - ${p}\n`).join('')}`;
            if (problems.length > 0) failed = true;
          }
        }, uri);
      } catch (e) {
        const err = asSealError(e);
        failed = true;
        report.push({ name, reachable: false, error: err.toJSON() });
        human += `\n${name}: NOT reachable — ${err.code}: ${err.message}\n`;
      }
    }
    out(human, { environments: report });
    if (failed) process.exitCode = 1;
  });

// ---- keys ------------------------------------------------------------------------------------

const key = program.command('key').description('create, list, show and delete keys');

key
  .command('create')
  .description('generate a key inside the environment')
  .requiredOption('--label <label>', 'key label')
  .addOption(new Option('--alg <alg>', 'algorithm').choices(['ecdsa-p256', 'ecdsa-p384', 'ed25519', 'rsa-2048', 'rsa-3072', 'rsa-4096', 'ecdh-p256', 'ecdh-p384', 'aes-128', 'aes-256', 'hmac-sha256']).makeOptionMandatory())
  .option('--usages <list>', 'comma-separated usages (default by algorithm), e.g. decrypt,encrypt,unwrapKey')
  .action(async (o: { label: string; alg: string; usages?: string }) => {
    const { algorithm, usages: defaults } = shortAlgorithm(o.alg);
    const usages = o.usages ? checkUsages(algorithm, o.usages.split(',').map((s) => s.trim())) : defaults;
    await withEnv(async (env) => {
      const k = await env.generateKey({ label: o.label, algorithm, usages: usages as KeyUsage[] });
      out(`created ${k.label} (${algorithmShortName(k.algorithm)}, ${k.usages.join(',')})\nuri: ${k.uri}`, keySummary(k));
    });
  });

key
  .command('list')
  .description('list the keys in the environment')
  .action(async () => {
    await withEnv(async (env) => {
      const keys = await env.listKeys();
      const rows = keys.map((k) => `${k.label.padEnd(28)} ${algorithmShortName(k.algorithm).padEnd(12)} ${k.kind.padEnd(8)} ${k.provenance.origin.padEnd(17)} ${k.usages.join(',')}`);
      out([`${'LABEL'.padEnd(28)} ${'ALG'.padEnd(12)} ${'KIND'.padEnd(8)} ${'ORIGIN'.padEnd(17)} USAGES`, ...rows].join('\n'), keys.map(keySummary));
    });
  });

const keyArg = (pos: string | undefined, o: { key?: string }): string => pos ?? o.key ?? '';

key
  .command('show [key]')
  .description('show a key (URI or label)')
  .option('--key <key>', 'key URI or label')
  .action(async (pos: string | undefined, o: { key?: string }) => {
    await withKey(keyArg(pos, o), async (k) => {
      const s = keySummary(k);
      const p = k.provenance;
      out(
        `label: ${k.label}\nuri: ${k.uri}\nid: ${k.id}\nkind: ${k.kind}\nalgorithm: ${algorithmShortName(k.algorithm)}\nusages: ${k.usages.join(', ')}\norigin: ${p.origin}\n` +
          (k.kind !== 'public' ? `sensitive: ${p.sensitive}  extractable: ${p.extractable}  always sensitive: ${p.alwaysSensitive}  never extractable: ${p.neverExtractable}\n` : '') +
          (k.publicKey ? k.publicKeyPem() : ''),
        s,
      );
    });
  });

key
  .command('delete [key]')
  .description('destroy a key (and its public half)')
  .option('--key <key>', 'key URI or label')
  .action(async (pos: string | undefined, o: { key?: string }) => {
    await withKey(keyArg(pos, o), async (k) => {
      await k.destroy();
      out(`deleted ${k.label}`, { deleted: k.uri });
    });
  });

program
  .command('pubkey [key]')
  .description('print the public key (PEM SubjectPublicKeyInfo)')
  .option('--key <key>', 'key URI or label')
  .option('--out <file>', 'write to a file')
  .action(async (pos: string | undefined, o: { key?: string; out?: string }) => {
    await withKey(keyArg(pos, o), async (k) => {
      if (globals().json) out('', { uri: k.uri, publicKeyPem: k.publicKeyPem() });
      else writeOutput(o.out, k.publicKeyPem());
    });
  });

// ---- operations ------------------------------------------------------------------------------

const formatOption = (): Option => new Option('--format <f>', 'ECDSA signature encoding').choices(['der', 'p1363']).default('der');
const schemeOption = (): Option => new Option('--scheme <s>', 'RSA signature scheme').choices(['pkcs1', 'pss']).default('pkcs1');
const hashOption = (): Option => new Option('--hash <h>', 'hash').choices(['SHA-256', 'SHA-384', 'SHA-512']);

const signOptions = (o: { format?: string; scheme?: string; hash?: string }) => ({
  ...(o.format === 'p1363' ? { format: 'p1363' as const } : {}),
  ...(o.scheme === 'pss' ? { scheme: 'RSA-PSS' as const } : {}),
  ...(o.hash ? { hash: o.hash as 'SHA-256' | 'SHA-384' | 'SHA-512' } : {}),
});

program
  .command('sign')
  .description('sign a file inside the environment')
  .requiredOption('--key <key>', 'key URI or label')
  .requiredOption('--in <file>', 'data to sign (- for stdin)')
  .option('--out <file>', 'signature file (default: stdout)')
  .addOption(formatOption())
  .addOption(schemeOption())
  .addOption(hashOption())
  .action(async (o: { key: string; in: string; out?: string; format?: string; scheme?: string; hash?: string }) => {
    const data = readInput(o.in);
    await withKey(o.key, async (k) => {
      const sig = await k.sign(data, signOptions(o));
      if (globals().json) out('', { uri: k.uri, signature: sig.toString('base64') });
      else writeOutput(o.out, sig);
    });
  });

program
  .command('verify')
  .description('verify a signature (exit 1 when it does not verify)')
  .requiredOption('--key <key>', 'key URI or label')
  .requiredOption('--in <file>', 'signed data')
  .requiredOption('--sig <file>', 'signature')
  .addOption(formatOption())
  .addOption(schemeOption())
  .addOption(hashOption())
  .action(async (o: { key: string; in: string; sig: string; format?: string; scheme?: string; hash?: string }) => {
    const data = readInput(o.in);
    const sig = readInput(o.sig);
    await withKey(o.key, async (k) => {
      const valid = await k.verify(data, sig, signOptions(o));
      out(valid ? 'signature valid' : 'signature INVALID', { valid });
      if (!valid) process.exitCode = 1;
    });
  });

program
  .command('encrypt')
  .description('encrypt a file (AES-GCM: output is iv(12) ‖ ciphertext ‖ tag; RSA: RSA-OAEP)')
  .requiredOption('--key <key>', 'key URI or label')
  .requiredOption('--in <file>', 'plaintext (- for stdin)')
  .option('--out <file>', 'ciphertext file (default: stdout)')
  .option('--aad <file>', 'AES-GCM additional authenticated data')
  .action(async (o: { key: string; in: string; out?: string; aad?: string }) => {
    const data = readInput(o.in);
    const aad = o.aad ? readInput(o.aad) : undefined;
    await withKey(o.key, async (k) => {
      const r = await k.encrypt(data, aad ? { additionalData: aad } : {});
      const blob = r.iv ? Buffer.concat([r.iv, r.ciphertext]) : r.ciphertext;
      if (globals().json) out('', { uri: k.uri, ciphertext: blob.toString('base64') });
      else writeOutput(o.out, blob);
    });
  });

program
  .command('decrypt')
  .description('decrypt a file inside the environment (format as written by `seal encrypt`)')
  .requiredOption('--key <key>', 'key URI or label')
  .requiredOption('--in <file>', 'ciphertext (- for stdin)')
  .option('--out <file>', 'plaintext file (default: stdout)')
  .option('--aad <file>', 'AES-GCM additional authenticated data')
  .action(async (o: { key: string; in: string; out?: string; aad?: string }) => {
    const blob = readInput(o.in);
    const aad = o.aad ? readInput(o.aad) : undefined;
    await withKey(o.key, async (k) => {
      const plain =
        k.algorithm.name === 'AES'
          ? await k.decrypt(blob.subarray(12), { iv: blob.subarray(0, 12), ...(aad ? { additionalData: aad } : {}) })
          : await k.decrypt(blob);
      if (globals().json) out('', { uri: k.uri, plaintext: plain.toString('base64') });
      else writeOutput(o.out, plain);
    });
  });

program
  .command('random <n>')
  .description('n random bytes from the environment (hex, or raw with --out)')
  .option('--out <file>', 'write raw bytes to a file')
  .action(async (n: string, o: { out?: string }) => {
    const len = Number(n);
    if (!Number.isInteger(len) || len < 1) throw new SealError('INVALID_ARGUMENT', 'n must be a positive whole number');
    await withEnv(async (env) => {
      const r = await env.random(len);
      if (o.out) writeFileSync(o.out, r);
      else out(r.toString('hex'), { random: r.toString('hex') });
    });
  });

program
  .command('csr')
  .description('create a PKCS#10 certification request signed inside the environment')
  .requiredOption('--key <key>', 'key URI or label')
  .requiredOption('--subject <dn>', 'subject, e.g. "CN=device-1, O=Example"')
  .option('--dns <name...>', 'subjectAltName DNS names')
  .option('--out <file>', 'PEM output file (default: stdout)')
  .addOption(schemeOption())
  .action(async (o: { key: string; subject: string; dns?: string[]; out?: string; scheme?: string }) => {
    await withKey(o.key, async (k) => {
      const pem = await createCsr(k, { subject: o.subject, ...(o.dns ? { dnsNames: o.dns } : {}), rsaScheme: o.scheme === 'pss' ? 'RSA-PSS' : 'RSASSA-PKCS1-v1_5' });
      if (globals().json) out('', { uri: k.uri, csrPem: pem });
      else writeOutput(o.out, pem);
    });
  });

program
  .command('demo')
  .description('walk the device life-cycle on the environment and show what stays inside')
  .option('--replace-keys', 'on cards (fixed key slots): consent to replacing the keys in the slots the demo uses')
  .action(async (o: { replaceKeys?: boolean }) => {
    await withEnv(async (env) => {
      const json = globals().json;
      const result = await runDemo(env, (s) => {
        if (json) return;
        process.stdout.write(`\n== ${s.step}\n`);
        for (const l of s.lines) process.stdout.write(`   ${l}\n`);
        for (const l of s.inside) process.stdout.write(`   [inside] ${l}\n`);
      }, { replaceKeys: o.replaceKeys === true });
      if (json) out('', result);
      else process.stdout.write(`\ndemo complete on ${result.environment.label}: every key stayed inside the module\n`);
    });
  });

async function main(): Promise<void> {
  try {
    await program.parseAsync(process.argv);
  } catch (e) {
    const ce = e as { code?: string; exitCode?: number };
    if (typeof ce.code === 'string' && ce.code.startsWith('commander.')) {
      // help and version exit 0; usage errors were already described by commander
      process.exitCode = ce.exitCode ?? 2;
      if (ce.exitCode && ce.code !== 'commander.helpDisplayed' && ce.code !== 'commander.version') process.exitCode = 2;
      return;
    }
    const err = asSealError(e);
    if (globals().json) process.stdout.write(JSON.stringify({ error: err.toJSON() }) + '\n');
    process.stderr.write(`seal: ${err.code}: ${err.message}${err.backendCode && !err.message.includes(err.backendCode) ? ` (${err.backendCode})` : ''}\n`);
    process.exitCode = 1;
  }
}

await main();
