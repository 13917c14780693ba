/**
 * Renders capability rows as a Markdown table (README and `seal doctor`), so documentation is
 * generated from the code's own capability data.
 */
import type { Capability } from './types.js';

const RESULT: Record<Capability['result'], string> = {
  'key-inside': 'new key stays inside',
  output: 'output only',
  'secret-leaves': '**secret leaves the module**',
};

export function capabilityMarkdown(rows: readonly Capability[]): string {
  const lines = ['| algorithm | operation | variant | mechanism | result |', '|---|---|---|---|---|'];
  for (const r of rows) {
    lines.push(`| ${r.algorithm} | ${r.operation} | ${r.variant} | ${r.mechanism ?? ''}${r.note ? ` (${r.note})` : ''} | ${RESULT[r.result]} |`);
  }
  return lines.join('\n');
}
