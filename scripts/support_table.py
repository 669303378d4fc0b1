"""Write the README's architecture support table from models/architectures.py.

python scripts/support_table.py           # rewrite the table between the README markers
python scripts/support_table.py --check   # exit 1 when the README differs from the registry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_export.models.support_table import update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args()
    current = update_readme(args.readme, check=args.check)
    if args.check and not current:
        print(
            f"{args.readme}: architecture table differs from the registry; "
            "run python scripts/support_table.py",
            file=sys.stderr,
        )
        return 1
    print(f"{args.readme}: architecture table {'current' if current else 'rewritten'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
