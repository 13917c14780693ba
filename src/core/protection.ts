/**
 * Protection levels of a secure environment, oneM2M TR-0008 Table 6.1-1.
 */
import { SealError } from './errors.js';

export type ProtectionLevel = 0 | 1 | 2 | 3;

export const PROTECTION_LEVELS: Record<ProtectionLevel, { name: string; description: string }> = {
  0: { name: 'none', description: 'no protection of keys or sensitive functions' },
  1: { name: 'low', description: 'software only, on general-purpose hardware (SoftHSM2, swtpm, virtual cards)' },
  2: { name: 'medium', description: 'isolated execution, such as a TEE or a firmware TPM' },
  3: { name: 'high', description: 'tamper-resistant module: HSM, discrete TPM, smart card, UICC' },
};

export function checkProtectionLevel(actual: ProtectionLevel, required: number | undefined, what: string): void {
  if (required === undefined) return;
  if (!Number.isInteger(required) || required < 0 || required > 3) {
    throw new SealError('INVALID_ARGUMENT', 'minProtectionLevel must be 0, 1, 2 or 3');
  }
  if (actual < required) {
    throw new SealError(
      'PROTECTION_LEVEL_TOO_LOW',
      `${what} has protection level ${actual} (${PROTECTION_LEVELS[actual].name}); level ${required} or higher is required`,
    );
  }
}
