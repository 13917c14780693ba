/**
 * AddressSanitizer driver for native-shims/pcsc (run by scripts/asan-check.sh with the ASan
 * build's path as the argument, under the simulators' pcscd: PCSCLITE_CSOCK_NAME and
 * SEAL_PIV_READER from `scripts/sim start`). Valid calls against the virtual PIV card, then wrong
 * types, empty and oversized APDUs, unknown handles, mismatched reader-state arrays, waits
 * cancelled and contexts closed under pending work, calls on closed contexts, and contexts left
 * to the garbage collector and to process exit.
 */
import { Driver, Prng, collectGarbage, isRangeError, isTypeError, requireEnv } from './harness.js';
import { SCARD, SCARD_CODES, type PcscContext, type PcscShim } from '../../src/backends/pcsc/pcsc-native.js';

const d = new Driver('pcsc');
const file = process.argv[2];
if (!file) throw new Error('usage: pcsc.ts <path to pcsc_lite.node>');
const shim = d.load<PcscShim>(file);
const reader = requireEnv('SEAL_PIV_READER');
const SELECT_PIV = Buffer.from('00a4040005a000000308', 'hex');
/** Instructions that could change the card's state (PIN tries, keys, data): never sent at random. */
const STATEFUL_INS = new Set([0x20, 0x24, 0x2c, 0x47, 0x87, 0xdb, 0xfe, 0xe4, 0xe0, 0xf9, 0xf7]);
const code = (name: keyof typeof SCARD_CODES) => (e: unknown) => (e as { code?: number }).code === SCARD_CODES[name];
const raw = (ctx: PcscContext) => ctx as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;

async function main(): Promise<void> {
  const prng = new Prng(0x5ea1);

  // a context that was never opened
  const idle = new shim.Context();
  await d.fails('listReaders before open', () => idle.listReaders(), /not open/);
  await d.fails('connect before open', () => idle.connect(reader, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T1), /not open/);
  await d.ok('close a context never opened', () => idle.close());
  await d.ok('close twice', () => idle.close());
  await d.fails('listReaders after close', () => idle.listReaders(), /closed/);

  const ctx = new shim.Context();
  await d.ok('open', () => ctx.open());
  await d.ok('open again (no-op)', () => ctx.open());
  const readers = await d.ok('listReaders', () => ctx.listReaders());
  d.check(`reader ${reader} listed`, readers?.includes(reader) === true);

  // wrong argument types and counts: refused on the JS thread
  const r = raw(ctx);
  await d.fails('connect without arguments', () => r.connect!(), isTypeError);
  await d.fails('connect with a number as reader', () => r.connect!(42, 2, 2), isTypeError);
  await d.fails('connect with a string share mode', () => r.connect!(reader, '2', 2), isTypeError);
  await d.fails('transmit with a string APDU', () => r.transmit!(1, 2, '00a40400'), isTypeError);
  await d.fails('transmit with an array APDU', () => r.transmit!(1, 2, [0, 0xa4, 4, 0]), isTypeError);
  await d.fails('status with an object handle', () => r.status!({}), isTypeError);
  await d.fails('getStatusChange with strings', () => r.getStatusChange!(reader, 0, 0), isTypeError);
  await d.fails('getStatusChange with number reader names', () => r.getStatusChange!([1], [0], 0), isTypeError);
  await d.fails('getStatusChange with string states', () => r.getStatusChange!([reader], ['0'], 0), isTypeError);
  await d.fails('getStatusChange with no readers', () => ctx.getStatusChange([], [], 0), isRangeError);
  const trap = Object.defineProperty([reader], 0, { get: () => { throw new Error('getter'); } }) as string[];
  await d.fails('getStatusChange with a reader name whose getter throws', () => ctx.getStatusChange(trap, [0], 0), /getter/);
  await d.fails('getStatusChange with arrays of different lengths', () => ctx.getStatusChange([reader], [0, 0], 0), isRangeError);
  await d.fails('connect to an unknown reader', () => ctx.connect('no such reader', SCARD.SHARE_SHARED, SCARD.PROTOCOL_T1), code('UnknownReader'));
  await d.fails('connect to a 64 KiB reader name', () => ctx.connect('R'.repeat(65536), SCARD.SHARE_SHARED, SCARD.PROTOCOL_T1));

  // unknown handles (including values that wrap when converted to uint32)
  for (const h of [0, 7, 0xffffffff, -1, 2 ** 40, Number.NaN, 1.5]) {
    await d.fails(`status of unknown handle ${h}`, () => ctx.status(h), code('InvalidHandle'));
    await d.fails(`transmit on unknown handle ${h}`, () => ctx.transmit(h, SCARD.PROTOCOL_T1, SELECT_PIV), code('InvalidHandle'));
    await d.fails(`disconnect unknown handle ${h}`, () => ctx.disconnect(h, SCARD.LEAVE_CARD), code('InvalidHandle'));
  }

  // reader states: valid wait with a timeout, unknown reader, very long names, many entries
  const states = await d.ok('getStatusChange (unaware → present)', () => ctx.getStatusChange([reader], [SCARD.STATE_UNAWARE], 0));
  d.check('reader state reports a card present', ((states?.[0]?.eventState ?? 0) & SCARD.STATE_PRESENT) !== 0);
  d.check('ATR of at most 33 bytes', (states?.[0]?.atr.length ?? 99) <= 33);
  await d.any(() => ctx.getStatusChange(['no such reader'], [SCARD.STATE_UNAWARE], 0));
  await d.any(() => ctx.getStatusChange(['X'.repeat(10000)], [SCARD.STATE_UNAWARE], 0));
  await d.any(() => ctx.getStatusChange(Array.from({ length: 64 }, (_, i) => `${reader}${i % 2 ? '' : ' '}`), new Array<number>(64).fill(0), 0));

  // a wait ended by cancel(), on a second context (pcsc-lite serialises one context's calls)
  const waiter = new shim.Context();
  await d.ok('open waiter', () => waiter.open());
  const present = states?.[0]?.eventState ?? 0;
  const wait = waiter.getStatusChange([reader], [present], SCARD.INFINITE);
  setTimeout(() => void waiter.cancel(), 100);
  await d.fails('wait ended by cancel', () => wait, code('Cancelled'));
  await d.ok('cancel without a wait', () => waiter.cancel());
  // a wait ended by close()
  const wait2 = waiter.getStatusChange([reader], [present], SCARD.INFINITE);
  setTimeout(() => void waiter.close(), 100);
  await d.fails('wait ended by close', () => wait2);
  await d.fails('wait on a closed context', () => waiter.getStatusChange([reader], [present], 0), /closed/);

  // a card: valid exchanges, then malformed and random APDUs
  const conn = await d.ok('connect', () => ctx.connect(reader, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1));
  if (conn) {
    const { handle, protocol } = conn;
    const st = await d.ok('status', () => ctx.status(handle));
    d.check('status names the reader', st?.reader === reader);
    await d.ok('beginTransaction', () => ctx.beginTransaction(handle));
    const sel = await d.ok('SELECT PIV', () => ctx.transmit(handle, protocol, SELECT_PIV));
    d.check('SELECT answers with a status word', (sel?.length ?? 0) >= 2);
    await d.fails('empty APDU', () => ctx.transmit(handle, protocol, Buffer.alloc(0)), isRangeError);
    // pcsclite.h MAX_BUFFER_SIZE_EXTENDED = 4 + 3 + 65536 + 3 + 2: one byte more is refused by the binding
    await d.fails('APDU of 65549 bytes', () => ctx.transmit(handle, protocol, Buffer.alloc(65549)), isRangeError);
    await d.fails('APDU of 1 MiB', () => ctx.transmit(handle, protocol, Buffer.alloc(1 << 20)), isRangeError);
    await d.fails('unknown protocol', () => ctx.transmit(handle, 0x99, SELECT_PIV), code('InvalidValue'));
    // vpcd frames a 1-byte payload as a reader control code (power off, reset, ATR), so random
    // APDUs start at 2 bytes; the card host answers anything longer
    for (let i = 0; i < 40; i++) {
      const apdu = prng.bytes(2 + prng.int(i < 32 ? 300 : 5000));
      if (apdu.length > 1 && STATEFUL_INS.has(apdu[1]!)) apdu[1] = 0xca;
      apdu[0] = apdu[0]! & 0x0c; // interindustry class, basic channel: stays on the selected applet
      await d.any(() => ctx.transmit(handle, protocol, apdu));
    }
    // a long extended APDU (vpcd's frame length is 16 bits: the binding's own bound of 65548 bytes
    // would not reach the virtual card intact)
    await d.any(() => ctx.transmit(handle, protocol, Buffer.concat([Buffer.from('00cb3fff00fde8', 'hex'), Buffer.alloc(65000)])));
    // exchanges queued at once (each one through vpcd takes tens of milliseconds: a few suffice)
    await d.ok('16 queued exchanges', () => Promise.all(Array.from({ length: 16 }, () => ctx.transmit(handle, protocol, SELECT_PIV))));
    await d.ok('endTransaction', () => ctx.endTransaction(handle, SCARD.LEAVE_CARD));
    await d.any(() => ctx.endTransaction(handle, 0x1234));
    await d.ok('reconnect', () => ctx.reconnect(handle, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1, SCARD.LEAVE_CARD));
    await d.ok('disconnect', () => ctx.disconnect(handle, SCARD.LEAVE_CARD));
    await d.fails('transmit after disconnect', () => ctx.transmit(handle, protocol, SELECT_PIV), code('InvalidHandle'));
    await d.fails('disconnect twice', () => ctx.disconnect(handle, SCARD.LEAVE_CARD), code('InvalidHandle'));
  }

  // close with work still queued: the queued calls settle, later calls are refused
  const busy = new shim.Context();
  await d.ok('open busy', () => busy.open());
  const c2 = await d.ok('connect busy', () => busy.connect(reader, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1));
  const queued = c2 ? Array.from({ length: 6 }, () => busy.transmit(c2.handle, c2.protocol, SELECT_PIV).catch(() => undefined)) : [];
  await d.ok('close with 6 exchanges queued', () => busy.close());
  await Promise.all(queued);
  await d.fails('transmit after close', () => busy.transmit(c2?.handle ?? 1, SCARD.PROTOCOL_T1, SELECT_PIV), /closed/);
  await d.fails('open after close', () => busy.open(), /closed/);

  // contexts nobody closes: one collected (destructor path, with a card handle open), one alive at exit
  await (async () => {
    const dropped = new shim.Context();
    await d.ok('open dropped', () => dropped.open());
    await d.ok('connect dropped', () => dropped.connect(reader, SCARD.SHARE_SHARED, SCARD.PROTOCOL_T0 | SCARD.PROTOCOL_T1));
  })();
  await collectGarbage();
  const leftOpen = new shim.Context();
  await d.ok('open left-open', () => leftOpen.open());
  await d.ok('close', () => ctx.close());
  d.finish();
}

await main();
