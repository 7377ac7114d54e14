"""Rebuild a compare table from a `pbp-fx compare` log, for a run that was cut short.

compare writes compare.md/json only at the end; its log has one line per finished run. This
turns those lines into the same table and verdict (validation scores are not in the log).

    python bench/compare_from_log.py bench/results/compare_mnist1d_cnn.log "header text" > out.md
"""
from __future__ import annotations

import re
import sys

from pbp_fx.compare import markdown, paired, summarize, verdict

LINE = re.compile(r"^\s+(\S+)\s+seed (\d+): test ([\d.]+) %\s+params (\d+)\s+epochs (\d+)\s+\((\d+) s(?:, ([\d.]+) ms)?\)")


def rows_from_log(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                arm, seed, test, params, epochs, secs, lat = m.groups()
                row = {"arm": arm, "seed": int(seed), "test": float(test) / 100, "params": int(params),
                       "epochs": int(epochs), "seconds": float(secs)}
                if lat is not None:
                    row["latency_ms"] = float(lat)
                rows.append(row)
    # Only seeds where every arm finished: a partial seed would unbalance the pairing.
    arms = {r["arm"] for r in rows}
    complete = {s for s in {r["seed"] for r in rows} if {r["arm"] for r in rows if r["seed"] == s} == arms}
    return [r for r in rows if r["seed"] in complete]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = rows_from_log(argv[0])
    summary, pairs = summarize(rows), paired(rows)
    print(markdown(summary, pairs, verdict(summary, pairs), argv[1] if len(argv) > 1 else argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
