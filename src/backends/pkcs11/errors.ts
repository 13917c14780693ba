/**
 * The one translator from PKCS#11 return values (CKR_*) to seal-bridge error codes.
 * The CKR name and number are kept on the error; messages never contain PINs or key bytes.
 */
import pkcs11 from 'pkcs11js';
import { SealError, type ErrorCode } from '../../core/errors.js';

const CKR_NAMES = new Map<number, string>();
for (const [name, value] of Object.entries(pkcs11)) {
  if (name.startsWith('CKR_') && typeof value === 'number' && !CKR_NAMES.has(value)) CKR_NAMES.set(value, name);
}

export function ckrName(code: number): string {
  return CKR_NAMES.get(code) ?? `CKR_0x${code.toString(16).padStart(8, '0')}`;
}

const MAP: Record<string, ErrorCode> = {
  CKR_PIN_INCORRECT: 'PIN_INCORRECT',
  CKR_PIN_LOCKED: 'PIN_LOCKED',
  CKR_PIN_EXPIRED: 'PIN_LOCKED',
  CKR_PIN_LEN_RANGE: 'PIN_INCORRECT',
  CKR_USER_NOT_LOGGED_IN: 'NOT_LOGGED_IN',
  CKR_SESSION_HANDLE_INVALID: 'SESSION_LOST',
  CKR_SESSION_CLOSED: 'SESSION_LOST',
  CKR_DEVICE_ERROR: 'DEVICE_ERROR',
  CKR_DEVICE_REMOVED: 'DEVICE_UNAVAILABLE',
  CKR_TOKEN_NOT_PRESENT: 'DEVICE_UNAVAILABLE',
  CKR_TOKEN_NOT_RECOGNIZED: 'DEVICE_UNAVAILABLE',
  CKR_CRYPTOKI_NOT_INITIALIZED: 'DEVICE_UNAVAILABLE',
  CKR_DEVICE_MEMORY: 'DEVICE_ERROR',
  CKR_GENERAL_ERROR: 'DEVICE_ERROR',
  CKR_FUNCTION_FAILED: 'DEVICE_ERROR',
  CKR_HOST_MEMORY: 'DEVICE_ERROR',
  CKR_MECHANISM_INVALID: 'NOT_SUPPORTED',
  CKR_MECHANISM_PARAM_INVALID: 'INVALID_ARGUMENT',
  CKR_FUNCTION_NOT_SUPPORTED: 'NOT_SUPPORTED',
  CKR_KEY_TYPE_INCONSISTENT: 'NOT_SUPPORTED',
  CKR_KEY_FUNCTION_NOT_PERMITTED: 'USAGE_NOT_PERMITTED',
  CKR_KEY_UNEXTRACTABLE: 'EXPORT_REFUSED',
  CKR_KEY_NOT_WRAPPABLE: 'EXPORT_REFUSED',
  CKR_ATTRIBUTE_SENSITIVE: 'EXPORT_REFUSED',
  CKR_DATA_LEN_RANGE: 'DATA_TOO_LARGE',
  CKR_DATA_INVALID: 'INVALID_ARGUMENT',
  CKR_ENCRYPTED_DATA_INVALID: 'DECRYPTION_FAILED',
  CKR_ENCRYPTED_DATA_LEN_RANGE: 'DECRYPTION_FAILED',
  CKR_WRAPPED_KEY_INVALID: 'DECRYPTION_FAILED',
  CKR_WRAPPED_KEY_LEN_RANGE: 'DECRYPTION_FAILED',
  CKR_UNWRAPPING_KEY_HANDLE_INVALID: 'KEY_NOT_FOUND',
  CKR_OBJECT_HANDLE_INVALID: 'KEY_NOT_FOUND',
  CKR_KEY_HANDLE_INVALID: 'KEY_NOT_FOUND',
  CKR_TEMPLATE_INCONSISTENT: 'INVALID_ARGUMENT',
  CKR_TEMPLATE_INCOMPLETE: 'INVALID_ARGUMENT',
  CKR_ATTRIBUTE_VALUE_INVALID: 'INVALID_ARGUMENT',
  CKR_ATTRIBUTE_READ_ONLY: 'EXPORT_REFUSED',
  CKR_DOMAIN_PARAMS_INVALID: 'NOT_SUPPORTED',
  CKR_CURVE_NOT_SUPPORTED: 'NOT_SUPPORTED',
  CKR_KEY_SIZE_RANGE: 'NOT_SUPPORTED',
  CKR_TOKEN_WRITE_PROTECTED: 'NOT_SUPPORTED',
};

/** Errors after which the session that saw them must not be reused. */
export const SESSION_FATAL = new Set([
  'CKR_SESSION_HANDLE_INVALID',
  'CKR_SESSION_CLOSED',
  'CKR_DEVICE_ERROR',
  'CKR_DEVICE_REMOVED',
  'CKR_TOKEN_NOT_PRESENT',
  'CKR_USER_NOT_LOGGED_IN',
  'CKR_CRYPTOKI_NOT_INITIALIZED',
]);

/**
 * Errors about an object handle that was valid when cached: the object may be gone, or may only
 * have become invisible because the token logged the user out (SoftHSM2 then answers
 * CKR_OBJECT_HANDLE_INVALID for a private key). Worth one check of the login and one fresh
 * lookup, never more.
 */
export const HANDLE_SUSPECT = new Set(['CKR_OBJECT_HANDLE_INVALID', 'CKR_KEY_HANDLE_INVALID']);

/** Status of a pkcs11js error, or undefined for anything else. */
export function ckrOf(e: unknown): { code: number; name: string } | undefined {
  if (e && typeof e === 'object' && typeof (e as { code?: unknown }).code === 'number' && 'method' in e) {
    const code = (e as unknown as { code: number }).code;
    if (code === 0) return undefined; // a pkcs11js NativeError: no module status at all
    return { code, name: ckrName(code) };
  }
  // pkcs11js 2.1.7 wraps C_FindObjects outside its error translation: the native error arrives
  // as a plain Error whose message is "CKR_<NAME>:<decimal value>"
  if (e instanceof Error && !('code' in e)) {
    const m = /^CKR_[A-Z0-9_]+:(\d{1,10})$/.exec(e.message);
    if (m) {
      const code = Number(m[1]);
      if (code !== 0) return { code, name: ckrName(code) };
    }
  }
  return undefined;
}

export function mapPkcs11Error(e: unknown, what: string): SealError {
  if (e instanceof SealError) return e;
  const ckr = ckrOf(e);
  if (!ckr) {
    const msg = e instanceof Error ? e.message : String(e);
    return new SealError('INTERNAL', `${what}: ${msg}`, { cause: e });
  }
  const code = MAP[ckr.name] ?? 'DEVICE_ERROR';
  return new SealError(code, `${what} failed: ${ckr.name}`, { backendCode: ckr.name, backendStatus: ckr.code, cause: e });
}
