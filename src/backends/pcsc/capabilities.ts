/**
 * What the card applets can do, as capability rows generated from data: each key type the applet
 * holds × the operations its driver implements, with the variant and where the result goes.
 * PIV rows are fixed (SP 800-73-4 / SP 800-78-4 algorithms the driver supports); IoT SAFE rows
 * follow the applet's own object list (key types, crypto-function bits) and application info.
 */
import type { Capability, Operation, ResultPlacement } from '../../core/types.js';
import { IOTSAFE_FN, IOTSAFE_KEY_TYPE, IOTSAFE_SIG, type IotSafeAppInfo, type IotSafeObject } from './iotsafe.js';

interface OperationRow {
  operation: Operation;
  variant: string;
  result: ResultPlacement;
  mechanism: string;
  note?: string;
}

const rows = (algorithm: string, ops: readonly OperationRow[]): Capability[] => ops.map((op) => ({ algorithm, ...op }));

// ---- PIV ------------------------------------------------------------------------------------------

const PIV_GENERATE: OperationRow = {
  operation: 'generate',
  variant: 'key pair in a PIV slot (9A 9C 9D 9E 82-95)',
  result: 'key-inside',
  mechanism: 'GENERATE ASYMMETRIC KEY PAIR (INS 47)',
};

const PIV_EC_SIGN: readonly OperationRow[] = [
  PIV_GENERATE,
  { operation: 'sign', variant: 'ECDSA (DER or P1363), hash on host', result: 'output', mechanism: 'GENERAL AUTHENTICATE (INS 87, tag 81)' },
  { operation: 'verify', variant: 'ECDSA', result: 'output', mechanism: 'host (public key)' },
];

const PIV_EC_AGREE: readonly OperationRow[] = [
  PIV_GENERATE,
  {
    operation: 'agree',
    variant: 'ECDH (shared x-coordinate)',
    result: 'secret-leaves',
    mechanism: 'GENERAL AUTHENTICATE (INS 87, tag 85)',
    note: 'the card returns the shared secret to the host (sharedSecret)',
  },
];

const PIV_RSA: readonly OperationRow[] = [
  PIV_GENERATE,
  { operation: 'sign', variant: 'RSASSA-PKCS1-v1_5, padding on host', result: 'output', mechanism: 'GENERAL AUTHENTICATE (INS 87, raw RSA)' },
  { operation: 'sign', variant: 'RSA-PSS, encoding on host (RFC 8017 9.1)', result: 'output', mechanism: 'GENERAL AUTHENTICATE (INS 87, raw RSA)' },
  { operation: 'verify', variant: 'PKCS1-v1_5 / PSS', result: 'output', mechanism: 'host (public key)' },
  { operation: 'encrypt', variant: 'RSA-OAEP', result: 'output', mechanism: 'host (public key)' },
  { operation: 'decrypt', variant: 'RSA-OAEP, unpadding on host', result: 'output', mechanism: 'GENERAL AUTHENTICATE (INS 87, raw RSA)' },
];

/** Everything the PIV driver offers, on every PIV card (SP 800-78-4 algorithms 07, 11, 14). */
export const PIV_CAPABILITIES: readonly Capability[] = [
  ...rows('ECDSA P-256', PIV_EC_SIGN),
  ...rows('ECDSA P-384', PIV_EC_SIGN),
  ...rows('ECDH P-256', PIV_EC_AGREE),
  ...rows('ECDH P-384', PIV_EC_AGREE),
  ...rows('RSA-2048', PIV_RSA),
];

// ---- GSMA IoT SAFE --------------------------------------------------------------------------------

/** Key types of IoT SAFE containers the driver can use, by the algorithm label of the rows. */
const IOTSAFE_CURVES: ReadonlyMap<number, string> = new Map([
  [IOTSAFE_KEY_TYPE.P256_PERSISTENT, 'P-256'],
  [IOTSAFE_KEY_TYPE.P256_VOLATILE, 'P-256'],
]);

export function iotSafeCurveOf(keyType: number | undefined): 'P-256' | undefined {
  return keyType !== undefined && IOTSAFE_CURVES.has(keyType) ? 'P-256' : undefined;
}

/** Whether the applet (application info) or, without it, the container itself signs with ECDSA over SHA-256. */
function signsEcdsaSha256(k: IotSafeObject, app: IotSafeAppInfo | undefined): boolean {
  const sigAlgs = k.sigAlgs ?? app?.sigAlgs;
  const hashes = k.hashes ?? app?.hashes;
  return (sigAlgs === undefined || (sigAlgs & IOTSAFE_SIG.ECDSA) !== 0) && (hashes === undefined || (hashes & 0x0001) !== 0);
}

/**
 * The rows an IoT SAFE applet supports, from its object list: a key type appears only when a
 * private-key container of that type exists, an operation only when a container has the
 * function bit for it; key agreement also needs a public-key container the host may update
 * (where the peer's key goes before COMPUTE DH).
 */
export function iotSafeCapabilities(objects: readonly IotSafeObject[], app: IotSafeAppInfo | undefined, hasPeerContainer: boolean): Capability[] {
  const out: Capability[] = [];
  const add = (c: Capability): void => {
    if (!out.some((o) => o.algorithm === c.algorithm && o.operation === c.operation && o.variant === c.variant)) out.push(c);
  };
  const keys = objects.filter((o) => o.kind === 'private' && iotSafeCurveOf(o.keyType) !== undefined);
  const generate = (algorithm: string): Capability => ({
    algorithm,
    operation: 'generate',
    variant: 'key pair in an existing IoT SAFE key container (by label)',
    result: 'key-inside',
    mechanism: 'GENERATE KEY PAIR (INS B9)',
  });
  for (const k of keys) {
    const curve = iotSafeCurveOf(k.keyType)!;
    const fn = k.functions ?? 0;
    if (fn & IOTSAFE_FN.sign && signsEcdsaSha256(k, app)) {
      if (fn & IOTSAFE_FN.keygen) add(generate(`ECDSA ${curve}`));
      add({ algorithm: `ECDSA ${curve}`, operation: 'sign', variant: 'ECDSA (DER or P1363), SHA-256 on host', result: 'output', mechanism: 'COMPUTE SIGNATURE INIT/UPDATE (INS 2A/2B, mode 03 pad-and-sign)' });
      add({ algorithm: `ECDSA ${curve}`, operation: 'verify', variant: 'ECDSA', result: 'output', mechanism: 'host (public key)' });
    }
    if (fn & IOTSAFE_FN.agree && hasPeerContainer) {
      if (fn & IOTSAFE_FN.keygen) add(generate(`ECDH ${curve}`));
      add({
        algorithm: `ECDH ${curve}`,
        operation: 'agree',
        variant: 'ECKA-DH (shared x-coordinate)',
        result: 'secret-leaves',
        mechanism: 'PUT PUBLIC KEY (INS 24/D8) + COMPUTE DH (INS 46)',
        note: 'the applet returns the shared secret to the host (sharedSecret)',
      });
    }
  }
  // a row for an algorithm that cannot be created is still true: the container holds a key already
  return out.sort((a, b) => a.algorithm.localeCompare(b.algorithm) || OP_ORDER.indexOf(a.operation) - OP_ORDER.indexOf(b.operation));
}

const OP_ORDER: readonly Operation[] = ['generate', 'sign', 'verify', 'encrypt', 'decrypt', 'agree', 'derive', 'wrap', 'unwrap', 'import-public'];
