"""Store the frozen base shared by the shipped demo models once, in half precision.

Each exported adapter model folder carries the whole base; the shipped models must stay under
40 MB together. Run after exporting the adapters, from the repository root:

    .venv/bin/python training/share_base.py VCMSynthesis/Resources/Models/demo \
        VCMSynthesis/Resources/Models/demo-t2-to-t1 VCMSynthesis/Resources/Models/demo-superres \
        --base VCMSynthesis/Resources/Models/demo-base
"""

from __future__ import annotations

import argparse
from pathlib import Path

from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.model_folder import share_base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="adapter model folders trained on one base")
    parser.add_argument("--base", type=Path, required=True, help="base-only model folder to write")
    args = parser.parse_args(argv)
    share_base(args.models, args.base)
    sizes = {folder: sum(path.stat().st_size for path in folder.iterdir())
             for folder in [*args.models, args.base]}
    for folder, size in sizes.items():
        print(f"{folder}: {size / 2**20:.1f} MiB")
    print(f"total: {sum(sizes.values()) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
