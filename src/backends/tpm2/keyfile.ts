/**
 * TSS2 PEM key files ("-----BEGIN TSS2 PRIVATE KEY-----"), the format tpm2-openssl, the
 * tpm2-tss-engine and other TPM tools read:
 *
 *   TPMKey ::= SEQUENCE {
 *     type       OBJECT IDENTIFIER,            -- 2.23.133.10.1.3 loadable key
 *     emptyAuth  [0] EXPLICIT BOOLEAN OPTIONAL,
 *     parent     INTEGER,                      -- 0x40000001 (owner: the standard SRK) or a persistent handle
 *     pubkey     OCTET STRING,                 -- TPM2B_PUBLIC
 *     privkey    OCTET STRING }                -- TPM2B_PRIVATE (encrypted by the parent: useless off the TPM)
 */
import * as asn1js from 'asn1js';
import { SealError } from '../../core/errors.js';

export const OID_LOADABLE_KEY = '2.23.133.10.1.3';
const PEM_LABEL = 'TSS2 PRIVATE KEY';

export interface TpmKeyFile {
  emptyAuth: boolean;
  parent: number;
  public: Buffer;
  private: Buffer;
}

export function encodeKeyFile(k: TpmKeyFile): string {
  const parent = Buffer.alloc(5);
  parent.writeUInt32BE(k.parent >>> 0, 1); // leading zero keeps it positive
  const seq = new asn1js.Sequence({
    value: [
      new asn1js.ObjectIdentifier({ value: OID_LOADABLE_KEY }),
      new asn1js.Constructed({ idBlock: { tagClass: 3, tagNumber: 0 }, value: [new asn1js.Boolean({ value: k.emptyAuth })] }),
      new asn1js.Integer({ valueHex: parent[1]! & 0x80 ? parent : parent.subarray(1) }),
      new asn1js.OctetString({ valueHex: k.public }),
      new asn1js.OctetString({ valueHex: k.private }),
    ],
  });
  const der = Buffer.from(seq.toBER());
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${PEM_LABEL}-----\n${b64}\n-----END ${PEM_LABEL}-----\n`;
}

export function decodeKeyFile(pem: string): TpmKeyFile {
  try {
    return decodeKeyFileUnchecked(pem);
  } catch (e) {
    if (e instanceof SealError) throw e;
    throw new SealError('INVALID_ARGUMENT', 'malformed TSS2 key file', { cause: e });
  }
}

function decodeKeyFileUnchecked(pem: string): TpmKeyFile {
  const m = new RegExp(`-----BEGIN ${PEM_LABEL}-----([A-Za-z0-9+/=\\s]+)-----END ${PEM_LABEL}-----`).exec(pem);
  if (!m?.[1]) throw new SealError('INVALID_ARGUMENT', 'not a TSS2 PRIVATE KEY PEM file');
  const der = Buffer.from(m[1].replace(/\s+/g, ''), 'base64');
  const parsed = asn1js.fromBER(new Uint8Array(der));
  const seq = parsed.result;
  if (parsed.offset === -1 || !(seq instanceof asn1js.Sequence)) throw new SealError('INVALID_ARGUMENT', 'malformed TSS2 key file');
  const items = seq.valueBlock.value;
  const oid = items[0];
  if (!(oid instanceof asn1js.ObjectIdentifier) || oid.valueBlock.toString() !== OID_LOADABLE_KEY) {
    throw new SealError('NOT_SUPPORTED', 'TSS2 key file is not a loadable key');
  }
  let i = 1;
  let emptyAuth = false;
  const maybeAuth = items[i];
  if (maybeAuth && maybeAuth.idBlock.tagClass === 3 && maybeAuth.idBlock.tagNumber === 0) {
    const inner = (maybeAuth as asn1js.Constructed).valueBlock.value[0];
    emptyAuth = inner instanceof asn1js.Boolean ? inner.valueBlock.value : false;
    i++;
  }
  const parent = items[i];
  const pub = items[i + 1];
  const priv = items[i + 2];
  if (!(parent instanceof asn1js.Integer) || !(pub instanceof asn1js.OctetString) || !(priv instanceof asn1js.OctetString)) {
    throw new SealError('INVALID_ARGUMENT', 'malformed TSS2 key file');
  }
  const ph = Buffer.from(parent.valueBlock.valueHexView);
  if (ph.length > 5) throw new SealError('INVALID_ARGUMENT', 'TSS2 key file parent handle out of range');
  const parentHandle = ph.reduce((acc, b) => acc * 256 + b, 0);
  return { emptyAuth, parent: parentHandle, public: Buffer.from(pub.valueBlock.valueHexView), private: Buffer.from(priv.valueBlock.valueHexView) };
}
