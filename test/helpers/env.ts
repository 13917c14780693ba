/**
 * Where the integration tests find their simulators: `scripts/sim start` exports the URIs.
 * A missing simulator is a failure (in CI and locally), never a skip.
 */
export function requireEnv(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the tests through 'npm test' (or eval "$(scripts/sim start)" first)`);
  return v;
}

export const softhsmUri = (): string => requireEnv('SEAL_SOFTHSM_URI');
