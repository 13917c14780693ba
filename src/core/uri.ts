/**
 * RFC 7512-style URIs for every secure environment scheme (`pkcs11:`, `tpm2:`, `pcsc:`, `at:`).
 *
 *   scheme ":" path-attr *( ";" path-attr ) [ "?" query-attr *( "&" query-attr ) ]
 *
 * Path attributes name the module and the object; query attributes say how to reach it and
 * where secrets come from. Values are percent-decoded to bytes; `get()` reads them as UTF-8 and
 * `getBytes()` as raw bytes (PKCS#11 `id`). An attribute splits on its first `=`, so
 * `tcti=swtpm:host=127.0.0.1,port=2321` reads as written. A secret (`pin-value`) is never part of
 * the default string form.
 */
import { SealError } from './errors.js';

export const MAX_URI_LENGTH = 8192;
const SECRET_ATTRIBUTES = new Set(['pin-value']);
/** Attributes whose value is an opaque byte string: always fully percent-encoded. */
const BINARY_ATTRIBUTES = new Set(['id']);

const SCHEME_RE = /^[a-z][a-z0-9+.-]*$/;
const NAME_RE = /^[a-z][a-z0-9_-]*$/;
const UNRESERVED = /[A-Za-z0-9\-._~]/;
// RFC 7512 pk11-pchar / pk11-qchar extras, minus the separators of the other part
// ('&' is encoded in the path for safety; '/' is kept readable for file paths).
const PATH_EXTRA = new Set([...":[]@!$'()*+,=/"]);
const QUERY_EXTRA = new Set([...":[]@!$'()*+,=/?|;"]);

type Attr = readonly [name: string, value: Buffer];

export interface FormatOptions {
  /** Include `pin-value` (only for tests and internal hand-over, never for printing). */
  includeSecrets?: boolean;
}

function invalid(reason: string): SealError {
  return new SealError('INVALID_URI', `invalid URI: ${reason}`);
}

function percentDecode(text: string, where: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (ch === '%') {
      const hex = text.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) throw invalid(`bad percent-encoding in ${where}`);
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      const code = ch.charCodeAt(0);
      if (code < 0x21 || code === 0x7f) throw invalid(`unencoded control or space character in ${where}`);
      for (const b of Buffer.from(ch, 'utf8')) bytes.push(b);
    }
  }
  return Buffer.from(bytes);
}

function percentEncode(value: Buffer, extra: Set<string>, binary: boolean): string {
  if (binary) return [...value].map((b) => '%' + b.toString(16).padStart(2, '0').toUpperCase()).join('');
  let out = '';
  for (const b of value) {
    const ch = String.fromCharCode(b);
    out += b < 0x80 && (UNRESERVED.test(ch) || extra.has(ch)) ? ch : '%' + b.toString(16).padStart(2, '0').toUpperCase();
  }
  return out;
}

function parseAttrs(part: string, sep: string, where: 'path' | 'query'): Attr[] {
  if (part === '') return [];
  const seen = new Set<string>();
  return part.split(sep).map((item) => {
    const eq = item.indexOf('=');
    if (eq <= 0) throw invalid(`${where} attribute without a name=value form`);
    const name = item.slice(0, eq);
    if (!NAME_RE.test(name)) throw invalid(`bad ${where} attribute name '${name.slice(0, 40)}'`);
    if (seen.has(name)) throw invalid(`${where} attribute '${name}' given twice`);
    seen.add(name);
    return [name, percentDecode(item.slice(eq + 1), `${where} attribute '${name}'`)] as const;
  });
}

export class SealUri {
  readonly scheme: string;
  readonly #path: readonly Attr[];
  readonly #query: readonly Attr[];

  private constructor(scheme: string, path: readonly Attr[], query: readonly Attr[]) {
    this.scheme = scheme;
    this.#path = path;
    this.#query = query;
  }

  static parse(text: string): SealUri {
    if (typeof text !== 'string') throw invalid('not a string');
    if (text.length > MAX_URI_LENGTH) throw invalid(`longer than ${MAX_URI_LENGTH} characters`);
    const colon = text.indexOf(':');
    if (colon <= 0) throw invalid('no scheme (expected e.g. pkcs11:…)');
    const scheme = text.slice(0, colon).toLowerCase();
    if (!SCHEME_RE.test(scheme)) throw invalid('bad scheme');
    const rest = text.slice(colon + 1);
    if (rest.includes('#')) throw invalid('fragments are not allowed');
    const q = rest.indexOf('?');
    const pathPart = q < 0 ? rest : rest.slice(0, q);
    const queryPart = q < 0 ? '' : rest.slice(q + 1);
    return new SealUri(scheme, parseAttrs(pathPart, ';', 'path'), parseAttrs(queryPart, '&', 'query'));
  }

  /** Builds a URI from attribute maps; undefined values are left out. */
  static build(
    scheme: string,
    path: Record<string, string | Buffer | undefined>,
    query: Record<string, string | Buffer | undefined> = {},
  ): SealUri {
    if (!SCHEME_RE.test(scheme)) throw invalid('bad scheme');
    const conv = (rec: Record<string, string | Buffer | undefined>): Attr[] =>
      Object.entries(rec)
        .filter((e): e is [string, string | Buffer] => e[1] !== undefined)
        .map(([k, v]) => {
          if (!NAME_RE.test(k)) throw invalid(`bad attribute name '${k}'`);
          return [k, Buffer.isBuffer(v) ? Buffer.from(v) : Buffer.from(v, 'utf8')] as const;
        });
    return new SealUri(scheme, conv(path), conv(query));
  }

  get(name: string): string | undefined {
    return this.getBytes(name)?.toString('utf8');
  }
  getBytes(name: string): Buffer | undefined {
    const a = this.#path.find(([n]) => n === name);
    return a ? Buffer.from(a[1]) : undefined;
  }
  query(name: string): string | undefined {
    return this.#query.find(([n]) => n === name)?.[1].toString('utf8');
  }
  has(name: string): boolean {
    return this.#path.some(([n]) => n === name);
  }
  get pathNames(): string[] {
    return this.#path.map(([n]) => n);
  }
  get queryNames(): string[] {
    return this.#query.map(([n]) => n);
  }

  /** A copy with path attributes set (value) or removed (undefined). */
  withPath(changes: Record<string, string | Buffer | undefined>): SealUri {
    return new SealUri(this.scheme, merge(this.#path, changes), this.#query);
  }
  withQuery(changes: Record<string, string | Buffer | undefined>): SealUri {
    return new SealUri(this.scheme, this.#path, merge(this.#query, changes));
  }

  format(options: FormatOptions = {}): string {
    const path = this.#path
      .filter(([n]) => options.includeSecrets || !SECRET_ATTRIBUTES.has(n))
      .map(([n, v]) => `${n}=${percentEncode(v, PATH_EXTRA, BINARY_ATTRIBUTES.has(n))}`);
    const query = this.#query
      .filter(([n]) => options.includeSecrets || !SECRET_ATTRIBUTES.has(n))
      .map(([n, v]) => `${n}=${percentEncode(v, QUERY_EXTRA, false)}`);
    return `${this.scheme}:${path.join(';')}${query.length ? '?' + query.join('&') : ''}`;
  }

  /** The printable form: never contains a PIN. */
  toString(): string {
    return this.format();
  }
  toJSON(): string {
    return this.format();
  }
}

function merge(attrs: readonly Attr[], changes: Record<string, string | Buffer | undefined>): Attr[] {
  const out: Attr[] = attrs.filter(([n]) => !(n in changes));
  for (const [k, v] of Object.entries(changes)) {
    if (v === undefined) continue;
    if (!NAME_RE.test(k)) throw invalid(`bad attribute name '${k}'`);
    const bytes = Buffer.isBuffer(v) ? Buffer.from(v) : Buffer.from(v, 'utf8');
    const at = attrs.findIndex(([n]) => n === k);
    if (at >= 0) out.splice(Math.min(at, out.length), 0, [k, bytes]);
    else out.push([k, bytes]);
  }
  return out;
}

export function parseUri(text: string): SealUri {
  return SealUri.parse(text);
}
