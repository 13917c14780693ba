/**
 * The README's generated tables equal what the code's own data renders: a changed capability
 * row without `node scripts/gen-readme.mjs` fails here.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, it, expect } from 'vitest';
import { capabilityMarkdown } from '../../src/core/capability-table.js';
import { PKCS11_MECHANISM_ROWS } from '../../src/backends/pkcs11/mechanisms.js';
import { TPM2_CAPABILITIES } from '../../src/backends/tpm2/environment.js';

const readme = readFileSync(resolve(import.meta.dirname, '..', '..', 'README.md'), 'utf8');

describe('README', () => {
  it('shows the PKCS#11 capability table generated from the mechanism rows', () => {
    const block = /<!-- generated:pkcs11-capabilities -->\n([\s\S]*?)\n<!-- \/generated -->/.exec(readme)?.[1];
    expect(block).toBe(capabilityMarkdown(PKCS11_MECHANISM_ROWS));
    expect(block).toContain('| ECDSA P-256 | sign |');
    expect(block).toContain('CKM_ECDH1_DERIVE');
  });

  it('shows the TPM capability table generated from the backend rows, ECDH marked secret-leaves', () => {
    const block = /<!-- generated:tpm2-capabilities -->\n([\s\S]*?)\n<!-- \/generated -->/.exec(readme)?.[1];
    expect(block).toBe(capabilityMarkdown(TPM2_CAPABILITIES));
    expect(block).toMatch(/\| ECDH P-256 \| agree \|[^\n]*secret leaves the module/);
    expect(block).toContain('fixedTPM\\|fixedParent');
  });

  it('shows the two commands', () => {
    expect(readme).toContain('npm start');
    expect(readme).toContain('npm test');
  });
});
