/**
 * The `tpm2:` backend. URI query attributes:
 *   tcti=<TCTI string>            device:/dev/tpmrm0 (default), tabrmd, swtpm:host=…,port=…, mssim:…
 *   keystore=<dir>                where key blobs live (default $SEAL_HOME/tpm2)
 *   param-encryption=on|off       salted HMAC session + AES-128-CFB on the bus (default on)
 *   max-loaded=<n>                our objects loaded at once (default 2; ≥ 2 for certify)
 *   owner-auth-source=env:…|file:…  owner hierarchy auth, for making the SRK persistent
 *   protection-level=0..3         override the level derived from the TPM's identity (warns)
 *   exclusive=on                  this process is the TPM's only user (no resource manager): flush
 *                                 what crashed runs left in the TPM at each connection
 */
import path from 'node:path';
import { SealError } from '../../core/errors.js';
import { sealHome } from '../../core/home.js';
import { parseSecretSource, resolveSecretSource } from '../../core/secrets.js';
import type { ProtectionLevel } from '../../core/protection.js';
import type { SealUri } from '../../core/uri.js';
import type { Backend, OpenOptions } from '../../core/types.js';
import { TpmConnection } from './connection.js';
import { KeyStore } from './keystore.js';
import { Tpm2Environment } from './environment.js';

const KNOWN_QUERY = new Set(['tcti', 'keystore', 'param-encryption', 'max-loaded', 'owner-auth-source', 'protection-level', 'exclusive']);
const KNOWN_PATH = new Set(['object', 'type', 'id']);

const PT = { MANUFACTURER: 0x105, VENDOR_1: 0x106, VENDOR_2: 0x107, VENDOR_3: 0x108, VENDOR_4: 0x109, FIRMWARE_1: 0x10b, FIRMWARE_2: 0x10c } as const;
/** Manufacturers of firmware TPMs (TEE / CPU-integrated) and of discrete TPM chips (TCG vendor IDs). */
const FIRMWARE = new Set(['INTC', 'AMD', 'MSFT', 'QCOM', 'HPE', 'SMSN', 'ROCC', 'LEN']);
const DISCRETE = new Set(['IFX', 'STM', 'NTC', 'NTZ', 'ATML', 'NSM', 'SNS', 'WEC', 'BRCM', 'GOOG', 'CSCO', 'FLYS', 'TXN']);

const ascii = (v: number | undefined): string =>
  v === undefined ? '' : Buffer.from([v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff]).toString('latin1').replace(/\0/g, '').trim();

export function tpmProtection(tcti: string, manufacturer: string, vendor: string, override?: string): { level: ProtectionLevel; reason: string } {
  if (override !== undefined) {
    const n = Number(override);
    if (![0, 1, 2, 3].includes(n)) throw new SealError('INVALID_URI', 'protection-level must be 0..3');
    process.emitWarning(`protection level of the TPM set to ${n} by configuration, not by the TPM's identity`, { code: 'SEAL_PROTECTION_OVERRIDE' });
    return { level: n as ProtectionLevel, reason: 'set by configuration (protection-level=), not derived from the TPM' };
  }
  const kind = tcti.split(':')[0] ?? '';
  if (kind === 'swtpm' || kind === 'mssim' || /SW\s*TPM|swtpm|simulat/i.test(vendor)) {
    return { level: 1, reason: `software TPM simulator (${manufacturer || kind}): no hardware protection` };
  }
  if (FIRMWARE.has(manufacturer)) return { level: 2, reason: `firmware TPM (${manufacturer}): isolated execution, not tamper-resistant` };
  if (DISCRETE.has(manufacturer)) return { level: 3, reason: `discrete TPM chip (${manufacturer}): tamper-resistant module` };
  return { level: 2, reason: `TPM from an unrecognized manufacturer (${manufacturer || 'unknown'}): assumed firmware` };
}

export const backend: Backend = {
  scheme: 'tpm2',
  async open(uri: SealUri, _options: OpenOptions): Promise<Tpm2Environment> {
    for (const k of uri.queryNames) if (!KNOWN_QUERY.has(k)) throw new SealError('INVALID_URI', `unknown tpm2: query attribute '${k}'`);
    for (const k of uri.pathNames) if (!KNOWN_PATH.has(k)) throw new SealError('INVALID_URI', `unknown tpm2: path attribute '${k}'`);
    const tcti = uri.query('tcti') ?? 'device:/dev/tpmrm0';
    const storeDir = path.resolve(uri.query('keystore') ?? path.join(sealHome(), 'tpm2'));
    const pe = uri.query('param-encryption') ?? 'on';
    if (pe !== 'on' && pe !== 'off') throw new SealError('INVALID_URI', 'param-encryption must be on or off');
    const maxLoaded = Number(uri.query('max-loaded') ?? '2');
    if (!Number.isInteger(maxLoaded) || maxLoaded < 1 || maxLoaded > 16) throw new SealError('INVALID_URI', 'max-loaded must be 1..16');
    const ownerSource = uri.query('owner-auth-source');
    const ownerAuth = ownerSource ? Buffer.from(resolveSecretSource(parseSecretSource(ownerSource)), 'utf8') : undefined;
    const store = new KeyStore(storeDir);
    store.ensure();
    const exclusive = uri.query('exclusive') ?? 'off';
    if (exclusive !== 'on' && exclusive !== 'off') throw new SealError('INVALID_URI', 'exclusive must be on or off');
    const conn = new TpmConnection({ tcti, storeDir, paramEncryption: pe === 'on', maxLoaded, exclusive: exclusive === 'on', ...(ownerAuth ? { ownerAuth } : {}) });
    try {
      // connect, read the identity and settle the storage key now, so a bad TCTI fails at open
      await conn.run('connect', async (ctx) => conn.srk(ctx));
    } catch (e) {
      await conn.close();
      throw e;
    }
    const p = conn.properties;
    const manufacturer = ascii(p.get(PT.MANUFACTURER));
    const vendor = [PT.VENDOR_1, PT.VENDOR_2, PT.VENDOR_3, PT.VENDOR_4].map((k) => ascii(p.get(k))).join('');
    const fw1 = p.get(PT.FIRMWARE_1) ?? 0;
    const fw2 = p.get(PT.FIRMWARE_2) ?? 0;
    const protection = tpmProtection(tcti, manufacturer, vendor, uri.query('protection-level'));
    const baseUri = uri.withPath({ object: undefined, type: undefined, id: undefined });
    return new Tpm2Environment({
      conn,
      store,
      baseUri,
      info: {
        backend: 'tpm2',
        manufacturer,
        model: vendor || 'TPM 2.0',
        serial: '',
        firmware: `${fw1 >>> 16}.${fw1 & 0xffff}.${fw2 >>> 16}.${fw2 & 0xffff}`,
        label: `TPM 2.0 (${manufacturer || 'unknown'}${vendor ? ` ${vendor}` : ''})`,
        protectionLevel: protection.level,
        protectionReason: protection.reason,
      },
    });
  },
};
