/**
 * SealUri: RFC 7512 §3.3 example URIs (values checked against the RFC's own decoding), percent
 * encoding of binary and UTF-8 values, the other schemes' shapes, secrets kept out of printed
 * forms, malformed input, and a parse∘format round-trip property.
 */
import { describe, expect, it } from 'vitest';
import { inspect } from 'node:util';
import fc from 'fast-check';
import { SealError, SealUri } from '../../src/index.js';

function expectInvalid(text: string): SealError {
  let caught: unknown;
  try {
    SealUri.parse(text);
  } catch (e) {
    caught = e;
  }
  expect(caught, `'${String(text).slice(0, 60)}' must be refused`).toBeInstanceOf(SealError);
  expect((caught as SealError).code).toBe('INVALID_URI');
  return caught as SealError;
}

/**
 * RFC 7512 §3.3, "Examples of PKCS #11 URIs", in order. `path`/`query` are the decoded values the
 * RFC describes; `id` is the CKA_ID bytes; `formatted` is the printed form when it differs from
 * the input (only normalization: upper-case hex, secrets left out).
 */
const RFC7512_EXAMPLES: Array<{
  uri: string;
  path: Record<string, string>;
  query?: Record<string, string>;
  id?: string;
  formatted?: string;
}> = [
  { uri: 'pkcs11:', path: {} },
  { uri: 'pkcs11:object=my-pubkey;type=public', path: { object: 'my-pubkey', type: 'public' } },
  {
    uri: 'pkcs11:object=my-key;type=private?pin-source=file:/etc/token',
    path: { object: 'my-key', type: 'private' },
    query: { 'pin-source': 'file:/etc/token' },
  },
  {
    uri: 'pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin',
    path: { token: 'The Software PKCS#11 Softtoken', manufacturer: 'Snake Oil, Inc.', model: '1.0', object: 'my-certificate', type: 'cert', serial: '' },
    query: { 'pin-source': 'file:/etc/token_pin' },
    id: '69953e5cf4bdec91',
  },
  {
    uri: 'pkcs11:object=my-sign-key;type=private?module-name=mypkcs11',
    path: { object: 'my-sign-key', type: 'private' },
    query: { 'module-name': 'mypkcs11' },
  },
  {
    uri: 'pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1',
    path: { object: 'my-sign-key', type: 'private' },
    query: { 'module-path': '/mnt/libmypkcs11.so.1' },
  },
  {
    uri: 'pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin',
    path: { token: 'Software PKCS#11 softtoken', manufacturer: 'Snake Oil, Inc.' },
    query: { 'pin-value': 'the-pin' },
    formatted: 'pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.',
  },
  { uri: 'pkcs11:slot-description=Sun%20Metaslot', path: { 'slot-description': 'Sun Metaslot' } },
  {
    uri: 'pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;library-version=1.23',
    path: { 'library-manufacturer': 'Snake Oil, Inc.', 'library-description': 'Soft Token Library', 'library-version': '1.23' },
  },
  {
    uri: 'pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06',
    path: { token: 'My token% created by Joe', 'library-version': '3' },
    id: '010203baddcafe040506',
    formatted: 'pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%BA%DD%CA%FE%04%05%06',
  },
  {
    uri: 'pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert',
    path: { token: 'A name with a substring %;', object: 'my-certificate', type: 'cert' },
  },
  {
    uri: 'pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert',
    path: { token: 'Name with a small A with acute: \u00e1', object: 'my-certificate', type: 'cert' },
  },
  {
    uri: 'pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a?pin-source=file:/etc/token_pin&vendor-bbb=value-b',
    path: { token: 'my-token', object: 'my-certificate', type: 'cert', 'vendor-aaa': 'value-a' },
    query: { 'pin-source': 'file:/etc/token_pin', 'vendor-bbb': 'value-b' },
  },
];

describe('RFC 7512 §3.3 examples', () => {
  it.each(RFC7512_EXAMPLES)('$uri', (ex) => {
    const u = SealUri.parse(ex.uri);
    expect(u.scheme).toBe('pkcs11');
    const expectedPath = Object.keys(ex.path).concat(ex.id !== undefined ? ['id'] : []);
    expect([...u.pathNames].sort()).toEqual(expectedPath.sort());
    for (const [name, value] of Object.entries(ex.path)) {
      expect(u.get(name), name).toBe(value);
      expect(u.has(name)).toBe(true);
    }
    expect([...u.queryNames].sort()).toEqual(Object.keys(ex.query ?? {}).sort());
    for (const [name, value] of Object.entries(ex.query ?? {})) expect(u.query(name), name).toBe(value);
    if (ex.id !== undefined) expect(u.getBytes('id')!.toString('hex')).toBe(ex.id);
    // the printed form is the RFC's own text (up to normalization) and parses to the same values
    const printed = u.toString();
    expect(printed).toBe(ex.formatted ?? ex.uri);
    const again = SealUri.parse(u.format({ includeSecrets: true }));
    for (const name of u.pathNames) expect(again.getBytes(name)!.equals(u.getBytes(name)!)).toBe(true);
    for (const name of u.queryNames) expect(again.query(name)).toBe(u.query(name));
  });

  it('the reserved characters of RFC 7512 pk11-path-res-avail / pk11-query-res-avail read as written', () => {
    const u = SealUri.parse("pkcs11:token=:[]@!$'()*+,=&?attr=:[]@!$'()*+,=/?");
    expect(u.get('token')).toBe(":[]@!$'()*+,=&");
    expect(u.query('attr')).toBe(":[]@!$'()*+,=/?");
    const again = SealUri.parse(u.toString());
    expect(again.get('token')).toBe(":[]@!$'()*+,=&");
    expect(again.query('attr')).toBe(":[]@!$'()*+,=/?");
  });

  it('unnecessarily escaped characters and non-printable bytes decode to their bytes', () => {
    const u = SealUri.parse('pkcs11:token=%3a%5b%5d%40%21%24%27%28%29%2a%2b%2c%26%3d-%60%20%3c%3e%7b');
    expect(u.get('token')).toBe(":[]@!$'()*+,&=-` <>{");
    const bin = SealUri.parse('pkcs11:token=%00%01%02Hello%FF%FE');
    expect(bin.getBytes('token')!.toString('hex')).toBe(Buffer.concat([Buffer.from([0, 1, 2]), Buffer.from('Hello'), Buffer.from([0xff, 0xfe])]).toString('hex'));
    expect(bin.toString()).toBe('pkcs11:token=%00%01%02Hello%FF%FE');
  });

  it('the scheme is case-insensitive (RFC 3986 §3.1)', () => {
    expect(SealUri.parse('PKCS11:token=a').scheme).toBe('pkcs11');
  });
});

describe('percent-encoding', () => {
  it('a binary id is always fully percent-encoded and comes back byte for byte', () => {
    const id = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    const u = SealUri.build('pkcs11', { token: 't', id });
    const text = u.toString();
    const expected = [...id].map((b) => '%' + b.toString(16).toUpperCase().padStart(2, '0')).join('');
    expect(text).toBe(`pkcs11:token=t;id=${expected}`);
    expect(SealUri.parse(text).getBytes('id')!.equals(id)).toBe(true);
    // readable ASCII bytes in an id are still encoded: an id is opaque
    expect(SealUri.build('pkcs11', { id: Buffer.from('ab') }).toString()).toBe('pkcs11:id=%61%62');
  });

  it('UTF-8 values are encoded as their UTF-8 bytes and decode back', () => {
    const token = 'Grüße aus Köln 🔐 ключ';
    const u = SealUri.build('pkcs11', { token });
    const text = u.toString();
    // every non-ASCII character appears as the percent-encoded UTF-8 of encodeURIComponent
    for (const ch of ['ü', 'ß', 'ö', '🔐', 'к']) expect(text).toContain(encodeURIComponent(ch));
    expect(/[^\x21-\x7e]/.test(text)).toBe(false);
    expect(SealUri.parse(text).get('token')).toBe(token);
    expect(SealUri.build('pkcs11', { token: 'Name with a small A with acute: á', object: 'my-certificate', type: 'cert' }).toString()).toBe(
      'pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert',
    );
  });

  it('separators inside values are encoded so that they do not split attributes', () => {
    const u = SealUri.build('pkcs11', { token: 'a;b&c?d#e%f' }, { 'pin-source': 'file:/p&q;r#s' });
    const again = SealUri.parse(u.toString());
    expect(again.get('token')).toBe('a;b&c?d#e%f');
    expect(again.query('pin-source')).toBe('file:/p&q;r#s');
    expect(again.pathNames).toEqual(['token']);
    expect(again.queryNames).toEqual(['pin-source']);
  });
});

describe('other schemes', () => {
  it('tcti=swtpm:host=127.0.0.1,port=2321 reads as written (a query pair splits on its first =)', () => {
    const text = 'tpm2:object=device-id?tcti=swtpm:host=127.0.0.1,port=2321';
    const u = SealUri.parse(text);
    expect(u.scheme).toBe('tpm2');
    expect(u.get('object')).toBe('device-id');
    expect(u.query('tcti')).toBe('swtpm:host=127.0.0.1,port=2321');
    expect(u.toString()).toBe(text);
    expect(SealUri.parse('tpm2:object=device-id?tcti=device:/dev/tpmrm0').query('tcti')).toBe('device:/dev/tpmrm0');
  });

  it('at:port=/dev/ttyUSB2;applet=iotsafe;object=client-key?baud=115200', () => {
    const text = 'at:port=/dev/ttyUSB2;applet=iotsafe;object=client-key?baud=115200';
    const u = SealUri.parse(text);
    expect(u.scheme).toBe('at');
    expect(u.pathNames).toEqual(['port', 'applet', 'object']);
    expect(u.get('port')).toBe('/dev/ttyUSB2');
    expect(u.get('applet')).toBe('iotsafe');
    expect(u.get('object')).toBe('client-key');
    expect(u.query('baud')).toBe('115200');
    expect(u.toString()).toBe(text);
  });

  it('pcsc:reader=Virtual%20PCD%2000%2000;applet=piv;slot=9a?pin-source=env:PIV_PIN', () => {
    const u = SealUri.parse('pcsc:reader=Virtual%20PCD%2000%2000;applet=piv;slot=9a?pin-source=env:PIV_PIN');
    expect(u.get('reader')).toBe('Virtual PCD 00 00');
    expect(u.get('slot')).toBe('9a');
    expect(u.query('pin-source')).toBe('env:PIV_PIN');
  });
});

describe('secrets', () => {
  const text = 'pkcs11:token=gw-hsm;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=s3cr3t-PIN&pin-source=env:SEAL_PIN';

  it('pin-value never appears in toString(), JSON.stringify or util.inspect', () => {
    const u = SealUri.parse(text);
    expect(u.query('pin-value')).toBe('s3cr3t-PIN');
    for (const shown of [u.toString(), `${u}`, String(u), JSON.stringify(u), JSON.stringify({ uri: u }), u.format(), inspect(u, { showHidden: true, depth: 5 })]) {
      expect(shown).not.toContain('s3cr3t-PIN');
      expect(shown).not.toContain('pin-value');
    }
    expect(u.toString()).toBe('pkcs11:token=gw-hsm;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:SEAL_PIN');
  });

  it('format({ includeSecrets: true }) keeps pin-value, and it parses back', () => {
    const u = SealUri.parse(text);
    const full = u.format({ includeSecrets: true });
    expect(full).toContain('pin-value=s3cr3t-PIN');
    expect(SealUri.parse(full).query('pin-value')).toBe('s3cr3t-PIN');
  });

  it('a URI whose only query attribute is pin-value prints without a dangling ?', () => {
    expect(SealUri.parse('pkcs11:token=t?pin-value=1234').toString()).toBe('pkcs11:token=t');
  });

  it('an INVALID_URI error does not echo a pin-value', () => {
    const e = expectInvalid('pkcs11:token=a;token=b?pin-value=Very-Secret-1');
    expect(e.message).not.toContain('Very-Secret-1');
    const e2 = expectInvalid('pkcs11:token=a?pin-value=Very-Secret-2&bad%=1');
    expect(e2.message).not.toContain('Very-Secret-2');
  });
});

describe('malformed input → INVALID_URI', () => {
  it.each([
    ['no scheme', 'token=abc'],
    ['no scheme, only a colon', ':token=abc'],
    ['empty string', ''],
    ['scheme with a bad character', 'pk_cs11:token=a'],
    ['scheme starting with a digit', '11pkcs:token=a'],
    ['bad %: not hex', 'pkcs11:token=%zz'],
    ['bad %: one digit', 'pkcs11:token=%4'],
    ['bad %: bare percent', 'pkcs11:token=100%'],
    ['bad % in the query', 'pkcs11:token=a?pin-source=file:%G0'],
    ['duplicate path attribute', 'pkcs11:token=a;token=b'],
    ['duplicate query attribute', 'pkcs11:token=a?module-path=/a&module-path=/b'],
    ['empty attribute name', 'pkcs11:=value'],
    ['empty attribute name after a separator', 'pkcs11:token=a;=b'],
    ['empty query attribute name', 'pkcs11:token=a?=b'],
    ['attribute without =', 'pkcs11:token'],
    ['empty attribute (double ;)', 'pkcs11:token=a;;object=b'],
    ['upper-case attribute name', 'pkcs11:Token=a'],
    ['attribute name with a space', 'pkcs11:to ken=a'],
    ['unencoded space', 'pkcs11:token=a b'],
    ['control character', 'pkcs11:token=a\u0001b'],
    ['newline', 'pkcs11:token=a\nb'],
    ['tab in the query', 'pkcs11:token=a?pin-source=env:A\tB'],
    ['DEL', 'pkcs11:token=a\u007fb'],
    ['fragment', 'pkcs11:token=a#frag'],
  ])('%s', (_name, text) => {
    expectInvalid(text);
  });

  it('over-long (more than 8192 characters) is refused; 8192 is accepted', () => {
    const base = 'pkcs11:token=';
    expectInvalid(base + 'a'.repeat(8193 - base.length));
    expect(SealUri.parse(base + 'a'.repeat(8192 - base.length)).get('token')!.length).toBe(8192 - base.length);
  });

  it('not a string', () => {
    expectInvalid(42 as unknown as string);
    expectInvalid(undefined as unknown as string);
  });

  it('build() refuses bad names too', () => {
    expect(() => SealUri.build('pkcs11', { 'Bad Name': 'x' })).toThrow(SealError);
    expect(() => SealUri.build('1bad', {})).toThrow(SealError);
  });
});

describe('parse ∘ format round trip (property)', () => {
  const name = fc.stringMatching(/^[a-z][a-z0-9_-]{0,15}$/);
  const text = fc.string({ unit: 'binary', maxLength: 40 });
  const bytes = fc.uint8Array({ maxLength: 32 }).map((a) => Buffer.from(a));

  it('random attribute maps survive format → parse, values and order intact', () => {
    fc.assert(
      fc.property(
        fc.dictionary(name.filter((n) => n !== 'id'), text, { maxKeys: 6 }),
        fc.option(bytes, { nil: undefined }),
        fc.dictionary(name, text, { maxKeys: 5 }),
        (path, id, query) => {
          const u = SealUri.build('pkcs11', id === undefined ? path : { ...path, id }, query);
          const printed = u.format({ includeSecrets: true });
          expect(/[\s\u0000-\u001f\u007f-\uffff]/.test(printed), 'printed form is plain ASCII').toBe(false);
          const back = SealUri.parse(printed);
          expect(back.pathNames).toEqual(u.pathNames);
          expect(back.queryNames).toEqual(u.queryNames);
          for (const [k, v] of Object.entries(path)) expect(back.get(k)).toBe(v);
          if (id !== undefined) expect(back.getBytes('id')!.equals(id)).toBe(true);
          for (const [k, v] of Object.entries(query)) expect(back.query(k)).toBe(v);
          // formatting is stable: a parsed URI prints exactly as it was printed
          expect(back.format({ includeSecrets: true })).toBe(printed);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('any parseable URI formats to one that parses to the same attributes', () => {
    const chunk = fc.oneof(fc.constantFrom('%41', '%c3%a1', '%00', ':', '/', ',', '=', '@', '!', "'", '(', ')', '*', '+', '$', '~', '.', '-', '_'), fc.string({ unit: 'grapheme-ascii', maxLength: 4 }).filter((s) => /^[A-Za-z0-9]*$/.test(s)));
    const value = fc.array(chunk, { maxLength: 6 }).map((a) => a.join(''));
    fc.assert(
      fc.property(fc.uniqueArray(fc.tuple(name, value), { selector: ([n]) => n, maxLength: 5 }), (pairs) => {
        const text = `pkcs11:${pairs.map(([n, v]) => `${n}=${v}`).join(';')}`;
        const u = SealUri.parse(text);
        const back = SealUri.parse(u.toString());
        for (const [n] of pairs) expect(back.getBytes(n)!.equals(u.getBytes(n)!)).toBe(true);
      }),
      { numRuns: 300 },
    );
  });
});
