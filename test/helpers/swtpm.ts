/**
 * A swtpm of a test's own: loopback only, its own state directory, free ports, stopped by the
 * process id it was started with. For tests that must not touch the simulator's shared swtpm:
 * ones that leave objects behind on purpose (a killed process, without a resource manager),
 * count dictionary-attack failures, or open with `exclusive=on` (which flushes every transient
 * object and session in the TPM, other users' included).
 *
 *   const tpm = await OwnSwtpm.start(dir);   …   tpm.uri(keystore)   …   await tpm.stop();
 *
 * A fault test can kill it (`kill('SIGKILL')`, by the pid it was started with) and `restart()` it
 * on the same ports with the same state directory. swtpm serves one client connection at a time:
 * tpm2-tools calls (`handles`) wait while an environment holds it open, so call them after close.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';

function canBind(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/**
 * A free port P with P+1 free too: the swtpm TCTI finds the control port at P+1. Below Linux's
 * ephemeral range (32768 and up), where a client connection's TIME-WAIT can still hold a port.
 */
export async function freePortPair(): Promise<number> {
  for (;;) {
    const p = 20000 + Math.floor(Math.random() * 12000);
    if ((await canBind(p)) && (await canBind(p + 1))) return p;
  }
}

export class OwnSwtpm {
  #proc: ChildProcess | undefined;
  #stderr = '';

  private constructor(readonly state: string, readonly port: number) {}

  /** Starts swtpm with its state in `dir/state`; resolves once tpm2_getcap gets an answer. */
  static async start(dir: string): Promise<OwnSwtpm> {
    const state = join(dir, 'state');
    mkdirSync(state, { recursive: true, mode: 0o700 });
    for (let attempt = 0; ; attempt++) {
      const t = new OwnSwtpm(state, await freePortPair());
      try {
        await t.#spawn();
        return t;
      } catch (e) {
        // another process took the port between the check and swtpm's bind: another pair
        await t.stop();
        if (attempt >= 2 || !/in use/i.test(t.#stderr)) throw e;
      }
    }
  }

  get tcti(): string {
    return `swtpm:host=127.0.0.1,port=${this.port}`;
  }

  /** The running swtpm's process id (undefined when stopped or killed). */
  get pid(): number | undefined {
    const p = this.#proc;
    return p && p.exitCode === null && p.signalCode === null ? p.pid : undefined;
  }

  /** Sends `signal` to this swtpm (by the pid it was started with) and waits until it has exited. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.#proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) throw new Error('swtpm is not running');
    const exited = new Promise((r) => p.once('exit', r));
    process.kill(p.pid!, signal);
    await exited;
  }

  /**
   * Starts swtpm again on the same ports with the same state directory (after `kill` or `stop`);
   * resolves once both ports accept connections. (Not through tpm2_getcap: a client of the test
   * that reconnects first would hold swtpm's one connection, and the probe would wait for it.)
   * A port still held by the dead server's closing connections is waited for (bounded), never
   * exchanged for another.
   */
  async restart(): Promise<void> {
    if (this.pid !== undefined) throw new Error('swtpm is still running');
    for (let attempt = 0; ; attempt++) {
      this.#stderr = '';
      try {
        await this.#spawn('ports');
        return;
      } catch (e) {
        await this.stop();
        if (attempt >= 20 || !/in use/i.test(this.#stderr)) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /** The environment URI with this key store (and any extra query, e.g. `&exclusive=on`). */
  uri(keystore: string, extra = ''): string {
    return `tpm2:?tcti=${this.tcti}&keystore=${keystore}${extra}`;
  }

  async #spawn(probe: 'getcap' | 'ports' = 'getcap'): Promise<void> {
    const proc = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${this.state}`,
      '--server', `type=tcp,port=${this.port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${this.port + 1},bindaddr=127.0.0.1`,
      '--flags', 'not-need-init,startup-clear'], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.#proc = proc;
    proc.stderr!.on('data', (d: Buffer) => (this.#stderr = (this.#stderr + d.toString()).slice(-2000)));
    let last = '';
    for (let i = 0; i < 100; i++) {
      if (probe === 'ports') {
        if ((await accepts(this.port)) && (await accepts(this.port + 1))) return;
        last = `port ${this.port} or ${this.port + 1} does not accept connections yet`;
      } else {
        const r = spawnSync('tpm2_getcap', ['-T', this.tcti, 'properties-fixed'], { encoding: 'utf8', timeout: 10_000 });
        if (r.status === 0) return;
        last = (r.stderr ?? '').slice(0, 300);
      }
      if (proc.exitCode !== null) {
        await new Promise((r) => setTimeout(r, 50)); // its last words
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`swtpm did not start: ${this.#stderr || last}`);
  }

  /** Handles of a class as tpm2_getcap lists them (`handles-transient`, `handles-loaded-session`, …). */
  handles(kind: TpmHandleKind): string[] {
    return tpmHandles(this.tcti, kind);
  }

  async stop(): Promise<void> {
    const p = this.#proc;
    this.#proc = undefined;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await exited;
  }
}

/** Whether something listens on 127.0.0.1:`port` (connects and closes at once). */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(2000, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

export type TpmHandleKind = 'handles-transient' | 'handles-loaded-session' | 'handles-saved-session' | 'handles-persistent';

/** Handles of a class in the TPM reached through `tcti`, as tpm2_getcap lists them (lower-case hex). */
export function tpmHandles(tcti: string, kind: TpmHandleKind): string[] {
  const r = spawnSync('tpm2_getcap', ['-T', tcti, kind], { encoding: 'utf8', timeout: 10_000 });
  if (r.status !== 0) throw new Error(`tpm2_getcap ${kind} failed: ${r.stderr}`);
  return r.stdout.split('\n').filter((l) => l.includes('0x')).map((l) => l.replace(/^-\s*/, '').trim().toLowerCase());
}
