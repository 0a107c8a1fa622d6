"""python -m hvdtrain.slurm write-templates DIR: (re)write the job-script templates (slurm/*.sbatch)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from hvdtrain.slurm.catalogue import write_templates


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "write-templates":
        print("usage: python -m hvdtrain.slurm write-templates DIR", file=sys.stderr)
        return 2
    print("\n".join(write_templates(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
