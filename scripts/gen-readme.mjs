// Regenerates the generated blocks of README.md from the code's own data (run after `npm run build`):
//   <!-- generated:pkcs11-capabilities --> … <!-- /generated -->, and the same for tpm2-capabilities
import { readFileSync, writeFileSync } from 'node:fs';
import { capabilityMarkdown } from '../dist/core/capability-table.js';
import { PKCS11_MECHANISM_ROWS } from '../dist/backends/pkcs11/mechanisms.js';
import { TPM2_CAPABILITIES } from '../dist/backends/tpm2/environment.js';

export function generatedBlocks() {
  return {
    'pkcs11-capabilities': capabilityMarkdown(PKCS11_MECHANISM_ROWS),
    'tpm2-capabilities': capabilityMarkdown(TPM2_CAPABILITIES),
  };
}

export function render(readme) {
  let out = readme;
  for (const [name, body] of Object.entries(generatedBlocks())) {
    const re = new RegExp(`(<!-- generated:${name} -->\\n)[\\s\\S]*?(\\n<!-- /generated -->)`);
    if (!re.test(out)) throw new Error(`README.md has no block generated:${name}`);
    out = out.replace(re, `$1${body}$2`);
  }
  return out;
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop())) {
  const path = new URL('../README.md', import.meta.url);
  writeFileSync(path, render(readFileSync(path, 'utf8')));
  console.log('README.md: generated blocks updated');
}
