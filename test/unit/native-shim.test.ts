/**
 * A backend whose native shim cannot load says why, every time, without affecting anything else
 * (the package still installs and runs on machines without libtss2 or libpcsclite).
 */
import { describe, expect, it } from 'vitest';
import { shimLoader } from '../../src/core/native-shim.js';

describe('native shim loader', () => {
  it('loads lazily and reports the same reason on every call when the shim is missing', () => {
    let before = 0;
    const load = shimLoader<object>({ relative: 'native-shims/absent/build/Release/absent.node', notBuilt: 'the absent shim is not built: install libabsent-dev', loadHint: 'unused', before: () => void before++ });
    expect(before).toBe(0); // nothing happens until first use
    expect(() => load()).toThrow('the absent shim is not built: install libabsent-dev');
    expect(() => load()).toThrow('the absent shim is not built: install libabsent-dev');
    expect(before).toBe(0); // never attempted to load a file that is not there
  });

  it('loads a present shim once and hands out the same module', () => {
    const load = shimLoader<{ Context: unknown }>({ relative: 'native-shims/tpm2/build/Release/tpm2_esys.node', notBuilt: 'not built', loadHint: 'does not load' });
    const a = load();
    expect(typeof a.Context).toBe('function');
    expect(load()).toBe(a);
  });
});
