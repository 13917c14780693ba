/**
 * The device life-cycle walk (oneM2M TR-0008 clause 12 on one secure environment):
 * initialization, service bootstrap, service connection, a security association with a peer,
 * and the proof that nothing can be exported. The "server" and "peer" run here on the host with
 * node:crypto, as they would on another machine; the device's keys stay inside the module.
 */
import 'reflect-metadata';
import {
  constants,
  createCipheriv,
  createDecipheriv,
  createECDH,
  createHmac,
  createPublicKey,
  hkdfSync,
  publicEncrypt,
  randomBytes,
} from 'node:crypto';
import * as x509 from '@peculiar/x509';
import { SealError } from '../core/errors.js';
import { PROTECTION_LEVELS } from '../core/protection.js';
import type { KeyAlgorithmInput, KeyUsage } from '../core/algorithms.js';
import type { KeyHandle, Operation, SecureEnvironment } from '../core/types.js';
import { tpmDerivedHmacKey, wrapForTpm } from '../backends/tpm2/server.js';
import type { WrappedTpmKey } from '../backends/tpm2/environment.js';
import { createCsr } from './csr.js';
import { associationAad, decodeMessage, encodeMessage, hostAeadKey, SecurityAssociation, type AeadKey } from './association.js';

export interface DemoStep {
  step: string;
  lines: string[];
  inside: string[];
}

export interface DemoResult {
  environment: { uri: string; label: string; protectionLevel: number };
  steps: DemoStep[];
  ok: boolean;
}


/** What the module reports about a key, in one line. */
function provenanceLine(k: KeyHandle): string {
  const p = k.provenance;
  return `${k.label}: ${k.kind} ${k.algorithm.name}, origin ${p.origin}, sensitive=${p.sensitive}, extractable=${p.extractable}, alwaysSensitive=${p.alwaysSensitive}, neverExtractable=${p.neverExtractable}`;
}

function hostGcm(key: Buffer, iv: Buffer, aad: Buffer, data: Buffer, decrypt: boolean): Buffer {
  if (decrypt) {
    const d = createDecipheriv('aes-256-gcm', key, iv);
    d.setAAD(aad);
    d.setAuthTag(data.subarray(data.length - 16));
    return Buffer.concat([d.update(data.subarray(0, data.length - 16)), d.final()]);
  }
  const c = createCipheriv('aes-256-gcm', key, iv);
  c.setAAD(aad);
  return Buffer.concat([c.update(data), c.final(), c.getAuthTag()]);
}

/** AES-CBC-ENCRYPT-DATA as the server computes it: AES-256-CBC(root, iv=0, data), no padding. */
function serverDerive(root: Buffer, data: Buffer): Buffer {
  const c = createCipheriv('aes-256-cbc', root, Buffer.alloc(16));
  c.setAutoPadding(false);
  return Buffer.concat([c.update(data), c.final()]);
}

type Keep = <T extends KeyHandle>(k: T) => T;
type Emit = (step: string, lines: string[], inside: string[]) => void;

/** PKCS#11 style: a root key RSA-OAEP-wrapped for a transport key, unwrapped inside; AES-CBC-ENCRYPT-DATA derivation. */
async function bootstrapByUnwrap(env: SecureEnvironment, run: string, keep: Keep, emit: Emit): Promise<KeyHandle[]> {
  const transport = keep(await env.generateKey({ label: `demo-transport-${run}`, algorithm: { name: 'RSA', modulusLength: 2048 }, usages: ['unwrapKey', 'decrypt', 'encrypt'] }));
  const serverRoot = randomBytes(32); // lives on the provisioning server
  const wrappedRoot = publicEncrypt(
    { key: createPublicKey({ key: transport.publicKey!, format: 'der', type: 'spki' }), padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' },
    serverRoot,
  );
  const root = keep(await transport.unwrapKey(wrappedRoot, { wrapAlgorithm: 'RSA-OAEP', label: `demo-root-${run}`, algorithm: { name: 'AES', length: 256 }, usages: ['deriveKey'] }));
  emit('2 service bootstrap', [
    `server wrapped a 256-bit root key for the device's RSA-2048 transport key (RSA-OAEP, ${wrappedRoot.length} bytes on the wire)`,
    `unwrapped inside the module; the device never saw it in clear`,
  ], [provenanceLine(transport), provenanceLine(root)]);

  // 3. Service connection: connection and application keys derived inside from the root key.
  const label = (s: string): Buffer => Buffer.concat([Buffer.from(s.padEnd(16, '\0')), Buffer.from(`device-${run}`.padEnd(16, '\0'))]);
  const conn = keep(await root.deriveKey({ kdf: 'AES-CBC-ENCRYPT-DATA', data: label('connection') }, { label: `demo-conn-${run}`, algorithm: { name: 'AES', length: 256 }, usages: ['encrypt', 'decrypt'] }));
  const app = keep(await root.deriveKey({ kdf: 'AES-CBC-ENCRYPT-DATA', data: label('application') }, { label: `demo-app-${run}`, algorithm: { name: 'AES', length: 256 }, usages: ['encrypt', 'decrypt'] }));
  const hello = Buffer.from(`hello from device-${run}`);
  const aad = Buffer.from('connection');
  const { ciphertext, iv } = await conn.encrypt(hello, { additionalData: aad });
  const serverConn = serverDerive(serverRoot, label('connection'));
  const serverReads = hostGcm(serverConn, iv!, aad, ciphertext, true);
  if (!serverReads.equals(hello)) throw new SealError('INTERNAL', 'server and device derived different connection keys');
  const appCt = await app.encrypt(hello, { additionalData: aad });
  let appDiffers = false;
  try {
    hostGcm(serverConn, appCt.iv!, aad, appCt.ciphertext, true);
  } catch {
    appDiffers = true;
  }
  emit('3 service connection', [
    'connection and application keys derived inside (AES-CBC-ENCRYPT-DATA, diversified by purpose and device id)',
    `server derived the same connection key on its side and decrypted the device's message: "${serverReads.toString()}"`,
    `application key differs from the connection key: ${appDiffers}`,
  ], [provenanceLine(conn), provenanceLine(app)]);
  return [transport, root, conn];
}

interface TpmImport {
  storageKeyPublic(): Promise<Buffer>;
  importWrapped(blob: WrappedTpmKey, spec: { label: string; usages: KeyUsage[] }): Promise<KeyHandle>;
}

function isTpmImport(env: SecureEnvironment): env is SecureEnvironment & TpmImport {
  const e = env as Partial<TpmImport>;
  return typeof e.importWrapped === 'function' && typeof e.storageKeyPublic === 'function';
}

/** TPM style: a derivation secret wrapped for this TPM's storage key (TPM2_Import); keys derived as TPM derived objects. */
async function bootstrapByTpmImport(env: SecureEnvironment & TpmImport, run: string, keep: Keep, emit: Emit): Promise<KeyHandle[]> {
  const serverRoot = randomBytes(32); // lives on the provisioning server
  const blob = wrapForTpm(await env.storageKeyPublic(), { derivationSeed: serverRoot });
  const root = keep(await env.importWrapped(blob, { label: `demo-root-${run}`, usages: ['deriveKey'] }));
  emit('2 service bootstrap', [
    `server wrapped a 256-bit root secret for this TPM's storage key (TPM2_Import duplication blob, ${blob.duplicate.length + blob.seed.length} bytes on the wire)`,
    'imported inside the TPM as a derivation parent; only this TPM can import the blob, and the device never saw the secret in clear',
  ], [provenanceLine(root)]);

  const context = Buffer.from(`device-${run}`);
  const derive = (purpose: string): Promise<KeyHandle> =>
    root.deriveKey({ kdf: 'TPM-DERIVED-OBJECT', label: Buffer.from(purpose), context }, { label: `demo-${purpose}-${run}`, algorithm: { name: 'HMAC', hash: 'SHA-256' }, usages: ['sign', 'verify'] });
  const conn = keep(await derive('connection'));
  const app = keep(await derive('application'));
  const hello = Buffer.from(`hello from device-${run}`);
  const tag = await conn.mac(hello);
  const serverConn = tpmDerivedHmacKey(serverRoot, Buffer.from('connection'), context);
  const serverAccepts = createHmac('sha256', serverConn).update(hello).digest().equals(tag);
  if (!serverAccepts) throw new SealError('INTERNAL', 'server and device derived different connection keys');
  const appDiffers = !(await app.mac(hello)).equals(tag);
  emit('3 service connection', [
    'connection and application keys derived inside the TPM (derived objects: KDFa of the root secret, purpose and device id)',
    `server derived the same connection key on its side and accepted the device's authenticated message: ${serverAccepts}`,
    `application key differs from the connection key: ${appDiffers}`,
  ], [provenanceLine(conn), provenanceLine(app)]);
  return [root, conn];
}

export interface DemoOptions {
  /**
   * Modules with fixed key containers (PIV slots, IoT SAFE containers) get the demo's keys in the
   * containers `containerFor()` names, replacing the keys there for good: only with this consent.
   */
  replaceKeys?: boolean;
}

export async function runDemo(env: SecureEnvironment, report: (s: DemoStep) => void = () => {}, options: DemoOptions = {}): Promise<DemoResult> {
  const fixed = env.traits?.fixedContainers === true;
  if (fixed && !options.replaceKeys) {
    throw new SealError('USAGE_NOT_PERMITTED', `${env.info.label} keeps keys in fixed containers: the demo would replace the keys there for good; run it with --replace-keys (simulators, spare cards) to consent`);
  }
  /** A new key under a demo label, or in the container a fixed-container module names for it. */
  const newKey = async (label: string, algorithm: KeyAlgorithmInput, usages: KeyUsage[]): Promise<KeyHandle> =>
    fixed ? env.generateKey({ label: await env.containerFor!(algorithm, usages), algorithm, usages, replace: true }) : env.generateKey({ label, algorithm, usages });
  const run = randomBytes(4).toString('hex');
  const created: KeyHandle[] = [];
  const steps: DemoStep[] = [];
  const emit = (step: string, lines: string[], inside: string[]): void => {
    const s = { step, lines, inside };
    steps.push(s);
    report(s);
  };
  const keep = <T extends KeyHandle>(k: T): T => {
    created.push(k);
    return k;
  };

  try {
    const lvl = env.info.protectionLevel;
    emit('environment', [
      `${env.info.label} — ${env.info.manufacturer} ${env.info.model} (serial ${env.info.serial})`,
      `protection level ${lvl} (${PROTECTION_LEVELS[lvl].name}): ${env.info.protectionReason}`,
    ], []);

    // 1. Initialization: the device identity key is born inside; the CSR is signed inside.
    const device = keep(await newKey(`demo-device-${run}`, { name: 'ECDSA', namedCurve: 'P-256' }, ['sign', 'verify']));
    const csrPem = await createCsr(device, { subject: `CN=device-${run}, O=seal-bridge demo` });
    const csr = new x509.Pkcs10CertificateRequest(csrPem);
    const csrOk = await csr.verify();
    const samePub = Buffer.from(csr.publicKey.rawData).equals(device.publicKey!);
    if (!csrOk || !samePub) throw new SealError('INTERNAL', 'the CSR does not verify against the device key');
    emit('1 initialization', [
      `device key generated inside: ${device.uri}`,
      `CSR for ${csr.subject} signed inside; signature verifies: ${csrOk}; its public key is the device key's: ${samePub}`,
    ], [provenanceLine(device)]);

    const can = (algorithm: string, operation: Operation, variant?: string): boolean =>
      env.capabilities.some((c) => c.algorithm === algorithm && c.operation === operation && (variant === undefined || c.variant.startsWith(variant)));
    const probed: KeyHandle[] = [device];

    if (can('RSA-2048', 'unwrap', 'RSA-OAEP') && can('AES-256', 'derive', 'AES-CBC-ENCRYPT-DATA')) {
      probed.push(...(await bootstrapByUnwrap(env, run, keep, emit)));
    } else if (isTpmImport(env) && can('HMAC SHA-256', 'derive', 'TPM-DERIVED-OBJECT')) {
      probed.push(...(await bootstrapByTpmImport(env, run, keep, emit)));
    } else {
      emit('2 service bootstrap', ['skipped: this environment offers no wrapped key delivery (no RSA-OAEP unwrap, no TPM2_Import)'], []);
      emit('3 service connection', ['skipped: no root key to derive connection keys from'], []);
    }

    // 4. Security association with a peer: ECDH, then AES-GCM messages with replay protection.
    const agreeRow = env.capabilities.find((c) => c.algorithm === 'ECDH P-256' && c.operation === 'agree');
    if (agreeRow) {
      const ecdh = keep(await newKey(`demo-ecdh-${run}`, { name: 'ECDH', namedCurve: 'P-256' }, ['deriveKey']));
      const peer = createECDH('prime256v1');
      const peerPoint = peer.generateKeys();
      const jwk = createPublicKey({ key: ecdh.publicKey!, format: 'der', type: 'spki' }).export({ format: 'jwk' });
      const deviceUncompressed = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
      const z = peer.computeSecret(deviceUncompressed); // the x-coordinate of the shared point
      const saId = randomBytes(8);
      let deviceKey: AeadKey;
      let peerKey: Buffer;
      let how: string;
      const inside: string[] = [provenanceLine(ecdh)];
      if (agreeRow.result === 'key-inside') {
        const saKey = keep(await ecdh.agree(peerPoint, { label: `demo-sa-${run}`, algorithm: { name: 'AES', length: 256 }, usages: ['encrypt', 'decrypt'] }));
        deviceKey = saKey;
        peerKey = z; // what CKD_NULL yields: the x-coordinate as the AES-256 key
        how = `ECDH P-256 with a peer; the shared secret became an AES-256 key inside (${saKey.label})`;
        inside.push(provenanceLine(saKey));
        probed.push(saKey);
      } else {
        // the module hands the shared secret to the host and says so: the association key lives on the host
        const shared = await ecdh.sharedSecret(peerPoint, 'secret-leaves-module');
        const hkdf = (secret: Buffer): Buffer => Buffer.from(hkdfSync('sha256', secret, saId, 'seal-sa/1 key', 32));
        deviceKey = hostAeadKey(hkdf(shared));
        peerKey = hkdf(z);
        shared.fill(0);
        how = `ECDH P-256 with a peer inside the module (${agreeRow.mechanism ?? 'ECDH'}); the module returns the shared secret to the host (capability: secret-leaves), so the association key is HKDF-derived and held in host memory`;
      }
      const sa = new SecurityAssociation(deviceKey, saId, 'initiator');
      const m1 = await sa.protect(Buffer.from('reading 1: 21.5 C'));
      const m2 = await sa.protect(Buffer.from('reading 2: 21.7 C'));
      const peerRead = [m1, m2].map((m) => {
        const { seq, iv: miv, ciphertext: ct } = decodeMessage(m);
        return hostGcm(peerKey, miv, associationAad(saId, 'initiator', seq), ct, true).toString();
      });
      const reply = (seq: bigint, text: string): Buffer => {
        const riv = randomBytes(12);
        return encodeMessage(seq, riv, hostGcm(peerKey, riv, associationAad(saId, 'responder', seq), Buffer.from(text), false));
      };
      const r1 = reply(1n, 'ack 1');
      const got = await sa.unprotect(r1);
      let replayRefused = false;
      try {
        await sa.unprotect(r1);
      } catch (e) {
        replayRefused = e instanceof SealError;
      }
      let tamperRefused = false;
      const bad = Buffer.from(reply(2n, 'ack 2'));
      bad[bad.length - 1]! ^= 1;
      try {
        await sa.unprotect(bad);
      } catch (e) {
        tamperRefused = e instanceof SealError && e.code === 'DECRYPTION_FAILED';
      }
      if (!replayRefused || !tamperRefused || got.toString() !== 'ack 1') throw new SealError('INTERNAL', `security association checks failed (replay refused: ${replayRefused}, tamper refused: ${tamperRefused})`);
      emit('4 security association', [
        how,
        `peer derived the same key and read: ${peerRead.map((t) => `"${t}"`).join(', ')}`,
        `device read the peer's reply: "${got.toString()}"; replayed reply refused: ${replayRefused}; altered reply refused: ${tamperRefused}`,
      ], inside);
    } else {
      emit('4 security association', ['skipped: this environment offers no ECDH'], []);
    }

    // 5. Nothing leaves: ask the module for every secret by every route it has.
    const lines: string[] = [];
    let allRefused = true;
    for (const k of probed) {
      for (const a of await env.probeExtraction(k)) {
        allRefused &&= a.refused;
        lines.push(`${k.label}: ${a.route} → ${a.refused ? `refused (${a.backendCode ?? 'no value'})` : 'NOT REFUSED'}`);
      }
    }
    if (!allRefused) throw new SealError('INTERNAL', 'the module let a key out');
    emit('5 export attempts', lines, []);
    return { environment: { uri: env.uri, label: env.info.label, protectionLevel: env.info.protectionLevel }, steps, ok: true };
  } finally {
    const gone: string[] = [];
    const kept: string[] = [];
    for (const k of created.reverse()) {
      try {
        await k.destroy();
        gone.push(k.label);
      } catch {
        // best effort: a demo key left behind is listed by `seal key list`
        kept.push(k.label);
      }
    }
    emit('cleanup', [
      `destroyed the demo's ${gone.length} keys`,
      ...(kept.length > 0 ? [`left in their containers (this module cannot delete keys): ${kept.join(', ')}`] : []),
    ], []);
  }
}
