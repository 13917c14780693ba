/**
 * TSS2_RC → SealError. The TPM's own code rides along as `backendCode` (e.g. `TPM_RC_AUTH_FAIL`)
 * and `backendStatus` (the raw TSS2_RC); the message is tpm2-tss's decoding of the code, which
 * never contains argument values.
 */
import { SealError, type ErrorCode } from '../../core/errors.js';

const LAYER_SHIFT = 16;
export const LAYER = { TPM: 0, ESAPI: 7, SYS: 8, MU: 9, TCTI: 10, RM: 11 } as const;

/** Base TPM response codes seal-bridge reacts to (format-one codes without handle/session bits). */
export const RC = {
  INITIALIZE: 0x100,
  FAILURE: 0x101,
  AUTH_MISSING: 0x125,
  POLICY: 0x126,
  PCR_CHANGED: 0x128,
  NV_RANGE: 0x146,
  NV_UNINITIALIZED: 0x14a,
  NV_SPACE: 0x14b,
  NV_DEFINED: 0x14c,
  COMMAND_CODE: 0x143,
  ATTRIBUTES: 0x082,
  HASH: 0x083,
  VALUE: 0x084,
  HANDLE: 0x08b,
  AUTH_FAIL: 0x08e,
  SCHEME: 0x092,
  SIZE: 0x095,
  SYMMETRIC: 0x096,
  KEY_SIZE: 0x087,
  MODE: 0x089,
  TYPE: 0x08a,
  KEY: 0x09c,
  SIGNATURE: 0x09b,
  POLICY_FAIL: 0x09d,
  INTEGRITY: 0x09f,
  BAD_AUTH: 0x0a2,
  CURVE: 0x0a6,
  ECC_POINT: 0x0a7,
  OBJECT_MEMORY: 0x902,
  SESSION_MEMORY: 0x903,
  LOCKOUT: 0x921,
  RETRY: 0x922,
  TESTING: 0x90a,
  REFERENCE_H0: 0x910,
} as const;

const RC_NAME = new Map<number, string>(Object.entries(RC).map(([k, v]) => [v, `TPM_RC_${k}`]));

/** The TSS2_RC of a rejection from the shim, if it carries one. */
export function rcOf(e: unknown): number | undefined {
  const rc = (e as { rc?: unknown } | null)?.rc;
  return typeof rc === 'number' ? rc : undefined;
}

export function layerOf(rc: number): number {
  return (rc >>> LAYER_SHIFT) & 0xff;
}

/** The TPM-layer base code: format-one codes lose their parameter/handle/session number. */
export function baseCode(rc: number): number {
  const tpm = rc & 0xffff;
  if (tpm & 0x80) return 0x80 | (tpm & 0x3f);
  return tpm & 0xfff;
}

export function rcName(rc: number): string {
  const layer = layerOf(rc);
  if (layer === LAYER.TPM || layer === LAYER.RM) return RC_NAME.get(baseCode(rc)) ?? `TPM_RC_0x${rc.toString(16)}`;
  const prefix = { [LAYER.ESAPI]: 'TSS2_ESYS_RC', [LAYER.SYS]: 'TSS2_SYS_RC', [LAYER.MU]: 'TSS2_MU_RC', [LAYER.TCTI]: 'TSS2_TCTI_RC' }[layer] ?? 'TSS2_RC';
  return `${prefix}_0x${(rc & 0xffff).toString(16)}`;
}

/** True when the TPM connection itself failed (TCTI layer): reconnect, then the command may be repeated. */
export function isConnectionLost(e: unknown): boolean {
  const rc = rcOf(e);
  return rc !== undefined && layerOf(rc) === LAYER.TCTI;
}

/** TSS2_BASE_RC_BAD_SEQUENCE: the code ESYS answers every call with once its context is wedged. */
const BASE_BAD_SEQUENCE = 0x07;

/**
 * True when ESYS refused the call because its context is in its internal-error state (after a
 * failure below the TPM: a lost TCTI, a response or argument it could not (un)marshal). Nothing
 * was sent; the context never recovers: it has to be finalized and created again.
 */
export function isEsysWedged(e: unknown): boolean {
  const rc = rcOf(e);
  return rc !== undefined && layerOf(rc) === LAYER.ESAPI && (rc & 0xffff) === BASE_BAD_SEQUENCE;
}

/**
 * True for a failure in the software stack below seal-bridge and above the TPM (ESAPI, SAPI,
 * marshalling): one that may have left the ESYS context wedged.
 */
export function isStackFailure(e: unknown): boolean {
  const rc = rcOf(e);
  if (rc === undefined) return false;
  const layer = layerOf(rc);
  return layer === LAYER.ESAPI || layer === LAYER.SYS || layer === LAYER.MU;
}

export function isTpmCode(e: unknown, code: number): boolean {
  const rc = rcOf(e);
  return rc !== undefined && (layerOf(rc) === LAYER.TPM || layerOf(rc) === LAYER.RM) && baseCode(rc) === code;
}

function codeFor(rc: number): ErrorCode {
  const layer = layerOf(rc);
  if (layer === LAYER.TCTI) return 'DEVICE_UNAVAILABLE';
  if (layer === LAYER.ESAPI || layer === LAYER.SYS || layer === LAYER.MU) {
    // ESAPI's own checks of our arguments or of a malformed response
    return (rc & 0xffff) === 0x0b /* BAD_REFERENCE */ || (rc & 0xffff) === 0x05 /* BAD_VALUE */ ? 'INVALID_ARGUMENT' : 'DEVICE_ERROR';
  }
  switch (baseCode(rc)) {
    case RC.AUTH_FAIL:
    case RC.BAD_AUTH:
      return 'PIN_INCORRECT';
    case RC.LOCKOUT:
      return 'PIN_LOCKED';
    case RC.POLICY_FAIL:
    case RC.PCR_CHANGED:
    case RC.POLICY:
    case RC.ATTRIBUTES:
      return 'USAGE_NOT_PERMITTED';
    case RC.HANDLE:
    case RC.REFERENCE_H0:
    case RC.NV_UNINITIALIZED:
      return 'OBJECT_NOT_FOUND';
    case RC.NV_DEFINED:
      return 'KEY_EXISTS';
    case RC.VALUE:
    case RC.SIZE:
    case RC.ECC_POINT:
    case RC.NV_RANGE:
      return 'INVALID_ARGUMENT';
    case RC.SCHEME:
    case RC.CURVE:
    case RC.COMMAND_CODE:
    case RC.MODE:
    case RC.SYMMETRIC:
    case RC.KEY_SIZE:
      return 'NOT_SUPPORTED';
    case RC.INTEGRITY:
      return 'DECRYPTION_FAILED';
    case RC.OBJECT_MEMORY:
    case RC.SESSION_MEMORY:
    case RC.RETRY:
    case RC.TESTING:
    case RC.NV_SPACE:
      return 'DEVICE_ERROR';
    default:
      return 'DEVICE_ERROR';
  }
}

/** Wraps a shim rejection (or anything else) into a SealError about `what`. */
export function tpmError(e: unknown, what: string, extra: { triesLeft?: number; detail?: string } = {}): SealError {
  if (e instanceof SealError) return e;
  const rc = rcOf(e);
  if (rc === undefined) {
    const msg = e instanceof Error ? e.message : String(e);
    return new SealError(/closed/.test(msg) ? 'CLOSED' : 'DEVICE_ERROR', `${what}: ${msg}`, { cause: e });
  }
  const decoded = e instanceof Error ? e.message : '';
  const detail = extra.detail ? `; ${extra.detail}` : '';
  return new SealError(codeFor(rc), `${what} failed: ${rcName(rc)} (${decoded})${detail}`, {
    backendCode: rcName(rc),
    backendStatus: rc,
    ...(extra.triesLeft !== undefined ? { triesLeft: extra.triesLeft } : {}),
    cause: e,
  });
}
