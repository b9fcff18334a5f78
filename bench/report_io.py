"""What the report scripts share: their command line (a pytest-benchmark JSON in, an output folder) and
their outputs, ``<stem>.md`` (the README table) and ``<stem>.csv`` (keyed rows)."""
import argparse
import csv
import json
import os
from typing import Dict, Sequence, Tuple

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_benchmark_json(description: str, argv=None) -> Tuple[argparse.Namespace, Dict]:
    """Parse ``json [--out DIR]`` and load that pytest-benchmark JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    with open(args.json) as f:
        return args, json.load(f)


def write_results(out_dir: str, stem: str, markdown: str, rows: Sequence[Dict], fields: Sequence[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
