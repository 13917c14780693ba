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

/** A table cell: a `|` inside it would end the cell. */
const cell = (s: string): string => s.replace(/\|/g, '\\|');

export function capabilityMarkdown(rows: readonly Capability[]): string {
  const lines = ['| algorithm | operation | variant | mechanism | result |', '|---|---|---|---|---|'];
  for (const r of rows) {
    lines.push(`| ${cell(r.algorithm)} | ${r.operation} | ${cell(r.variant)} | ${cell(r.mechanism ?? '')}${r.note ? ` (${cell(r.note)})` : ''} | ${RESULT[r.result]} |`);
  }
  return lines.join('\n');
}
