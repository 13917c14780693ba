#!/usr/bin/env bash
# Native-shim checks, in two parts (each prints its own prefix):
#
#   hardening:  the normal builds (native-shims/*/build/Release/*.node) are read with readelf:
#               full RELRO (a GNU_RELRO segment and BIND_NOW), stack protector (__stack_chk_fail
#               imported, -fstack-protector-strong in the build's flags), FORTIFY_SOURCE (the flag
#               in effect in the build's flags with optimisation on; the fortified __*_chk imports
#               are listed), non-executable stack, no text relocations.
#   asan:       every shim is built a second time with -fsanitize=address into its own directory
#               ($SEAL_ASAN_DIR, default ~/.cache/seal-bridge/asan; the normal build is never
#               touched; rebuilt only when a source, a flag or the toolchain changed), a self-test
#               shows that a heap overflow inside node is reported, then one driver per shim
#               (test/asan/<shim>.ts) loads the ASan build by path and calls its raw surface with
#               valid and malformed input against the simulators. node itself is not instrumented:
#               libasan is preloaded (LD_PRELOAD) and leak detection is off (node's own allocations
#               would drown the report).
#
# Needs the simulators' environment (eval "$(scripts/sim start)"): SEAL_TPM_TCTI, PCSCLITE_CSOCK_NAME,
# SEAL_PIV_READER, SOFTHSM2_CONF, SEAL_SOFTHSM_MODULE, SEAL_SOFTHSM_URI. A shim whose normal build is
# missing because it is optional and its headers are absent is skipped with a note. Exit status 1
# on any missing hardening property, any sanitizer report, any broken driver expectation, or when
# the whole run exceeds SEAL_ASAN_TIMEOUT seconds (default 60).
#
#   scripts/asan-check.sh [--hardening-only | --asan-only]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode="${1:-all}"
shims=(pkcs11-kdf tpm2 pcsc)
status=0
started=$SECONDS
budget="${SEAL_ASAN_TIMEOUT:-60}"

fail() {
  echo "$1"
  status=1
}

# ---- hardening -------------------------------------------------------------------------------

module_of() { # the built .node of a shim, empty when there is none
  local f
  for f in "$root/native-shims/$1/build/Release/"*.node; do
    [ -f "$f" ] && { echo "$f"; return; }
  done
  return 0
}

# The flags of the Release configuration as the build recorded them (gyp's <target>.target.mk).
release_flags() {
  local mk
  mk="$(ls "$root/native-shims/$1/build/"*.target.mk 2>/dev/null | head -n1)"
  [ -n "$mk" ] || return 0
  awk '/^(CFLAGS|CFLAGS_CC|LDFLAGS)_Release :=/{on=1; next} on && /^[^\t]/{on=0} on{gsub(/[\t\\]/, ""); print}' "$mk"
}

optional_absent() { # prints the reason when a shim is optional and its headers are missing
  local json="$root/native-shims/$1/shim.json"
  [ -f "$json" ] || return 1
  node -e '
    const c = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const fs = require("fs"), path = require("path");
    const absent = (c.requiresHeaders ?? []).filter((h) => !["/usr/include", "/usr/local/include"].some((d) => fs.existsSync(path.join(d, h))));
    if (c.optional && absent.length) { console.log("missing " + absent.join(", ")); process.exit(0); }
    process.exit(1);' "$json"
}

hardening() {
  local shim="$1" so flags relro now canary fortify nx textrel chk why
  so="$(module_of "$shim")"
  if [ -z "$so" ]; then
    if why="$(optional_absent "$shim")"; then
      echo "hardening: $shim skipped (optional shim not built: $why)"
    else
      fail "hardening: $shim FAILED (no build/Release/*.node: run node scripts/build-shims.mjs)"
    fi
    return
  fi
  flags="$(release_flags "$shim")"
  relro=no; now=no; canary=no; fortify=no; nx=no; textrel=no
  # read each table once (grep -q on a pipe would make readelf die of SIGPIPE under pipefail)
  local segments dynamic symbols
  segments="$(readelf -lW "$so")"
  dynamic="$(readelf -dW "$so")"
  symbols="$(readelf --dyn-syms -W "$so")"
  grep -q 'GNU_RELRO' <<<"$segments" && relro=yes
  grep -Eq '\(FLAGS\).*BIND_NOW|\(FLAGS_1\).*NOW' <<<"$dynamic" && now=yes
  awk '$1 == "GNU_STACK" { found = 1; if ($7 ~ /E/) bad = 1 } END { exit !(found && !bad) }' <<<"$segments" && nx=yes
  grep -q 'TEXTREL' <<<"$dynamic" && textrel=yes
  if grep -q '__stack_chk_fail' <<<"$symbols" && grep -Eq -- '-fstack-protector-(strong|all)' <<<"$flags"; then canary=yes; fi
  # FORTIFY_SOURCE is in effect when the last word about it defines it >= 1 and optimisation is on
  local last opt
  last="$(grep -Eo -- '-(U_FORTIFY_SOURCE|D_FORTIFY_SOURCE(=[0-9])?)' <<<"$flags" | tail -n1 || true)"
  opt="$(grep -Eo -- '-O[0-9sgz]' <<<"$flags" | tail -n1 || true)"
  if [[ "$last" =~ ^-D_FORTIFY_SOURCE=([1-9])$ ]] && [ -n "$opt" ] && [ "$opt" != "-O0" ]; then fortify="yes(level ${BASH_REMATCH[1]}, $opt)"; fi
  chk="$( (grep -Eo '__[a-z0-9_]+_chk\b' <<<"$symbols" || true) | (grep -v '__stack_chk' || true) | sort -u | tr '\n' ' ' | sed 's/ $//')"
  local full=partial
  [ "$relro" = yes ] && [ "$now" = yes ] && full=full
  [ "$relro" = no ] && full=none
  local line="hardening: $shim relro=$full bind_now=$now stack_protector=$canary fortify=$fortify nx_stack=$nx textrel=$textrel fortified_calls=[${chk:-none}]"
  if [ "$full" = full ] && [ "$canary" = yes ] && [ "$fortify" != no ] && [ "$nx" = yes ] && [ "$textrel" = no ]; then
    echo "$line"
  else
    fail "$line FAILED"
  fi
}

# ---- asan ------------------------------------------------------------------------------------

cache="${SEAL_ASAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seal-bridge/asan}"
asan_flags="-fsanitize=address -fno-omit-frame-pointer -g -U_FORTIFY_SOURCE"
libasan="$(gcc -print-file-name=libasan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:detect_odr_violation=0:print_summary=1"

find_node_gyp() {
  local c
  for c in "$root/node_modules/node-gyp/bin/node-gyp.js" "$(dirname "$(command -v node)")/../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"; do
    [ -f "$c" ] && { echo "$c"; return; }
  done
  return 1
}

stamp_of() { # what the ASan build depends on
  {
    echo "$asan_flags"
    node --version
    gcc --version | head -n1
    (cd "$root/native-shims/$1" && find . -path ./build -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -d' ' -f1
}

# Builds the ASan variant of one shim into $cache/<shim>; prints its .node path on the last line.
build_asan() {
  local shim="$1" dir="$cache/$1" stamp gyp prefix t0 so
  stamp="$(stamp_of "$shim")"
  so="$(ls "$dir/build/Release/"*.node 2>/dev/null | head -n1 || true)"
  if [ -n "$so" ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
    echo "asan: $shim build up to date ($dir)"
    echo "$so"
    return 0
  fi
  gyp="$(find_node_gyp)" || { echo "asan: $shim FAILED (node-gyp not found)"; return 1; }
  prefix="$(cd "$(dirname "$(command -v node)")/.." && pwd)"
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$root/native-shims/$shim" && tar --exclude=./build -cf - .) | (cd "$dir" && tar -xf -)
  t0=$SECONDS
  local nodedir=()
  [ -f "$prefix/include/node/node_api.h" ] && nodedir=(--nodedir="$prefix")
  if ! (cd "$dir" && NODE_PATH="$root/node_modules" CFLAGS="$asan_flags" CXXFLAGS="$asan_flags" LDFLAGS="-fsanitize=address" \
    node "$gyp" rebuild "${nodedir[@]}" > "$dir/build.log" 2>&1); then
    echo "asan: $shim build FAILED (see $dir/build.log)"
    tail -n 20 "$dir/build.log"
    return 1
  fi
  so="$(ls "$dir/build/Release/"*.node | head -n1)"
  if ! readelf -dW "$so" | grep -q 'libasan'; then
    echo "asan: $shim build FAILED ($so is not linked with libasan)"
    return 1
  fi
  echo "$stamp" > "$dir/.stamp"
  echo "asan: $shim built with -fsanitize=address in $((SECONDS - t0)) s ($dir)"
  echo "$so"
}

# Runs node with libasan preloaded; fails on a sanitizer report or a non-zero exit. The drivers
# name each case on stderr before running it (asan-case: …), so a crash can be traced to its input.
run_asan() {
  local label="$1" log rc=0 last
  shift
  log="$(mktemp /tmp/seal-asan.XXXXXX)"
  # (the braces take bash's own "Aborted" notice away from the terminal)
  { LD_PRELOAD="$libasan" TSS2_LOG='all+NONE' "$@" > "$log" 2>&1 || rc=$?; } 2>/dev/null
  grep -E '^asan: ' "$log" || true
  last="$(grep -E '^asan-case: ' "$log" | tail -n1 | sed 's/^asan-case: //' || true)"
  if grep -q 'ERROR: AddressSanitizer' "$log"; then
    echo "asan: $label SANITIZER REPORT (exit $rc) in case: ${last:-?}"
    sed -n '/ERROR: AddressSanitizer/,/^==[0-9]*==ABORTING/p' "$log" | head -n 60
    rm -f "$log"
    return 1
  fi
  if [ "$rc" -ne 0 ]; then
    echo "asan: $label FAILED (exit $rc) in case: ${last:-?}"
    grep -Ev '^asan(-case)?: ' "$log" | tail -n 30
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

# A deliberate heap overflow in a library loaded into node: proves the recipe reports one.
self_test() {
  local dir="$cache/self-test" log rc=0
  mkdir -p "$dir"
  if [ ! -f "$dir/overflow.so" ]; then
    cat > "$dir/overflow.c" <<'C'
#include <stdlib.h>
#include <string.h>
__attribute__((constructor)) static void overflow(void) {
  char *volatile p = malloc(8);
  memset(p, 0, 9);
  free(p);
}
C
    gcc -shared -fPIC $asan_flags -o "$dir/overflow.so" "$dir/overflow.c"
  fi
  log="$(LD_PRELOAD="$libasan" node -e 'try { process.dlopen({ exports: {} }, process.argv[1]); } catch {}' "$dir/overflow.so" 2>&1)" || rc=$?
  if [ "$rc" -eq 86 ] && grep -q 'heap-buffer-overflow' <<<"$log"; then
    echo "asan: self-test: a heap overflow inside node is reported (heap-buffer-overflow, exit 86)"
  else
    echo "asan: self-test FAILED: a deliberate heap overflow was not reported (exit $rc)"
    head -n 20 <<<"$log"
    return 1
  fi
}

asan() {
  if [ ! -f "$libasan" ]; then
    fail "asan: FAILED (libasan not found: gcc -print-file-name=libasan.so gave $libasan)"
    return
  fi
  self_test || { status=1; return; }
  # build the three variants side by side (one compiler each), then run the drivers one by one
  local shim so out why pids=() todo=()
  mkdir -p "$cache"
  for shim in "${shims[@]}"; do
    if [ -z "$(module_of "$shim")" ] && why="$(optional_absent "$shim")"; then
      echo "asan: $shim skipped (optional shim not built: $why)"
      continue
    fi
    todo+=("$shim")
    build_asan "$shim" > "$cache/$shim.out" 2>&1 &
    pids+=($!)
  done
  local i
  for i in "${!todo[@]}"; do
    shim="${todo[$i]}"
    if ! wait "${pids[$i]}"; then
      cat "$cache/$shim.out"
      status=1
      continue
    fi
    out="$(cat "$cache/$shim.out")"
    echo "$out" | sed '$d'
    so="$(echo "$out" | tail -n1)"
    run_asan "$shim" node --expose-gc --import ./test/integration/support/ts-loader.mjs "test/asan/$shim.ts" "$so" || status=1
  done
}

run() {
  case "$mode" in
    --hardening-only) for s in "${shims[@]}"; do hardening "$s"; done ;;
    --asan-only) asan ;;
    all)
      for s in "${shims[@]}"; do hardening "$s"; done
      asan
      ;;
    *)
      echo "usage: scripts/asan-check.sh [--hardening-only | --asan-only]" >&2
      exit 2
      ;;
  esac
}

if [ -z "${SEAL_ASAN_INNER:-}" ]; then
  # the whole check runs under one time bound; a hang is a failure, not a wait
  rc=0
  SEAL_ASAN_INNER=1 timeout --kill-after=5 "$budget" "$root/scripts/asan-check.sh" "$mode" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "asan: FAILED (the check did not finish within ${budget} s)"
    exit 1
  fi
  exit "$rc"
fi
run
label=asan; [ "$mode" = --hardening-only ] && label=hardening
echo "$label: done in $((SECONDS - started)) s ($([ "$status" -eq 0 ] && echo ok || echo FAILED))"
exit "$status"
