/**
 * PKCS#10 certification requests signed inside the secure environment. @peculiar/x509 builds
 * and encodes the request; its signing call is routed to the KeyHandle, so the private key is
 * only ever used inside the module.
 */
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { SealError } from '../core/errors.js';
import type { HashName } from '../core/algorithms.js';
import type { KeyHandle } from '../core/types.js';

export interface CsrOptions {
  /** Subject distinguished name, e.g. `CN=device-1, O=Example`. */
  subject: string;
  /** RSA signature scheme (default RSASSA-PKCS1-v1_5). */
  rsaScheme?: 'RSASSA-PKCS1-v1_5' | 'RSA-PSS';
  /** DNS names for a subjectAltName extension request. */
  dnsNames?: string[];
}

const ab = (b: Buffer): ArrayBuffer => b.buffer.slice(b.byteOffset, b.byteOffset + b.length) as ArrayBuffer;

function webAlgorithm(key: KeyHandle, rsaScheme: CsrOptions['rsaScheme']): { name: string; hash?: string; namedCurve?: string; saltLength?: number } {
  const a = key.algorithm;
  switch (a.name) {
    case 'ECDSA':
      return { name: 'ECDSA', namedCurve: a.namedCurve, hash: a.namedCurve === 'P-384' ? 'SHA-384' : 'SHA-256' };
    case 'Ed25519':
      return { name: 'Ed25519' };
    case 'RSA':
      return rsaScheme === 'RSA-PSS' ? { name: 'RSA-PSS', hash: 'SHA-256', saltLength: 32 } : { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
    default:
      throw new SealError('USAGE_NOT_PERMITTED', `a ${a.name} key cannot sign a certification request`);
  }
}

/** Creates a PEM PKCS#10 request for `key`'s public key, signed by `key` inside its module. */
export async function createCsr(key: KeyHandle, options: CsrOptions): Promise<string> {
  if (!key.publicKey) throw new SealError('NOT_SUPPORTED', `key ${key.label} has no public key`);
  if (!key.usages.includes('sign')) throw new SealError('USAGE_NOT_PERMITTED', `key ${key.label} was not created for signing`);
  if (typeof options.subject !== 'string' || !options.subject.includes('=')) {
    throw new SealError('INVALID_ARGUMENT', 'subject must be a distinguished name such as "CN=device-1"');
  }
  let name: x509.Name;
  try {
    name = new x509.Name(options.subject);
  } catch (e) {
    throw new SealError('INVALID_ARGUMENT', `subject '${options.subject.slice(0, 80)}' is not a valid distinguished name`, { cause: e });
  }
  const algorithm = webAlgorithm(key, options.rsaScheme);
  const spki = key.publicKey;
  // the CryptoKey stand-ins carry only what @peculiar/x509 reads: the algorithm
  const privateKey = { algorithm, type: 'private', extractable: false, usages: ['sign'] } as unknown as import('node:crypto').webcrypto.CryptoKey;
  const publicKey = { algorithm, type: 'public', extractable: true, usages: ['verify'] } as unknown as import('node:crypto').webcrypto.CryptoKey;
  const crypto = {
    subtle: {
      exportKey: async (format: string): Promise<ArrayBuffer> => {
        if (format !== 'spki') throw new SealError('NOT_SUPPORTED', `export format ${format}`);
        return ab(spki);
      },
      sign: async (_alg: unknown, _key: unknown, data: ArrayBuffer): Promise<ArrayBuffer> => {
        const hash = algorithm.hash as HashName | undefined;
        const sig = await key.sign(Buffer.from(data), {
          format: 'p1363',
          ...(hash ? { hash } : {}),
          ...(algorithm.name === 'RSA-PSS' ? { scheme: 'RSA-PSS' as const, saltLength: 32 } : {}),
        });
        return ab(sig);
      },
    },
  } as unknown as import('node:crypto').webcrypto.Crypto;
  const extensions = options.dnsNames?.length
    ? [new x509.SubjectAlternativeNameExtension(options.dnsNames.map((value) => ({ type: 'dns' as const, value })))]
    : [];
  const csr = await x509.Pkcs10CertificateRequestGenerator.create(
    { name, keys: { privateKey, publicKey }, signingAlgorithm: algorithm, extensions },
    crypto,
  );
  return csr.toString('pem') + '\n';
}
