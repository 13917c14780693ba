/**
 * The one way integration tests expect a typed failure: the promise rejects with a SealError of
 * the given code (and module status, when given); the error is returned for further checks.
 */
import { expect } from 'vitest';
import { SealError, type ErrorCode } from '../../src/index.js';

export async function expectSealError(p: Promise<unknown>, code: ErrorCode, backendCode?: string): Promise<SealError> {
  let caught: unknown;
  try {
    await p;
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected SealError ${code}, but the call succeeded`).toBeInstanceOf(SealError);
  const e = caught as SealError;
  expect(e.code, e.message).toBe(code);
  if (backendCode !== undefined) expect(e.backendCode).toBe(backendCode);
  return e;
}
