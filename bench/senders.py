"""Segment-style senders for the receiver benchmark, run as their own process:

    python -m bench.senders URL FILE [--threads T] [--batch B]

Reads the NDJSON FILE, builds `/v1/batch` bodies of B events (as Segment's libraries send them:
`{"batch": [...], "sentAt": ...}`, Basic auth with the write key) before the clock starts, posts
them from T keep-alive connections and prints one JSON line: events, seconds, events/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.harness import WRITE_KEY, stamp


def bodies(path: Path, batch: int) -> tuple[list[bytes], int]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sent_at = stamp(86_400)
    out = [json.dumps({"batch": events[k:k + batch], "sentAt": sent_at}, separators=(",", ":")).encode()
           for k in range(0, len(events), batch)]
    return out, len(events)


def send(url: str, part: list[bytes], errors: list[str]) -> None:
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, auth=(WRITE_KEY, ""), headers=headers, timeout=120) as client:
        for body in part:
            answer = client.post("/v1/batch", content=body)
            if answer.status_code != 200:
                errors.append(f"{answer.status_code}: {answer.text[:200]}")
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders")
    parser.add_argument("url")
    parser.add_argument("file", type=Path)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    prepared, count = bodies(args.file, args.batch)
    errors: list[str] = []
    threads = [threading.Thread(target=send, args=(args.url, prepared[k::args.threads], errors))
               for k in range(args.threads)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        print(f"senders: the receiver refused a batch: {errors[0]}", file=sys.stderr)
        return 1
    print(json.dumps({"events": count, "batches": len(prepared), "threads": args.threads,
                      "seconds": round(seconds, 3), "events_per_s": round(count / seconds)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
