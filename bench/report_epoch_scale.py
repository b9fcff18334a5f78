"""Turn the pytest-benchmark JSON of bench/bench_epoch_scale.py into a Markdown table and a CSV.

    python bench/report_epoch_scale.py bench/results/epoch_scale.json [--out bench/results]

Per (mode, precision, teacher): the median epoch time, steps and images per epoch, images per second
and the speedup against ``perturb / fp32 / recomputed`` (the release's recipe and cost, same run).
"""
from __future__ import annotations

from report_io import add_speedups, benchmark_rows, machine_header, report_main

BASELINE = ("perturb", "fp32", "recomputed")
GOAL = (("drop", "bf16", "cached"), 2.0)  # issues 12 and 19: a drop / bf16 epoch >= 2x the release's
FIELDS = ["mode", "precision", "teacher", "base_classes", "shots", "batch", "steps_per_epoch", "images_per_epoch",
          "warmup_epochs",
          "median_s", "min_s", "rounds", "images_per_s", "speedup", "model", "device", "device_name", "threads",
          "cpu_flags", "loadavg"]


def rows_from(data: dict) -> list[dict]:
    rows = benchmark_rows(data, "epoch_scale", FIELDS)
    for row in rows:
        row["images_per_s"] = row["images_per_epoch"] / row["median_s"]
    add_speedups(rows, BASELINE)
    rows.sort(key=lambda r: -r["median_s"])
    return rows


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    machine, loadavg = machine_header(rows)
    lines = [f"{machine}; {first['model']}, {first['base_classes']} base classes, {first['shots']} "
             f"shot(s), batch {first['batch']}: {first['steps_per_epoch']} steps / {first['images_per_epoch']} "
             f"images per epoch; median of {first['rounds']} epochs after {first['warmup_epochs']} warm-up; load average "
             f"{loadavg}", "",
             "| mode | precision | teacher | epoch s (median / min) | img/s | speedup vs perturb fp32 recomputed |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['precision']} | {r['teacher']} | {r['median_s']:.1f} / {r['min_s']:.1f} | "
                     f"{r['images_per_s']:.2f} | {r['speedup']:.2f}x |")
    case, factor = GOAL
    r = next((r for r in rows if (r["mode"], r["precision"], r["teacher"]) == case), None)
    if r is not None:
        lines += ["", f"Goal: {'/'.join(case)} epoch {r['speedup']:.2f}x the release's "
                      f"(goal >= {factor:g}x, {'met' if r['speedup'] >= factor else 'not met'})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    report_main(__doc__, "epoch_scale", rows_from, markdown, FIELDS, argv)


if __name__ == "__main__":
    main()
