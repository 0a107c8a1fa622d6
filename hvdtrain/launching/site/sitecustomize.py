"""Put first on a rank's PYTHONPATH by the rank wrapper (hvdtrain.launching.ranklink): every Python process of
the rank dumps its stacks (all threads) into the rank's stack record when the wrapper sends HVDTRAIN_STACKS_SIGNAL,
which it does when the hang watchdog asks for them. Then the sitecustomize this one hides, if any, runs as usual.

Only a descriptor that is the wrapper's record (a memfd named hvdtrain-stacks) is used: a process started by the
rank with other descriptors under that number gets nothing. Standard library only: this runs in every process.
"""

import faulthandler
import os
import sys


def _register() -> None:
    fd, signum = os.environ.get("HVDTRAIN_STACKS_FD", ""), os.environ.get("HVDTRAIN_STACKS_SIGNAL", "")
    if not (fd.isdigit() and signum.isdigit()):
        return
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:hvdtrain-stacks"):
            return
        faulthandler.register(int(signum), file=int(fd), all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError):
        pass


def _chain() -> None:
    """Import the next sitecustomize on sys.path (a site's or a distribution's), as if this one were not there."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    mine = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import sitecustomize  # noqa: F401
    except ImportError:
        if mine is not None:
            sys.modules["sitecustomize"] = mine
    finally:
        sys.path[:] = saved


_register()
_chain()
