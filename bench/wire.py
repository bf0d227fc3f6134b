"""The bare wire: the fewest `lists/subscribe` calls that carry N members, with bodies built
beforehand, posted back to back on one keep-alive connection (and, for comparison, with several
requests in flight on as many connections). This is the floor every list figure is divided by,
measured against the same emulator in the same run.

Each wire run subscribes members of its own (`wire<tag>-<i>`) to a list of its own, so the
emulator does the same work per member as for listsync's subscribes (a new profile, a new member).
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import httpx

from bench.harness import API_KEY


def subscribe_bodies(list_id: int, members: int, batch: int, tag: str) -> list[bytes]:
    """The minimum subscribe calls for `members` members, as the bodies listsync would send."""
    bodies = []
    for start in range(0, members, batch):
        subscribers = [{"email": f"wire{tag}-{i}@example.com", "userId": f"wire{tag}-{i}"}
                       for i in range(start, min(members, start + batch))]
        body = {"listId": list_id, "subscribers": subscribers, "updateExistingUsersOnly": False}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


def _client(base_url: str, connections: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(base_url=base_url, headers={"Api-Key": API_KEY, "Content-Type": "application/json"},
                        limits=limits, timeout=120)


def create_list(base_url: str, name: str) -> int:
    with _client(base_url, 1) as client:
        answer = client.post("/api/lists", json={"name": name})
        answer.raise_for_status()
        return int(answer.json()["listId"])


def bare_wire(base_url: str, members: int, *, batch: int = 1000, in_flight: int = 1, tag: str = "") -> dict[str, Any]:
    """Seconds for the minimum subscribe calls of `members` members, `in_flight` at a time."""
    list_id = create_list(base_url, f"bench-wire{tag}")
    bodies = subscribe_bodies(list_id, members, batch, tag or str(in_flight))
    with _client(base_url, in_flight) as client:
        client.get("/api/lists").raise_for_status()  # open a connection before the clock starts
        started = time.perf_counter()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_post_all, args=(client, bodies[k::in_flight], errors))
                   for k in range(in_flight)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    calls = math.ceil(members / batch)
    return {"members": members, "calls": calls, "in_flight": in_flight, "seconds": round(seconds, 3),
            "members_per_s": round(members / seconds)}


def _post_all(client: httpx.Client, bodies: list[bytes], errors: list[BaseException]) -> None:
    try:
        for body in bodies:
            answer = client.post("/api/lists/subscribe", content=body)
            answer.raise_for_status()
            if answer.json().get("failCount"):
                raise RuntimeError(f"bare wire: the emulator refused members: {answer.text[:200]}")
    except BaseException as exc:  # re-raised by the caller's thread
        errors.append(exc)
