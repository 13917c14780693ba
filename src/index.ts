/**
 * seal-bridge: one key-handle API over secure environments. This file wires the public surface
 * and the built-in backends (each loaded lazily, the first time its URI scheme is opened).
 */
import { registerBackend, registerUnavailable } from './core/registry.js';

registerBackend('pkcs11', async () => (await import('./backends/pkcs11/index.js')).backend);
registerBackend('tpm2', async () => (await import('./backends/tpm2/index.js')).backend);
registerBackend('pcsc', async () => (await import('./backends/pcsc/index.js')).backend);
registerBackend('at', async () => (await import('./backends/pcsc/index.js')).atBackend);

export { openEnvironment, registerBackend, registeredSchemes } from './core/registry.js';
export { SealError, isSealError, ERROR_CODES, type ErrorCode } from './core/errors.js';
export { SealUri, parseUri } from './core/uri.js';
export { PROTECTION_LEVELS, type ProtectionLevel } from './core/protection.js';
export { SHORT_ALGORITHMS, shortAlgorithm, algorithmShortName, normalizeAlgorithm } from './core/algorithms.js';
export type { KeyAlgorithm, KeyAlgorithmInput, KeyUsage, KeyKind, HashName, NamedCurve } from './core/algorithms.js';
export type * from './core/types.js';
export { toPem, p1363ToDer, derToP1363 } from './core/encoding.js';
export { createCsr } from './functions/csr.js';
export { wrapForTpm, verifyQuote, verifyCertify, tpmDerivedHmacKey, kdfa } from './backends/tpm2/server.js';
export type { Tpm2Environment, Tpm2KeyOptions, WrappedTpmKey } from './backends/tpm2/environment.js';
export type { Tpm2Key } from './backends/tpm2/key.js';
