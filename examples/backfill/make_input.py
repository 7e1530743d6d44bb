"""Write one day's input for the backfill example: ``users-<DATE>.jsonl`` with N users (default 1,000)."""

import json
import sys
from pathlib import Path

date = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
out = Path(__file__).with_name(f"users-{date}.jsonl")
with out.open("w") as f:
    for i in range(n):
        f.write(json.dumps({"id": i, "name": f"user-{i}", "day": date}) + "\n")
print(out)
