#!/usr/bin/env bash
# The C ABI from C and C++, with AddressSanitizer (+ LeakSanitizer) and
# UndefinedBehaviorSanitizer:
#   1. include/cachegen.h compiles on its own (C11, C99 and C++17, -Wall -Wextra -Wpedantic -Werror);
#   2. tests/c/abi_test.c     (C11) on the real fixture, store/lookup/load across layouts, error paths;
#   3. tests/cpp/abi_test.cpp (C++17) RAII wrapper round trip;
#   4. integrations/c/example.c, built as its README says, with the sanitizers, and (where cmake
#      is installed) through the generated CMake package.
# Expected load results are the CLI's own encode + decode of each 64-token chunk
# of the fixture (tests/c/split_chunks.py splits it). Work files: target/c-tests/.
#
# Needs gcc, g++, pkg-config, python3 (installed with apt-get when missing) and
# cargo. Builds the release library first (cargo build --release; a no-op when
# it is up to date; CACHEGEN_SKIP_BUILD=1 skips it). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$REPO/target/c-tests"
FIXTURE="$REPO/fixtures/smollm2-kernel-doc-320.safetensors"
step() { printf '\n== %s\n' "$*"; }
T0=$SECONDS
FAILED=()

# ---------------------------------------------------------------- tools
missing=()
for tool in gcc g++ pkg-config python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    pkgs=()
    for tool in "${missing[@]}"; do
        case "$tool" in
            python3) pkgs+=(python3-minimal) ;;
            *) pkgs+=("$tool") ;;
        esac
    done
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y "${pkgs[@]}"; then
        $SUDO apt-get update
        $SUDO apt-get install -y "${pkgs[@]}"
    fi
fi

# ---------------------------------------------------------------- build
if [ "${CACHEGEN_SKIP_BUILD:-0}" != 1 ]; then
    step "cargo build --release"
    cargo build --release
fi
for f in target/release/libcachegen.so target/release/cachegen; do
    [ -e "$f" ] || { echo "c_tests: $f is missing (cargo build --release)" >&2; exit 1; }
done

step "pkg-config"
scripts/gen_pkgconfig.sh
export PKG_CONFIG_PATH="$REPO/target/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# shellcheck disable=SC2207
PC=($(pkg-config --cflags --libs cachegen))
echo "cachegen $(pkg-config --modversion cachegen): ${PC[*]}"

rm -rf "$WORK"
mkdir -p "$WORK"

# ------------------------------------------------ expected decoded chunks
step "expected chunks: the CLI's encode --level default + decode of each 64-token chunk"
python3 tests/c/split_chunks.py "$FIXTURE" "$WORK" 64
for f in "$WORK"/chunk_*.safetensors; do
    c="${f##*/chunk_}"
    c="${c%.safetensors}"
    target/release/cachegen encode --level default "$f" "$WORK/chunk_$c.cg"
    target/release/cachegen decode "$WORK/chunk_$c.cg" "$WORK/decoded_$c.safetensors"
done

# ---------------------------------------------------------- header alone
step "include/cachegen.h compiles on its own"
HEADER_OK=1
printf '#include <cachegen.h>\nint main(void) { return cg_version() == 0; }\n' >"$WORK/header_only.c"
cp "$WORK/header_only.c" "$WORK/header_only.cpp"
WARN=(-Wall -Wextra -Wpedantic -Werror)
for std in c11 c99; do
    if gcc -std=$std "${WARN[@]}" "$WORK/header_only.c" -o "$WORK/header_only_$std" "${PC[@]}" 2>"$WORK/header_$std.log"; then
        echo "C ($std): ok"
    else
        HEADER_OK=0
        echo "C ($std): FAILED"
        head -n 8 "$WORK/header_$std.log"
    fi
done
if g++ -std=c++17 "${WARN[@]}" "$WORK/header_only.cpp" -o "$WORK/header_only_cpp" "${PC[@]}" 2>"$WORK/header_cpp.log"; then
    echo "C++17: ok"
else
    HEADER_OK=0
    echo "C++17: FAILED"
    head -n 8 "$WORK/header_cpp.log"
fi
if [ "$HEADER_OK" = 0 ]; then
    FAILED+=("include/cachegen.h does not compile")
fi

# --------------------------------------------------------- the programs
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
CFLAGS=(-std=c11 -O1 "${SAN[@]}" -Wall -Wextra -Werror -pthread)
CXXFLAGS=(-std=c++17 -O1 "${SAN[@]}" -Wall -Wextra -Werror -pthread)
# LeakSanitizer is on by default with ASan on Linux; made explicit. No
# suppression file is needed (checked with libcachegen 0.1.0): the library
# allocates through the interposed malloc, cg_context_free joins its worker
# threads, and what stays allocated at exit (the thread-local error string)
# is still reachable, which LeakSanitizer does not report.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

run() {  # NAME COMMAND...: runs it, records a failure
    local name="$1"
    shift
    step "$name"
    local t=$SECONDS
    if "$@"; then
        echo "-- $name: passed ($((SECONDS - t)) s)"
    else
        echo "-- $name: FAILED (exit $?)"
        FAILED+=("$name")
    fi
}

build_and_run() {  # NAME COMPILER FLAGS_ARRAY_NAME SOURCE OUTPUT ARGS...
    local name="$1" cc="$2" flags="$3[@]" src="$4" out="$5"
    shift 5
    if "$cc" "${!flags}" "$src" -o "$out" "${PC[@]}"; then
        run "$name" "$out" "$@"
    else
        step "$name"
        echo "-- $name: FAILED to compile"
        FAILED+=("$name (compile)")
    fi
}

build_and_run "C11 ABI test (tests/c/abi_test.c)" gcc CFLAGS tests/c/abi_test.c "$WORK/abi_test" "$FIXTURE" "$WORK"
build_and_run "C++17 RAII test (tests/cpp/abi_test.cpp)" g++ CXXFLAGS tests/cpp/abi_test.cpp "$WORK/abi_test_cpp" "$FIXTURE" "$WORK"
build_and_run "integrations/c/example.c (sanitizers)" gcc CFLAGS integrations/c/example.c "$WORK/example_asan"
# And exactly as integrations/c/README.md builds it.
PLAIN=(-std=c11 -O2 -Wall -Wextra)
build_and_run "integrations/c/example.c (README recipe)" gcc PLAIN integrations/c/example.c "$WORK/example"

# The CMake package files (only where cmake is installed; it is not required).
cmake_example() {
    mkdir -p "$WORK/cmake"
    cat >"$WORK/cmake/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.16)
project(cachegen_example C)
find_package(cachegen 0.1 REQUIRED)
add_executable(example "$REPO/integrations/c/example.c")
target_link_libraries(example PRIVATE cachegen::cachegen)
CMAKE
    if cmake -S "$WORK/cmake" -B "$WORK/cmake/build" -Dcachegen_DIR="$REPO/target/cmake/cachegen" >"$WORK/cmake/configure.log" 2>&1 &&
        cmake --build "$WORK/cmake/build" >"$WORK/cmake/build.log" 2>&1; then
        "$WORK/cmake/build/example"
    else
        cat "$WORK"/cmake/*.log
        return 1
    fi
}
if command -v cmake >/dev/null 2>&1; then
    run "integrations/c/example.c (CMake find_package)" cmake_example
else
    step "CMake package: skipped (cmake is not installed)"
fi

# ---------------------------------------------------------------- result
echo
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "c_tests: FAILED ($((SECONDS - T0)) s):"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
echo "c_tests: all passed ($((SECONDS - T0)) s)"
