/**
 * Lets a child `node` process import seal-bridge straight from src/ (TypeScript), the way vitest
 * does in-process, so child-process tests exercise the current sources rather than a dist/ build
 * that may be stale:  node --import ./test/integration/support/ts-loader.mjs -e '…'
 *
 * Registers module hooks (this same file, in the hooks thread): a missing `./x.js` import falls
 * back to `./x.ts`, and `.ts` files are transpiled with the project's TypeScript (types erased,
 * no type checking — `npx tsc --noEmit` does that).
 */
import { isMainThread } from 'node:worker_threads';
import { register } from 'node:module';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

if (isMainThread) register(import.meta.url);

export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context);
  } catch (e) {
    const relative = specifier.startsWith('.') || specifier.startsWith('/') || specifier.startsWith('file:');
    if (relative && specifier.endsWith('.js') && e && e.code === 'ERR_MODULE_NOT_FOUND') {
      return next(specifier.slice(0, -3) + '.ts', context);
    }
    throw e;
  }
}

let ts;
export async function load(url, context, next) {
  if (!url.startsWith('file:') || !url.endsWith('.ts')) return next(url, context);
  ts ??= (await import('typescript')).default;
  const fileName = fileURLToPath(url);
  const out = ts.transpileModule(await readFile(fileName, 'utf8'), {
    fileName,
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, sourceMap: false },
  });
  return { format: 'module', source: out.outputText, shortCircuit: true };
}
