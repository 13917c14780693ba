/**
 * SealError's public shape, and the PKCS#11 translator from CKR_* values to seal-bridge codes.
 * CKR numbers are the ones of the PKCS#11 specification (v2.40 / v3.0 pkcs11t.h), written here as
 * literals rather than taken from the code under test.
 */
import { describe, expect, it } from 'vitest';
import pkcs11 from 'pkcs11js';
import { ERROR_CODES, SealError, isSealError } from '../../src/index.js';
import { asSealError } from '../../src/core/errors.js';
import { ckrName, ckrOf, mapPkcs11Error } from '../../src/backends/pkcs11/errors.js';

describe('SealError', () => {
  it('is an Error with a name, a code and the backend code', () => {
    const cause = new Error('inner');
    const e = new SealError('PIN_INCORRECT', 'the PIN was rejected', { backendCode: 'CKR_PIN_INCORRECT', backendStatus: 0xa0, triesLeft: 2, cause });
    expect(e).toBeInstanceOf(Error);
    expect(e.name).toBe('SealError');
    expect(e.code).toBe('PIN_INCORRECT');
    expect(e.backendCode).toBe('CKR_PIN_INCORRECT');
    expect(e.backendStatus).toBe(0xa0);
    expect(e.triesLeft).toBe(2);
    expect(e.cause).toBe(cause);
    expect(isSealError(e)).toBe(true);
    expect(isSealError(e, 'PIN_INCORRECT')).toBe(true);
    expect(isSealError(e, 'PIN_LOCKED')).toBe(false);
    expect(isSealError(new Error('x'))).toBe(false);
  });

  it('toJSON has code, message and backendCode, and no stack or cause', () => {
    const e = new SealError('KEY_NOT_FOUND', 'no key k', { backendCode: 'CKR_OBJECT_HANDLE_INVALID', backendStatus: 0x82, cause: new Error('secret detail') });
    const json = e.toJSON();
    expect(json).toEqual({ code: 'KEY_NOT_FOUND', message: 'no key k', backendCode: 'CKR_OBJECT_HANDLE_INVALID' });
    const text = JSON.stringify(e);
    expect(JSON.parse(text)).toEqual(json);
    expect(text).not.toContain('stack');
    expect(text).not.toContain('secret detail');
    expect(text).not.toContain('at ');
  });

  it('toJSON carries triesLeft when known, and leaves out what is unknown', () => {
    expect(new SealError('PIN_LOCKED', 'locked', { triesLeft: 0 }).toJSON()).toEqual({ code: 'PIN_LOCKED', message: 'locked', triesLeft: 0 });
    expect(new SealError('TIMEOUT', 'slow').toJSON()).toEqual({ code: 'TIMEOUT', message: 'slow' });
  });

  it('the code set is closed and has no duplicates', () => {
    expect(new Set(ERROR_CODES).size).toBe(ERROR_CODES.length);
    for (const c of ['INVALID_URI', 'NOT_SUPPORTED', 'USAGE_NOT_PERMITTED', 'KEY_NOT_FOUND', 'PIN_INCORRECT', 'PIN_LOCKED', 'DEVICE_UNAVAILABLE', 'EXPORT_REFUSED', 'DECRYPTION_FAILED']) {
      expect(ERROR_CODES).toContain(c);
    }
  });

  it('asSealError passes SealErrors through and wraps anything else as INTERNAL', () => {
    const s = new SealError('CLOSED', 'closed');
    expect(asSealError(s)).toBe(s);
    const w = asSealError(new TypeError('bad'));
    expect(w.code).toBe('INTERNAL');
    expect(w.message).toBe('bad');
    expect(asSealError('plain', 'DEVICE_ERROR').code).toBe('DEVICE_ERROR');
  });
});

describe('the PKCS#11 error translator', () => {
  it('maps { code: 0xA0, method: "C_Login" } to PIN_INCORRECT with backendCode CKR_PIN_INCORRECT', () => {
    const e = mapPkcs11Error({ code: 0xa0, method: 'C_Login' }, 'login to token t');
    expect(e).toBeInstanceOf(SealError);
    expect(e.code).toBe('PIN_INCORRECT');
    expect(e.backendCode).toBe('CKR_PIN_INCORRECT');
    expect(e.backendStatus).toBe(0xa0);
    expect(e.message).toContain('login to token t');
    expect(e.toJSON()).toEqual({ code: 'PIN_INCORRECT', message: e.message, backendCode: 'CKR_PIN_INCORRECT' });
  });

  it.each(([
    [0x05, 'CKR_GENERAL_ERROR', 'DEVICE_ERROR'],
    [0x11, 'CKR_ATTRIBUTE_SENSITIVE', 'EXPORT_REFUSED'],
    [0x21, 'CKR_DATA_LEN_RANGE', 'DATA_TOO_LARGE'],
    [0x30, 'CKR_DEVICE_ERROR', 'DEVICE_ERROR'],
    [0x32, 'CKR_DEVICE_REMOVED', 'DEVICE_UNAVAILABLE'],
    [0x40, 'CKR_ENCRYPTED_DATA_INVALID', 'DECRYPTION_FAILED'],
    [0x68, 'CKR_KEY_FUNCTION_NOT_PERMITTED', 'USAGE_NOT_PERMITTED'],
    [0x69, 'CKR_KEY_NOT_WRAPPABLE', 'EXPORT_REFUSED'],
    [0x6a, 'CKR_KEY_UNEXTRACTABLE', 'EXPORT_REFUSED'],
    [0x70, 'CKR_MECHANISM_INVALID', 'NOT_SUPPORTED'],
    [0x82, 'CKR_OBJECT_HANDLE_INVALID', 'KEY_NOT_FOUND'],
    [0xa0, 'CKR_PIN_INCORRECT', 'PIN_INCORRECT'],
    [0xa4, 'CKR_PIN_LOCKED', 'PIN_LOCKED'],
    [0xb3, 'CKR_SESSION_HANDLE_INVALID', 'SESSION_LOST'],
    [0xe0, 'CKR_TOKEN_NOT_PRESENT', 'DEVICE_UNAVAILABLE'],
    [0x101, 'CKR_USER_NOT_LOGGED_IN', 'NOT_LOGGED_IN'],
    [0x110, 'CKR_WRAPPED_KEY_INVALID', 'DECRYPTION_FAILED'],
    [0x190, 'CKR_CRYPTOKI_NOT_INITIALIZED', 'DEVICE_UNAVAILABLE'],
  ] as Array<[number, string, string]>).map(([status, name, code]) => ({ hex: `0x${status.toString(16).toUpperCase()}`, status, name, code })))('$hex → $name → $code', ({ status, name, code }) => {
    const e = mapPkcs11Error({ code: status, method: 'C_Something' }, 'op');
    expect(e.backendCode).toBe(name);
    expect(e.backendStatus).toBe(status);
    expect(e.code).toBe(code);
    expect(ckrName(status)).toBe(name);
  });

  it('an unknown (vendor) status keeps its number in the backend code and maps to DEVICE_ERROR', () => {
    const e = mapPkcs11Error({ code: 0x80001234, method: 'C_Sign' }, 'sign');
    expect(e.code).toBe('DEVICE_ERROR');
    expect(e.backendCode).toBe('CKR_0x80001234');
    expect(e.backendStatus).toBe(0x80001234);
  });

  it('a real pkcs11js Pkcs11Error is read by its code', () => {
    const err = new pkcs11.Pkcs11Error('CKR_PIN_LOCKED:164', 0, 'C_Login');
    expect(ckrOf(err)).toEqual({ code: 0xa4, name: 'CKR_PIN_LOCKED' });
    expect(mapPkcs11Error(err, 'login').code).toBe('PIN_LOCKED');
  });

  it('a pkcs11js NativeError (no CKR status) is not reported as a module status', () => {
    // pkcs11js raises NativeError (code 0) for failures of its own, e.g. argument marshalling
    const err = new pkcs11.NativeError('Parameter 2 MUST be Buffer', 'C_Sign');
    const e = mapPkcs11Error(err, 'sign');
    expect(e.backendCode, 'CKR_OK (0) is not an error status').not.toBe('CKR_OK');
    expect(e.code).not.toBe('DEVICE_ERROR');
  });

  it('anything that is not a PKCS#11 error becomes INTERNAL; a SealError passes through', () => {
    expect(mapPkcs11Error(new Error('boom'), 'op').code).toBe('INTERNAL');
    expect(mapPkcs11Error({ code: 0xa0 }, 'op').code).toBe('INTERNAL'); // no method: not from pkcs11js
    expect(mapPkcs11Error('text', 'op').code).toBe('INTERNAL');
    const s = new SealError('KEY_EXISTS', 'exists');
    expect(mapPkcs11Error(s, 'op')).toBe(s);
  });
});
