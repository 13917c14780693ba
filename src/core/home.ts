/** The seal data directory: `$SEAL_HOME`, else `$XDG_DATA_HOME/seal-bridge`, else `~/.local/share/seal-bridge`. */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

export function sealHome(): string {
  if (process.env.SEAL_HOME) return resolve(process.env.SEAL_HOME);
  const data = process.env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(data, 'seal-bridge');
}
