"""`dns+HOST:PORT` gateway addresses: one worker per resolved replica, kept in step with DNS."""

from __future__ import annotations

import asyncio

from stageserve.gateway import routing
from stageserve.gateway.routing import Worker, WorkerPool, least_in_flight, resolve_addresses


async def _never(worker, timeout_s):  # probes are not under test here
    return None


def make_pool(sources):
    return WorkerPool("decode", [], least_in_flight, _never, sources=sources, make_worker=lambda a: Worker(a, stub=None))


def test_plain_addresses_resolve_to_themselves():
    assert asyncio.run(resolve_addresses("10.1.2.3:50051")) == ["10.1.2.3:50051"]


def test_localhost_resolves_to_loopback():
    assert "127.0.0.1:50051" in asyncio.run(resolve_addresses("dns+localhost:50051"))


def test_unresolvable_name_gives_no_workers_not_an_error():
    assert asyncio.run(resolve_addresses("dns+no-such-host.invalid:1")) == []


def test_refresh_follows_replicas_joining_and_leaving(monkeypatch):
    answers = iter([["10.0.0.1:5", "10.0.0.2:5"], ["10.0.0.2:5", "10.0.0.3:5"], ["10.0.0.3:5"]])

    async def fake_resolve(address):
        return next(answers)

    monkeypatch.setattr(routing, "resolve_addresses", fake_resolve)
    pool = make_pool(["dns+decode:5"])

    asyncio.run(pool.refresh())
    assert [w.address for w in pool.workers] == ["10.0.0.1:5", "10.0.0.2:5"]

    busy = pool.workers[1]
    busy.in_flight = 1  # a replica that vanishes mid-request stays until its requests end, out of rotation
    asyncio.run(pool.refresh())
    assert [w.address for w in pool.workers] == ["10.0.0.2:5", "10.0.0.3:5"]

    asyncio.run(pool.refresh())
    assert [w.address for w in pool.workers] == ["10.0.0.2:5", "10.0.0.3:5"]
    assert not busy.available and pool.choose().address == "10.0.0.3:5"
    busy.in_flight = 0


def test_static_addresses_are_left_alone(monkeypatch):
    pool = WorkerPool("prefill", [Worker("a:1", stub=None)], least_in_flight, _never, sources=["a:1"],
                      make_worker=lambda a: Worker(a, stub=None))
    asyncio.run(pool.refresh())
    assert [w.address for w in pool.workers] == ["a:1"]
