import { defineConfig } from 'vitest/config';

// Each test file runs in its own process: a PKCS#11 module is initialized once per process and
// SoftHSM2 reads SOFTHSM2_CONF at that moment, so files that need another token store stay apart.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'hw-tests/**/*.test.ts'],
    pool: 'forks',
    // the files share one simulator token; tests that count its objects must not see another file's keys
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: ['default'],
  },
});
