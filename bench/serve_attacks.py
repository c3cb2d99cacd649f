"""Count the submit-time attacks of tests/test_serve_guest.py that a `tuneforge serve` holds or lets through.

    python bench/serve_attacks.py                # this checkout, with the suite's serve options
    PYTHONPATH=/old/src python bench/serve_attacks.py --plain   # another tuneforge, without the new options

Held = refused with a 4xx; got through = accepted (201; the job is cancelled at once so nothing runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx  # noqa: E402
import tiny  # noqa: E402
from test_serve_guest import ATTACKS, Guest, _fill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true", help="start serve without --allow-tracker/--disk-quota/--sandbox")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        guest = Guest(root / "srv", tiny.build_model(root / "llama", "llama"), server_args=[] if opts.plain else None)
        held, through = [], []
        try:
            for name, body, _status, _loc in ATTACKS:
                body = _fill(body, guest.listener.port)
                (body["input"] if "input" in body else body)["run_id"] = name
                r = guest.post("alice", body)
                (held if 400 <= r.status_code < 500 else through).append(f"{name}:{r.status_code}")
                if r.status_code == 201:
                    httpx.post(f"{guest.server.url}/v1/jobs/{r.json()['id']}/cancel", headers=guest.auth("alice"), timeout=30)
        finally:
            guest.server.stop()
        print(json.dumps({"attempts": len(ATTACKS), "held": len(held), "got_through": len(through),
                          "through": through, "listener_connections": guest.listener.count}, indent=1))


if __name__ == "__main__":
    main()
