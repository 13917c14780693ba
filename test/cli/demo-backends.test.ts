/**
 * `seal demo --env <uri>` on every simulator: the TPM (swtpm), the virtual PIV card, the IoT SAFE
 * applet through PC/SC and through the virtual modem. Each walk must finish, every export attempt
 * must be refused, and the steps a module cannot do are said to be skipped, not faked.
 */
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { requireEnv } from '../helpers/env.js';

const cli = join(resolve(import.meta.dirname, '..', '..'), 'dist', 'cli', 'main.js');

function demo(uri: string, ...extra: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, 'demo', '--env', uri, ...extra], { encoding: 'utf8', timeout: 300_000 });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

describe('seal demo on each simulator', () => {
  it('TPM: import of a wrapped root secret, keys derived inside, the server agrees; ECDH says the secret leaves', () => {
    const r = demo(requireEnv('SEAL_TPM_URI'));
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('imported inside the TPM as a derivation parent');
    expect(r.stdout).toMatch(/server derived the same connection key on its side and accepted the device's authenticated message: true/);
    expect(r.stdout).toMatch(/application key differs from the connection key: true/);
    expect(r.stdout).toMatch(/capability: secret-leaves/);
    expect(r.stdout).toMatch(/replayed reply refused: true; altered reply refused: true/);
    expect(r.stdout).not.toContain('NOT REFUSED');
    expect(r.stdout).toMatch(/demo complete on TPM 2\.0 .*every key stayed inside the module/);
  });

  for (const [name, variable] of [['virtual PIV card', 'SEAL_PIV_URI'], ['IoT SAFE over PC/SC', 'SEAL_IOTSAFE_URI'], ['IoT SAFE over the modem', 'SEAL_MODEM_URI']] as const) {
    it(`${name}: refuses without consent to replace slot keys; with it, the walk finishes as far as the applet allows`, () => {
      const uri = requireEnv(variable);
      const refused = demo(uri);
      expect(refused.status).toBe(1);
      expect(refused.stderr).toMatch(/^seal: USAGE_NOT_PERMITTED: .*--replace-keys/m);
      const r = demo(uri, '--replace-keys');
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/CSR for CN=device-\w+, O=seal-bridge demo signed inside; signature verifies: true; its public key is the device key's: true/);
      expect(r.stdout).toContain('2 service bootstrap\n   skipped:');
      expect(r.stdout).toMatch(/returns the shared secret to the host \(capability: secret-leaves\)/);
      expect(r.stdout).toMatch(/replayed reply refused: true; altered reply refused: true/);
      expect(r.stdout).toMatch(/== 5 export attempts\n(   .* → refused .*\n)+/);
      expect(r.stdout).not.toContain('NOT REFUSED');
      expect(r.stdout).toMatch(/every key stayed inside the module/);
    });
  }
});
