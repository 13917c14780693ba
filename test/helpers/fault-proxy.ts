/**
 * The fault-injection PKCS#11 proxy (test/fault-pkcs11/proxy.c) seen from a test: built with make
 * when missing or older than its sources, pointed at a real module through the environment, told
 * what to break through its control file, and read back through its per-function call counts.
 *
 *   const proxy = FaultProxy.start(requireEnv('SEAL_SOFTHSM_MODULE'));   // before the first load
 *   const env = await openEnvironment(proxy.uri(softhsmUri()));
 *   proxy.rules('C_Sign fail CKR_SESSION_HANDLE_INVALID count=1');
 *   const before = proxy.counts();  ...  proxy.callsSince(before, 'C_Login')
 *
 * The proxy reads SEAL_FAULT_TARGET / _CONTROL / _STATS once, when pkcs11js first loads it, so
 * one process has one proxy: start() sets them and refuses a second, different, target.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pkcs11 from 'pkcs11js';
import { SealUri } from '../../src/index.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const SOURCE_DIR = join(ROOT, 'test/fault-pkcs11');
const BUILD_DIR = join(SOURCE_DIR, 'build');
export const FAULT_PROXY_LIBRARY = join(BUILD_DIR, 'libseal-fault-pkcs11.so');

export interface CallCounts {
  /** Calls that reached the proxy (failed ones included). */
  calls: number;
  /** Calls answered with an injected CKR_* value, never forwarded. */
  failed: number;
  delayed: number;
  hung: number;
  /** Calls inside the proxy or the real module right now. */
  active: number;
}
export type CountTable = ReadonlyMap<string, CallCounts>;
const ZERO: CallCounts = { calls: 0, failed: 0, delayed: 0, hung: 0, active: 0 };

/** The proxy's function names, from the header it is built with (so a typo in a rule throws). */
function functionNames(): Set<string> {
  const header = readFileSync(join(ROOT, 'node_modules/pkcs11js/includes/pkcs11/pkcs11f.h'), 'utf8');
  return new Set([...header.matchAll(/CK_PKCS11_FUNCTION_INFO\((C_\w+)\)/g)].map((m) => m[1]!));
}

/** Builds the proxy when it is missing or older than proxy.c / Makefile; returns its path. */
export function buildFaultProxy(): string {
  const newest = Math.max(statSync(join(SOURCE_DIR, 'proxy.c')).mtimeMs, statSync(join(SOURCE_DIR, 'Makefile')).mtimeMs);
  if (existsSync(FAULT_PROXY_LIBRARY) && statSync(FAULT_PROXY_LIBRARY).mtimeMs >= newest) return FAULT_PROXY_LIBRARY;
  const r = spawnSync('make', ['-C', SOURCE_DIR, `BUILD=${BUILD_DIR}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`building the fault proxy failed (make status ${r.status}):\n${r.stdout}\n${r.stderr}`);
  return FAULT_PROXY_LIBRARY;
}

function ckrValue(token: string): string {
  if (/^(0x[0-9a-f]+|\d+)$/i.test(token)) return token;
  const v = (pkcs11 as unknown as Record<string, unknown>)[token];
  if (!token.startsWith('CKR_') || typeof v !== 'number') throw new Error(`unknown return value '${token}' in a fault rule`);
  return `0x${v.toString(16)}`;
}

export class FaultProxy {
  static #current: FaultProxy | undefined;
  readonly library: string;
  readonly target: string;
  readonly dir: string;
  readonly controlPath: string;
  readonly statsPath: string;
  readonly #names = functionNames();
  #seq = 0;

  private constructor(target: string) {
    this.library = buildFaultProxy();
    this.target = target;
    this.dir = mkdtempSync(join(tmpdir(), 'seal-fault-'));
    this.controlPath = join(this.dir, 'control');
    this.statsPath = join(this.dir, 'stats');
  }

  /** Builds the proxy and points it at `target` (a real module path) for this process. */
  static start(target: string): FaultProxy {
    const cur = FaultProxy.#current;
    if (cur) {
      if (cur.target !== target) throw new Error('this process already runs the fault proxy over another module');
      return cur;
    }
    const p = new FaultProxy(target);
    p.rules();
    process.env.SEAL_FAULT_TARGET = target;
    process.env.SEAL_FAULT_CONTROL = p.controlPath;
    process.env.SEAL_FAULT_STATS = p.statsPath;
    FaultProxy.#current = p;
    return p;
  }

  /** `uri` with its module-path replaced by the proxy (and any extra query attributes). */
  uri(uri: string, query: Record<string, string> = {}): string {
    return SealUri.parse(uri).withQuery({ 'module-path': this.library, ...query }).toString();
  }

  /**
   * Replaces every rule (none: the proxy forwards everything) and releases held calls. Lines as
   * proxy.c documents them; a CKR_* name may stand for the value.
   */
  rules(...lines: string[]): void {
    const out = [`# seq ${++this.#seq}`];
    for (const line of lines) {
      const t = line.trim().split(/\s+/);
      const [fn, action] = t;
      if (!fn || (fn !== '*' && !this.#names.has(fn)) || fn === 'C_GetFunctionList') throw new Error(`fault rule '${line}': unknown function`);
      let rest: string[];
      if (action === 'fail' && t[2]) rest = [ckrValue(t[2]), ...t.slice(3)];
      else if (action === 'delay' && /^\d+$/.test(t[2] ?? '')) rest = t.slice(2);
      else if (action === 'hang') rest = t.slice(2);
      else throw new Error(`fault rule '${line}': expected fail <CKR>, delay <ms> or hang`);
      for (const opt of action === 'hang' ? rest : rest.slice(1)) {
        if (!/^(count|after)=\d+$/.test(opt)) throw new Error(`fault rule '${line}': unknown option '${opt}'`);
      }
      out.push([fn, action, ...rest].join(' '));
    }
    // rename: the proxy, reading on every call from any thread, never sees half a file
    const tmp = `${this.controlPath}.tmp`;
    writeFileSync(tmp, `${out.join('\n')}\n`, { mode: 0o600 });
    renameSync(tmp, this.controlPath);
  }

  /** The proxy's counters as of its last call; throws if it found a rule it did not understand. */
  counts(): CountTable {
    const table = new Map<string, CallCounts>();
    if (!existsSync(this.statsPath)) return table;
    const [head, ...lines] = readFileSync(this.statsPath, 'utf8').trim().split('\n');
    const errors = /errors (\d+)/.exec(head ?? '')?.[1];
    if (errors !== '0') throw new Error(`the fault proxy rejected ${errors ?? '?'} control lines`);
    for (const line of lines) {
      const [name, ...fields] = line.split(' ');
      const c: Record<string, number> = {};
      for (const f of fields) {
        const [k, v] = f.split('=');
        c[k!] = Number(v);
      }
      table.set(name!, { ...ZERO, ...c });
    }
    return table;
  }

  /** One function's counters (zeros if it was never called). */
  count(fn: string, table: CountTable = this.counts()): CallCounts {
    return table.get(fn) ?? ZERO;
  }

  /** Calls of `fn` since the `before` snapshot. */
  callsSince(before: CountTable, fn: string): number {
    return this.count(fn).calls - this.count(fn, before).calls;
  }

  /** Every function called since `before`, with its number of calls. */
  deltaSince(before: CountTable): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [fn, c] of this.counts()) {
      const d = c.calls - this.count(fn, before).calls;
      if (d) out[fn] = d;
    }
    return out;
  }

  /** Waits until no call is inside the proxy or the module (held calls returned). */
  async settled(timeoutMs = 10_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const busy = [...this.counts()].filter(([, c]) => c.active > 0).map(([fn]) => fn);
      if (busy.length === 0) return;
      if (Date.now() > end) throw new Error(`calls still inside the module after ${timeoutMs} ms: ${busy.join(', ')}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Clears the rules (releasing held calls) and removes the control directory. */
  dispose(): void {
    this.rules();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
