/**
 * Typed errors of seal-bridge. Every failure that reaches a caller is a SealError with a stable
 * `code` from a closed set; the secure environment's own status (CKR_*, TPM_RC_*, SW1SW2) rides
 * along in `backendCode`. Messages are fixed or built from non-secret facts only: a PIN, key or
 * secret never appears in a message.
 */

export const ERROR_CODES = [
  'INVALID_URI',
  'INVALID_ARGUMENT',
  'NOT_SUPPORTED',
  'USAGE_NOT_PERMITTED',
  'KEY_NOT_FOUND',
  'KEY_EXISTS',
  'AMBIGUOUS_KEY',
  'OBJECT_NOT_FOUND',
  'PIN_REQUIRED',
  'PIN_INCORRECT',
  'PIN_LOCKED',
  'NOT_LOGGED_IN',
  'DEVICE_UNAVAILABLE',
  'DEVICE_ERROR',
  'SESSION_LOST',
  'TOKEN_NOT_FOUND',
  'MODULE_LOAD_FAILED',
  'BACKEND_UNAVAILABLE',
  'PROTECTION_LEVEL_TOO_LOW',
  'DATA_TOO_LARGE',
  'DECRYPTION_FAILED',
  'EXPORT_REFUSED',
  'SECRET_SOURCE',
  'TIMEOUT',
  'CLOSED',
  'INTERNAL',
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

export interface SealErrorOptions {
  /** The module's own status, e.g. `CKR_PIN_INCORRECT`. */
  backendCode?: string;
  /** Numeric status as the module returned it. */
  backendStatus?: number;
  /** Remaining PIN tries when the module reports them (exact count or a lower bound). */
  triesLeft?: number;
  cause?: unknown;
}

export class SealError extends Error {
  readonly code: ErrorCode;
  readonly backendCode: string | undefined;
  readonly backendStatus: number | undefined;
  readonly triesLeft: number | undefined;

  constructor(code: ErrorCode, message: string, options: SealErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'SealError';
    this.code = code;
    this.backendCode = options.backendCode;
    this.backendStatus = options.backendStatus;
    this.triesLeft = options.triesLeft;
  }

  /** A plain object for `--json` output and logs (no stack, no cause chain). */
  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { code: this.code, message: this.message };
    if (this.backendCode !== undefined) out.backendCode = this.backendCode;
    if (this.triesLeft !== undefined) out.triesLeft = this.triesLeft;
    return out;
  }
}

export function isSealError(e: unknown, code?: ErrorCode): e is SealError {
  return e instanceof SealError && (code === undefined || e.code === code);
}

/** Wraps anything unexpected so that callers only ever see SealError. */
export function asSealError(e: unknown, fallback: ErrorCode = 'INTERNAL'): SealError {
  if (e instanceof SealError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new SealError(fallback, msg, { cause: e });
}
