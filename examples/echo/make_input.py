"""Write the example job's input: N users as JSONL, with two malformed lines to show quarantine."""

import json
import sys
from pathlib import Path

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
out = Path(__file__).with_name("users.jsonl")
with out.open("w") as f:
    for i in range(n):
        f.write(json.dumps({"id": i, "name": f"user-{i}", "score": i % 97}) + "\n")
        if i == 1234:
            f.write("{not json\n")
        if i == 4321:
            f.write(json.dumps({"name": "no id here"}) + "\n")
print(out)
