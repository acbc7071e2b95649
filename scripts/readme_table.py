"""Copy the reference leaderboard's summary table into the README, so the README shows exactly
what ``make reference`` published.

    python scripts/readme_table.py           # rewrite README.md between the leaderboard markers
    python scripts/readme_table.py --check   # exit 1 if the README's table is not the file's

The table is ``results/reference/leaderboard.summary.md`` (``cfbench leaderboard --format
summary``); the README holds it between ``<!-- leaderboard:start -->`` and
``<!-- leaderboard:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUMMARY = ROOT / "results" / "reference" / "leaderboard.summary.md"
START, END = "<!-- leaderboard:start -->\n", "<!-- leaderboard:end -->\n"


def spliced(readme: str, table: str) -> str | None:
    """`readme` with the text between the markers replaced by `table`; None without them."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    return head + START + table + END + tail if start and end else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare: exit 1 when the README's table differs")
    args = parser.parse_args(argv)
    readme, table = README.read_text(), SUMMARY.read_text()
    updated = spliced(readme, table)
    if updated is None:
        print(f"readme_table: {README} lacks the markers {START.strip()} and {END.strip()}; "
              "put them around the table", file=sys.stderr)
        return 2
    if args.check:
        if updated != readme:
            print(f"readme_table: the README's table is not {SUMMARY.relative_to(ROOT)}; run "
                  "python scripts/readme_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
