#!/usr/bin/env bash
# Sets up hvdtrain, idempotently: a virtualenv in .venv, torch, the Python dependencies, mpi4py and Horovod 0.28.1
# built from its PyPI sdist against the MPI found on PATH, with PyTorch + MPI + Gloo (+ NCCL where torch is a
# CUDA build) and hvdtrain's patch (scripts/patches: a blocking wait no longer waits out Horovod's cycle, an idle
# rank neither spins in MPI nor coordinates every cycle, a group of gradients is reduced in place as one flat
# buffer).
#
# Two ways to run it:
# - as root on Debian (a workstation, CI): it first installs Open MPI (and, with --slurm, Slurm, MUNGE, sshd,
#   iproute2, MPICH and Lmod for the test tiers) from Debian packages;
# - as an ordinary user, or with --user (a cluster's login node): it never calls apt-get and never needs root.
#   It uses the MPI on PATH (`module load openmpi` or an MPICH-family MPI), the python3 on PATH (a module, conda),
#   and cmake, make and a C++ compiler from PATH (cmake from PyPI where there is none). What is missing is one
#   line naming it and the fix, exit 2.
#
# mpi4py and the Horovod wheel are cached outside the repository (HVDTRAIN_CACHE), keyed by the MPI's identity
# (flavour, version, its compiler wrapper's flags), torch's version (+cpu, +cu130...), Python, Horovod and the
# patch, so two MPIs or two torches never mix and a second set-up takes well under a minute. Where torch is a
# CUDA build (what PyPI serves), the CUDA pieces come from CUDA_HOME when it matches, else from PyPI's NVIDIA
# packages (scripts/cuda_toolkit.py). With --stock-horovod it builds Horovod without the patch (its own cache
# key), and keeps a Horovod already in the venv that imports with PyTorch and has MPI or Gloo (a container's,
# your own build): everything in hvdtrain works on stock Horovod, slower (docs/horovod-patch.md).
# When nothing changed since the last good set-up (the stamp in the venv matches a hash of setup.py, this
# script, the Horovod version, the torch spec, the venv's Python, the MPI and the mode) and the quick checks
# pass, it skips pip and the `horovodrun -cb` verification and prints one `ready` line, in a few seconds.
#
#   scripts/setup.sh            # (MPI +) venv + torch + mpi4py + Horovod + hvdtrain (editable, with test extras)
#   scripts/setup.sh --user     # as root too: no apt-get, the MPI and tools on PATH (what an ordinary user gets)
#   scripts/setup.sh --slurm    # as root: also the packages of the slurm, cluster and login test tiers
#   scripts/setup.sh --stock-horovod   # Horovod without hvdtrain's patch, or the one already in the venv
#
# Environment: HVDTRAIN_VENV (default: <repo>/.venv), HVDTRAIN_CACHE (default: ~/.cache/hvdtrain),
# PYTHON (default: python3), TORCH_SPEC (default: torch==2.13.0, used only where no torch is installed).
# docs/install.md tells each way (cluster, workstation, your own environment) step by step.
set -euo pipefail

HOROVOD_VERSION=0.28.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
horovod_patch=$repo/scripts/patches/horovod-$HOROVOD_VERSION-hvdtrain.patch
venv=${HVDTRAIN_VENV:-$repo/.venv}
cache=${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
want_slurm=0
stock=0
user_mode=0
[ "$(id -u)" -ne 0 ] && user_mode=1
for arg in "$@"; do
  case $arg in
    --slurm) want_slurm=1 ;;
    --stock-horovod) stock=1 ;;
    --user) user_mode=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --user, --slurm, --stock-horovod)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
# A missing prerequisite: one line, the cause and the fix, exit 2, before anything is written.
need() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 2; }
[ $user_mode -eq 1 ] && [ $want_slurm -eq 1 ] && need "--slurm installs Debian packages as root; run it as root, or leave it out (an ordinary user needs no Slurm packages to submit)"

# --- system packages ----------------------------------------------------------------------------------
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  apt_changed=1
  say "installing Debian packages: ${missing[*]}"
  # Packages with daemons (openssh-server, slurm-wlm, munge) must not start them: the tests start their own and
  # stop exactly those. Debian asks /usr/sbin/policy-rc.d; exit 101 means "do not start" (kept if one exists).
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\n# written by hvdtrain scripts/setup.sh while it installs packages\nexit 101\n' \
      | "${sudo[@]}" tee $policy >/dev/null && "${sudo[@]}" chmod 755 $policy && made_policy=1
  fi
  local rc=0
  { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      >/dev/null; } || rc=$?
  [ $made_policy -eq 0 ] || "${sudo[@]}" rm -f $policy
  [ $rc -eq 0 ] || die "apt-get could not install ${missing[*]} (exit $rc)"
}
apt_changed=0
if [ $user_mode -eq 0 ]; then
  apt_install openmpi-bin libopenmpi-dev cmake g++ make patch
  # The cluster tier's simulated hosts are network namespaces with their own sshd and slurmd; the login tier
  # loads Open MPI or MPICH as Lmod modules for an ordinary account.
  [ $want_slurm -eq 1 ] && apt_install slurm-wlm munge openssh-server openssh-client iproute2 mpich libmpich-dev lmod
else
  # An ordinary user: the tools come from PATH (modules); nothing is installed system-wide.
  command -v "$python" >/dev/null || need "no $python on PATH: load your site's Python module (e.g. \`module load python\`) or activate conda, or set PYTHON=/path/to/python3"
  command -v g++ >/dev/null || command -v c++ >/dev/null || need "no C++ compiler (g++) on PATH: load your site's compiler module, e.g. \`module load gcc\`"
  command -v make >/dev/null || need "no make on PATH: load your site's build tools module, or ask your admins for make"
  [ $stock -eq 1 ] || command -v patch >/dev/null || need "no patch on PATH (it applies hvdtrain's Horovod patch): ask your admins for patch, or run with --stock-horovod"
fi

# --- the MPI on PATH: its identity keys mpi4py's and Horovod's wheels ----------------------------------------
mpicc=$(command -v mpicc || true)
mpiexec=$(command -v mpirun || command -v mpiexec || true)
[ -n "$mpicc" ] || need "no mpicc on PATH: load your site's MPI module, e.g. \`module load openmpi\` or \`module load mpich\`"
[ -n "$mpiexec" ] || need "no mpirun or mpiexec on PATH beside $mpicc: load your site's whole MPI module, e.g. \`module load openmpi\`"
# Which MPI: from what its launcher says of itself (never from a name) and what its compiler wrapper links.
mpi_said=$("$mpiexec" --version 2>&1 | head -20 || true)
case $mpi_said in
  *"Open MPI"*|*OpenRTE*) mpi_flavour=openmpi; mpi_version=$(grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' <<<"$mpi_said" | head -1) ;;
  *"Intel(R) MPI"*) mpi_flavour=intelmpi; mpi_version=$(grep -Eo 'Version [0-9.]+' <<<"$mpi_said" | head -1 | cut -d' ' -f2) ;;
  *HYDRA*) mpi_flavour=mpich; mpi_version=$(awk '/Version:/ {print $2; exit}' <<<"$mpi_said") ;;
  *) need "cannot tell which MPI $mpiexec is (\`$(basename "$mpiexec") --version\` printed: $(head -1 <<<"$mpi_said")): load an Open MPI or MPICH-family MPI module" ;;
esac
mpicc_show=$("$mpicc" -show 2>/dev/null || "$mpicc" --showme 2>/dev/null || true)
case $mpicc_show in
  *-lmpich*|*mpich*) cc_flavour=mpich ;;
  *-lmpi*) if "$mpicc" --showme:version 2>/dev/null | grep -q "Open MPI"; then cc_flavour=openmpi; else cc_flavour=mpich; fi ;;
  *) need "$mpicc does not show how it links MPI (\`mpicc -show\` printed nothing): load your site's MPI module again" ;;
esac
launcher_family=$mpi_flavour; [ "$mpi_flavour" = intelmpi ] && launcher_family=mpich
[ "$cc_flavour" = "$launcher_family" ] || need "mpicc ($mpicc, $cc_flavour) and $(basename "$mpiexec") ($mpiexec, $mpi_flavour) are different MPIs: load one MPI module only (\`module purge; module load <mpi>\`)"
mpi_id="$mpi_flavour-$mpi_version-$(printf '%s\n%s\n' "$(readlink -f "$mpicc")" "$mpicc_show" | sha256sum | cut -c1-8)"
# Root-only settings of Open MPI, only where root runs it.
root_env=()
[ "$(id -u)" -eq 0 ] && root_env=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)

# --- nothing changed since the last set-up? ----------------------------------------------------------
py=$venv/bin/python
stamp=$venv/.hvdtrain-setup-stamp

# Prints torch's version when Horovod imports with PyTorch, was built with MPI and Gloo, and has hvdtrain's
# patch in (its library exports AnyBlockingWait). With --stock-horovod: when Horovod (any version, patched or not)
# imports with PyTorch and was built with MPI or Gloo.
horovod_ok() {
  "$py" - "$HOROVOD_VERSION" "$stock" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
stock = sys.argv[2] == "1"
assert stock or md.version("horovod") == sys.argv[1]
import horovod.torch as hvd, horovod, json, os, torch
if stock:
    assert hvd.mpi_built() or hvd.gloo_built()
else:
    meta = json.load(open(os.path.join(os.path.dirname(horovod.__file__), "metadata.json")))
    assert hvd.mpi_built() and hvd.gloo_built()
    assert torch.version.cuda is None or hvd.nccl_built()  # a CUDA torch gets NCCL operations
    import ctypes, horovod.torch.mpi_lib_v2 as lib
    assert hasattr(ctypes.CDLL(lib.__file__), "_ZN7horovod6common15AnyBlockingWaitEv")
print(torch.__version__)
PY
}

# What the ready line says of the Horovod in the venv: its version, controllers and build.
horovod_said() {
  "$py" - <<'PY' 2>/dev/null || echo "Horovod"
import ctypes, horovod, horovod.torch as hvd, horovod.torch.mpi_lib_v2 as lib
built = ", ".join(["PyTorch"] + [n for n, b in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built()), ("NCCL", hvd.nccl_built())) if b])
patched = hasattr(ctypes.CDLL(lib.__file__), "_ZN7horovod6common15AnyBlockingWaitEv")
print(f"Horovod {horovod.__version__} ({built}; " + ("hvdtrain's patch)" if patched else "stock)"))
PY
}

# hvdtrain is installed editable from this repository, with every requirement of setup.py (and the test
# extras) installed at a version that satisfies it.
hvdtrain_ok() {
  [ -f "$repo/setup.py" ] || return 0
  "$py" -I - "$repo" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, os, sys
from packaging.requirements import Requirement
for text in md.distribution("hvdtrain").requires or []:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": "test"}):
        assert req.specifier.contains(md.version(req.name), prereleases=True), text
origin = importlib.util.find_spec("hvdtrain").origin
assert os.path.realpath(os.path.dirname(origin)) == os.path.realpath(os.path.join(sys.argv[1], "hvdtrain"))
PY
}

# What the pip part of the set-up depends on. --slurm is not in it: it changes only the Debian packages,
# which apt_install checks on every run. --stock-horovod is, and the patch only without it.
setup_key() {
  {
    echo "horovod=$HOROVOD_VERSION torch_spec=$torch_spec repo=$repo mpi=$mpi_id"
    echo "python=$(readlink -f "$py") $("$py" -c 'import sys; print(sys.version)')"
    sha256sum <"${BASH_SOURCE[0]}"
    if [ $stock -eq 1 ]; then echo "stock Horovod"; else sha256sum <"$horovod_patch"; fi
    if [ -f "$repo/setup.py" ]; then sha256sum <"$repo/setup.py"; else echo "no setup.py"; fi
  } | sha256sum | cut -d' ' -f1
}

# horovodrun: the venv's; with --stock-horovod a kept Horovod's may be elsewhere on PATH (a system site module).
find_horovodrun() {
  if [ $stock -eq 1 ] && [ ! -x "$venv/bin/horovodrun" ]; then
    PATH="$venv/bin:$PATH" command -v horovodrun || echo "$venv/bin/horovodrun"
  else
    echo "$venv/bin/horovodrun"
  fi
}
horovodrun=$(find_horovodrun)
if [ $apt_changed -eq 0 ] && [ -x "$py" ] && [ -x "$horovodrun" ] && [ -s "$stamp" ] \
  && [ "$(cat "$stamp")" = "$(setup_key)" ] && torch_version=$(horovod_ok) && hvdtrain_ok; then
  say "ready (nothing changed): $(horovod_said), torch $torch_version, $mpi_flavour $mpi_version, venv $venv"
  exit 0
fi
# The full set-up from here on; the stamp is written again only once it has been verified.
rm -f "$stamp"

# --- virtualenv + torch + Python dependencies ----------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  if [ $user_mode -eq 0 ]; then
    command -v "$python" >/dev/null || apt_install python3 python3-dev
    # Debian's python3 lacks ensurepip (hence venv) until python3-venv is installed.
    "$python" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv python3-dev
  else
    "$python" -c 'import ensurepip, venv' 2>/dev/null || need "$(command -v "$python") cannot make a virtualenv (no ensurepip): load a Python module that has venv, or set PYTHON to one"
  fi
  say "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
# This machine's pip config lists local indexes that may be absent; drop pip's warnings about them.
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }
py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# mpi4py built against this MPI, its wheel cached by the MPI's identity: pip's own wheel cache is keyed by the
# sdist alone and would hand a wheel built against another MPI to the next venv. Its build is one compiler process
# for minutes: it runs in the background (a session of its own, ended with the script) beside torch's download and
# Horovod's build, and is waited for before anything needs it.
installed_mpi=$venv/.hvdtrain-mpi
mpi4py_dir=$cache/wheels/mpi4py-$py_tag-$mpi_id
mpi4py_log=$cache/logs/mpi4py-$py_tag-$mpi_id.log
mpi4py_build=""
build=""
cleanup() {
  if [ -n "$mpi4py_build" ]; then kill -- "-$mpi4py_build" 2>/dev/null || true; wait "$mpi4py_build" 2>/dev/null; rm -rf "$mpi4py_dir.tmp"; fi
  [ -z "$build" ] || rm -rf "$build"
}
trap cleanup EXIT
mpi4py_wanted() { [ "$(cat "$installed_mpi" 2>/dev/null)" != "$mpi_id" ] || ! "$py" -c 'import mpi4py' 2>/dev/null; }
if mpi4py_wanted && ! ls "$mpi4py_dir"/mpi4py-*.whl >/dev/null 2>&1; then
  say "building mpi4py against $mpi_flavour $mpi_version ($mpicc), in the background"
  mkdir -p "$cache/logs" && rm -rf "$mpi4py_dir.tmp" && mkdir -p "$mpi4py_dir.tmp"
  MPICC=$mpicc setsid "$py" -m pip --disable-pip-version-check wheel --no-cache-dir --no-binary mpi4py --no-deps \
    -w "$mpi4py_dir.tmp" mpi4py >"$mpi4py_log" 2>&1 &
  mpi4py_build=$!
fi
# Waits for the background build (its errors and log on failure), then installs the wheel of this MPI.
finish_mpi4py() {
  if [ -n "$mpi4py_build" ]; then
    local rc=0
    wait "$mpi4py_build" || rc=$?
    mpi4py_build=""
    if [ $rc -ne 0 ]; then
      printf '[setup] the mpi4py build failed; the lines that say why (whole log: %s):\n' "$mpi4py_log" >&2
      grep -E -A4 'error:|fatal error|Error [0-9]+|No such file' "$mpi4py_log" | grep -v '^--$' | head -30 >&2
      die "mpi4py build against $mpicc failed (cause above; whole log: $mpi4py_log)"
    fi
    mv "$mpi4py_dir.tmp" "$mpi4py_dir"
  fi
  if mpi4py_wanted; then
    pip install --force-reinstall --no-deps "$mpi4py_dir"/mpi4py-*.whl
    echo "$mpi_id" >"$installed_mpi"
  fi
}

if ! "$py" -c 'import torch' 2>/dev/null; then
  say "installing $torch_spec"
  pip install "$torch_spec"
fi
# Build prerequisites of Horovod, then hvdtrain's own dependencies (setup.py is the list of record).
pip install numpy cloudpickle psutil pyyaml packaging cffi wheel setuptools
# cmake from PyPI where PATH has none (a login node without a cmake module).
command -v cmake >/dev/null || [ -x "$venv/bin/cmake" ] || { say "no cmake on PATH: installing cmake from PyPI into $venv"; pip install cmake; }
export PATH=$PATH:$venv/bin

# --- Horovod, built from the sdist against this torch, cached ------------------------------------------
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
if [ $stock -eq 1 ]; then
  key="horovod-$HOROVOD_VERSION-torch${torch_version//+/_}-$py_tag-$mpi_id-stock"
else
  key="horovod-$HOROVOD_VERSION-torch${torch_version//+/_}-$py_tag-$mpi_id-patch$(sha256sum <"$horovod_patch" | cut -c1-12)"
fi
wheel_dir=$cache/wheels/$key

# The key of the wheel installed in this venv: a Horovod built from another key (an older patch) is replaced.
# --stock-horovod keeps any Horovod that passes its check (its own stock wheel, a container's, the user's own
# build) but hvdtrain's patched wheel, which it replaces with the stock one.
installed_key=$venv/.hvdtrain-horovod-wheel
installed=$(cat "$installed_key" 2>/dev/null || true)
if [ $stock -eq 1 ] && [[ $installed != *-patch* ]] && horovod_ok >/dev/null; then
  [ "$installed" = "$key" ] || say "keeping $(horovod_said) already in $venv (--stock-horovod: not rebuilt)"
elif ! horovod_ok >/dev/null || [ "$installed" != "$key" ]; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    if [ $stock -eq 1 ]; then what="Horovod $HOROVOD_VERSION (stock, without hvdtrain's patch)"; else what="Horovod $HOROVOD_VERSION"; fi
    say "building $what against torch $torch_version (about 5 minutes on 2 cores)"
    build=$(mktemp -d)
    pip download --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
    tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
    src=$build/horovod-$HOROVOD_VERSION
    # torch >= 2.1 needs C++17; Horovod 0.28.1 asks for C++14. Both files must change, or Gloo (built
    # as C++14) and the torch op library disagree at link time (see shared notes, upstream PR #3998).
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
      grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "unexpected Horovod sdist: no C++14 line in $f"
      sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    done
    if [ $stock -eq 0 ]; then
      patch -s -p1 -d "$src" <"$horovod_patch" || die "hvdtrain's patch does not apply to the Horovod sdist: $horovod_patch"
    fi
    (
      cd "$src"
      export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_GPU_OPERATIONS= \
        MAKEFLAGS=-j$(nproc) MPICC=$mpicc
      # A CUDA torch: the toolkit and NCCL (CUDA_HOME's when it matches, else PyPI's), HOROVOD_GPU_OPERATIONS=NCCL.
      # A CPU torch prints nothing.
      cuda_env=$("$py" "$repo/scripts/cuda_toolkit.py" --cache "$cache") || exit 1
      eval "$cuda_env"
      log=$cache/logs/$key.log
      mkdir -p "$cache/logs"
      pip wheel --no-build-isolation --no-deps -w "$build/dist" . >"$log" 2>&1 || {
        # The lines that say why (CMake's errors, the compiler's), not the tail of pip's traceback.
        printf '[setup] the Horovod build failed; the lines that say why (whole log: %s):\n' "$log" >&2
        grep -E -A4 'CMake Error|Could NOT find|fatal error|error:|Error [0-9]+|No such file' "$log" \
          | grep -v '^--$' | head -40 >&2
        die "Horovod build failed (cause above; whole log: $log)"
      }
    )
    mkdir -p "$wheel_dir"
    cp "$build"/dist/horovod-*.whl "$wheel_dir/"
    say "cached $(ls "$wheel_dir")"
  fi
  say "installing Horovod from $wheel_dir"
  pip install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  echo "$key" >"$installed_key"
fi

finish_mpi4py

# --- hvdtrain itself -----------------------------------------------------------------------------------
if [ -f "$repo/setup.py" ]; then
  pip install -e "$repo[test]"
fi

# --- verify ---------------------------------------------------------------------------------------------
if [ $stock -eq 1 ]; then
  horovod_ok >/dev/null || die "Horovod does not import with PyTorch and MPI or Gloo; remove $wheel_dir and run again"
else
  horovod_ok >/dev/null || die "Horovod does not import with PyTorch + MPI + Gloo; remove $wheel_dir and run again"
fi
horovodrun=$(find_horovodrun)
checks=$(env "${root_env[@]}" "$horovodrun" -cb 2>&1) \
  || die "horovodrun -cb failed: $checks"
if [ $stock -eq 1 ]; then
  grep -q "\[X\] PyTorch" <<<"$checks" || die "Horovod was built without PyTorch:"$'\n'"$checks"
  grep -Eq "\[X\] (MPI|Gloo)" <<<"$checks" || die "Horovod was built with neither MPI nor Gloo:"$'\n'"$checks"
else
  for want in PyTorch MPI Gloo; do
    grep -q "\[X\] $want" <<<"$checks" || die "Horovod was built without $want:"$'\n'"$checks"
  done
fi
hvdtrain_ok || die "hvdtrain or one of its requirements is not installed in $venv (pip output above)"
setup_key >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
say "ready: $(horovod_said), torch $torch_version, $mpi_flavour $mpi_version, venv $venv"
