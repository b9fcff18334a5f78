"""Writing a report's outputs: ``<stem>.md`` (the README table) and ``<stem>.csv`` (keyed rows)."""
import csv
import os
from typing import Dict, Sequence


def write_results(out_dir: str, stem: str, markdown: str, rows: Sequence[Dict], fields: Sequence[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
