/**
 * Where PINs and other secrets come from: `pin-value` (tests only), `pin-source=env:NAME`,
 * `pin-source=file:PATH` (must be 0600 or tighter), then `SEAL_PIN`, then a prompt when a
 * terminal is attached. The secret itself never reaches a message, log or URI string.
 */
import { readFileSync, statSync, openSync, writeSync, closeSync, fstatSync } from 'node:fs';
import { SealError } from './errors.js';
import type { SealUri } from './uri.js';

export type SecretSource =
  | { kind: 'value'; value: string }
  | { kind: 'env'; name: string }
  | { kind: 'file'; path: string };

export function parseSecretSource(text: string): SecretSource {
  if (text.startsWith('env:')) {
    const name = text.slice(4);
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new SealError('SECRET_SOURCE', 'secret source env: needs a variable name');
    return { kind: 'env', name };
  }
  if (text.startsWith('file:')) {
    let path = text.slice(5);
    if (path.startsWith('//')) path = path.slice(2); // file:///abs/path
    if (!path) throw new SealError('SECRET_SOURCE', 'secret source file: needs a path');
    return { kind: 'file', path };
  }
  throw new SealError('SECRET_SOURCE', "secret source must be 'env:NAME' or 'file:PATH'");
}

/** Refuses a secret file that others could read; returns its content without the final newline. */
export function readSecretFile(path: string): string {
  let st;
  try {
    st = statSync(path);
  } catch {
    throw new SealError('SECRET_SOURCE', `secret file ${path} cannot be read`);
  }
  if (!st.isFile()) throw new SealError('SECRET_SOURCE', `secret file ${path} is not a regular file`);
  if ((st.mode & 0o077) !== 0) {
    throw new SealError('SECRET_SOURCE', `secret file ${path} is readable by group or others; run chmod 600 on it`);
  }
  return readFileSync(path, 'utf8').replace(/\r?\n$/, '');
}

/** Writes a secret file created 0600 (refuses to overwrite a looser existing file). */
export function writeSecretFile(path: string, content: string): void {
  const fd = openSync(path, 'wx', 0o600);
  try {
    if ((fstatSync(fd).mode & 0o077) !== 0) throw new SealError('SECRET_SOURCE', `could not create ${path} with mode 0600`);
    writeSync(fd, content + '\n');
  } finally {
    closeSync(fd);
  }
}

export function resolveSecretSource(src: SecretSource): string {
  switch (src.kind) {
    case 'value':
      return src.value;
    case 'env': {
      const v = process.env[src.name];
      if (v === undefined || v === '') throw new SealError('SECRET_SOURCE', `environment variable ${src.name} is not set`);
      return v;
    }
    case 'file':
      return readSecretFile(src.path);
  }
}

export interface PinOptions {
  /** Explicit PIN (API callers); takes precedence over everything. */
  pin?: string;
  /** Prompt function used when nothing else gives a PIN; default: a no-echo prompt on a TTY. */
  prompt?: (question: string) => Promise<string>;
  /** Ask interactively at all (default: only when stdin and stderr are terminals). */
  interactive?: boolean;
}

/** Where the PIN of an environment URI comes from (without reading it yet). */
export function pinSourceOf(uri: SealUri): SecretSource | undefined {
  const value = uri.query('pin-value');
  if (value !== undefined) return { kind: 'value', value };
  const source = uri.query('pin-source');
  if (source !== undefined) return parseSecretSource(source);
  return undefined;
}

export async function resolvePin(uri: SealUri, what: string, options: PinOptions = {}): Promise<string> {
  if (options.pin !== undefined) return options.pin;
  const src = pinSourceOf(uri);
  if (src) return resolveSecretSource(src);
  const fromEnv = process.env.SEAL_PIN;
  if (fromEnv) return fromEnv;
  const interactive = options.interactive ?? (process.stdin.isTTY === true && process.stderr.isTTY === true);
  if (interactive) return (options.prompt ?? promptHidden)(`PIN for ${what}: `);
  throw new SealError('PIN_REQUIRED', `no PIN for ${what}: set SEAL_PIN or give pin-source=env:NAME|file:PATH in the URI`);
}

/** Reads a line from the terminal without echoing it. */
export async function promptHidden(question: string): Promise<string> {
  const stdin = process.stdin;
  process.stderr.write(question);
  return new Promise((resolve, reject) => {
    let buf = '';
    const wasRaw = stdin.isRaw;
    stdin.setRawMode?.(true);
    stdin.resume();
    const done = (err?: Error): void => {
      stdin.off('data', onData);
      stdin.setRawMode?.(wasRaw);
      stdin.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(buf);
    };
    const onData = (chunk: Buffer): void => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n') return done();
        if (ch === '\u0003') return done(new SealError('PIN_REQUIRED', 'PIN entry cancelled'));
        if (ch === '\u007f' || ch === '\b') buf = buf.slice(0, -1);
        else buf += ch;
      }
    };
    stdin.on('data', onData);
  });
}
