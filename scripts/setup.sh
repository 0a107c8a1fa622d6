#!/usr/bin/env bash
# Sets up hvdtrain on a Debian machine, idempotently: OpenMPI (and, with --slurm, Slurm + MUNGE) from
# Debian packages, a virtualenv in .venv, torch, the Python dependencies, and Horovod 0.28.1 built from
# its PyPI sdist with PyTorch + MPI + Gloo and hvdtrain's patch (scripts/patches: a blocking wait no longer
# waits out Horovod's cycle, an idle rank neither spins in MPI nor coordinates every cycle, a group of gradients
# is reduced in place as one flat buffer). The Horovod wheel is cached outside the
# repository, keyed by the Horovod, torch and Python versions and the patch, so a second set-up on the same
# machine takes well under a minute. With --stock-horovod it builds Horovod without the patch (its own cache key,
# `...-stock`), and keeps a Horovod already in the venv that imports with PyTorch and has MPI or Gloo (a
# container's, your own build): everything in hvdtrain works on stock Horovod, slower (docs/horovod-patch.md).
# When nothing changed since the last good set-up (the stamp in the venv matches a hash of setup.py, this
# script, the Horovod version, the torch spec, the venv's Python and the mode, patched or stock) and the quick
# checks pass, it skips pip and the `horovodrun -cb` verification and prints one `ready` line, in a few seconds.
#
#   scripts/setup.sh            # MPI + venv + torch + Horovod + hvdtrain (editable, with test extras)
#   scripts/setup.sh --slurm    # also Slurm, MUNGE, openssh-server and iproute2: the slurm and cluster tiers
#   scripts/setup.sh --stock-horovod   # Horovod without hvdtrain's patch, or the one already in the venv
#
# Environment: HVDTRAIN_VENV (default: <repo>/.venv), HVDTRAIN_CACHE (default: ~/.cache/hvdtrain),
# PYTHON (default: python3), TORCH_SPEC (default: torch==2.13.0, used only where no torch is installed).
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
for arg in "$@"; do
  case $arg in
    --slurm) want_slurm=1 ;;
    --stock-horovod) stock=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --slurm, --stock-horovod)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- system packages ----------------------------------------------------------------------------------
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root to install ${missing[*]}: run as root or install them yourself"
    sudo=(sudo)
  fi
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
apt_install openmpi-bin libopenmpi-dev cmake g++ make patch
# The cluster tier's simulated hosts are network namespaces with their own sshd and slurmd.
[ $want_slurm -eq 1 ] && apt_install slurm-wlm munge openssh-server openssh-client iproute2

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
    import ctypes, horovod.torch.mpi_lib_v2 as lib
    assert hasattr(ctypes.CDLL(lib.__file__), "_ZN7horovod6common15AnyBlockingWaitEv")
print(torch.__version__)
PY
}

# What the ready line says of the Horovod in the venv: its version, controllers and build.
horovod_said() {
  "$py" - <<'PY' 2>/dev/null || echo "Horovod"
import ctypes, horovod, horovod.torch as hvd, horovod.torch.mpi_lib_v2 as lib
built = ", ".join(["PyTorch"] + [n for n, b in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if b])
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
    echo "horovod=$HOROVOD_VERSION torch_spec=$torch_spec repo=$repo"
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
  if [ $stock -eq 1 ]; then
    say "ready (nothing changed): $(horovod_said), torch $torch_version, venv $venv"
  else
    say "ready (nothing changed): Horovod $HOROVOD_VERSION (PyTorch, MPI, Gloo), torch $torch_version, venv $venv"
  fi
  exit 0
fi
# The full set-up from here on; the stamp is written again only once it has been verified.
rm -f "$stamp"

# --- virtualenv + torch + Python dependencies ----------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  command -v "$python" >/dev/null || apt_install python3 python3-dev
  # Debian's python3 lacks ensurepip (hence venv) until python3-venv is installed.
  "$python" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv python3-dev
  say "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
# This machine's pip config lists local indexes that may be absent; drop pip's warnings about them.
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }
if ! "$py" -c 'import torch' 2>/dev/null; then
  say "installing $torch_spec"
  pip install "$torch_spec"
fi
# Build prerequisites of Horovod, then hvdtrain's own dependencies (setup.py is the list of record).
pip install numpy cloudpickle psutil pyyaml packaging cffi wheel setuptools
if ! "$py" -c 'import mpi4py' 2>/dev/null; then
  say "building mpi4py against the system OpenMPI"
  pip install --no-binary mpi4py mpi4py
fi

# --- Horovod, built from the sdist against this torch, cached ------------------------------------------
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if [ $stock -eq 1 ]; then
  key="horovod-$HOROVOD_VERSION-torch${torch_version//+/_}-$py_tag-stock"
else
  key="horovod-$HOROVOD_VERSION-torch${torch_version//+/_}-$py_tag-patch$(sha256sum <"$horovod_patch" | cut -c1-12)"
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
    trap 'rm -rf "$build"' EXIT
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
        MAKEFLAGS=-j$(nproc)
      pip wheel --no-build-isolation --no-deps -w "$build/dist" . \
        >"$build/build.log" 2>&1 || { tail -40 "$build/build.log" >&2; die "Horovod build failed (log above)"; }
    )
    mkdir -p "$wheel_dir"
    cp "$build"/dist/horovod-*.whl "$wheel_dir/"
    say "cached $(ls "$wheel_dir")"
  fi
  say "installing Horovod from $wheel_dir"
  pip install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  echo "$key" >"$installed_key"
fi

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
checks=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "$horovodrun" -cb 2>&1) \
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
if [ $stock -eq 1 ]; then
  say "ready: $(horovod_said), torch $torch_version, venv $venv"
else
  say "ready: Horovod $HOROVOD_VERSION (PyTorch, MPI, Gloo), torch $torch_version, venv $venv"
fi
