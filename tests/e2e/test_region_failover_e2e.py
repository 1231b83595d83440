"""A region's PostgreSQL goes down (a TCP proxy in front of it is cut): its users are still
allocated, from the region's last known counts; their assignments wait in the region's own
in-process write-behind buffer; their conversions are refused with UNAVAILABLE (never
acknowledged, never written to another region) and succeed on retry once the store is back;
nothing of the region's users lands in the other region's store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import grpc
import pytest
from e2e_support import fetch, launch_process, stop_process, wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 10.0
WAIT_S = 30.0


class CutProxy:
    """A 127.0.0.1 TCP proxy in front of PostgreSQL; `cut()` drops every connection and
    refuses new ones (the store is down) until `restore()`."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        if "host" in query and query["host"][0].startswith("/"):
            port = query.get("port", ["5432"])[0]
            self._unix: str | None = f"{query['host'][0]}/.s.PGSQL.{port}"
        else:
            self._unix = None
        self._tcp = (parts.hostname or "127.0.0.1", parts.port or 5432)
        user = parts.username or "postgres"
        auth = user if parts.password is None else f"{user}:{parts.password}"
        self._base = (parts.scheme, auth, parts.path)
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    @property
    def dsn(self) -> str:
        scheme, auth, path = self._base
        return urlunsplit((scheme, f"{auth}@127.0.0.1:{self.port}", path, "", ""))

    async def _serve(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.close()
            return
        if self._unix is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def _cut(self) -> None:
        self._down = True
        for writer in list(self._writers):
            writer.transport.abort()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_down", False)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def users_in(dsn: str) -> set[str]:
    rows = asyncio.run(
        fetch(dsn, "SELECT user_id FROM assignments UNION SELECT user_id FROM conversions")
    )
    return {r[0] for r in rows if r[0] is not None}


@pytest.fixture
def eu_proxy(second_db: str) -> Iterator[CutProxy]:
    running = CutProxy(second_db)
    yield running
    running.close()


def test_region_store_down(
    tmp_path: Path, migrated_db: str, second_db: str, eu_proxy: CutProxy, fresh_redis: str
) -> None:
    us_dsn, eu_dsn = migrated_db, second_db
    config = tmp_path / "regions.json"
    config.write_text(
        json.dumps(
            {
                "seed": 9,
                "regions": {
                    "default_region": "us-east",
                    "sync_interval": 0.5,
                    "regions": [
                        {"code": "us-east", "countries": ["US"], "postgres_dsn": us_dsn,
                         "redis_url": fresh_redis},
                        {"code": "eu-west", "countries": ["DE"], "postgres_dsn": eu_proxy.dsn,
                         "redis_url": fresh_redis, "gdpr": True, "failover_region": "us-east"},
                    ],
                },
            }
        )
    )  # fmt: skip
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    try:
        allocator, admin = pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel)
        admin.CreateExperiment(
            pb.CreateExperimentRequest(
                experiment=pb.Experiment(
                    id="fo",
                    name="fo",
                    status=pb.EXPERIMENT_STATUS_RUNNING,
                    variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )

        def allocate(user: str, country: str) -> pb.AllocateResponse:
            return allocator.Allocate(
                pb.AllocateRequest(
                    experiment_id="fo", user_id=user, context={"country_code": country}
                ),
                timeout=RPC_TIMEOUT_S,
            )

        def reaches_eu() -> bool:
            try:
                return allocate("probe-0", "DE").region == "eu-west"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return False

        wait_for("the experiment in eu-west", reaches_eu, WAIT_S, poll=0.2)
        before = [allocate(f"DE-up-{i}", "DE") for i in range(10)]
        wait_for(
            "eu writes",
            lambda: {f"DE-up-{i}" for i in range(10)} <= users_in(eu_dsn),
            WAIT_S,
            poll=0.2,
        )

        eu_proxy.cut()
        down = [allocate(f"DE-down-{i}", "DE") for i in range(20)]
        assert {a.region for a in down} == {"eu-west"}
        # Sticky answers of users seen before still come from the region's memory.
        assert [allocate(f"DE-up-{i}", "DE").assignment_id for i in range(10)] == [
            a.assignment_id for a in before
        ]
        refused = 0
        for a in down[:5]:
            try:
                allocator.RecordConversion(
                    pb.RecordConversionRequest(assignment_id=a.assignment_id, value=1.0),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                refused += 1
        assert refused == 5
        us = allocate("US-during", "US")
        assert us.region == "us-east"
        allocator.RecordConversion(
            pb.RecordConversionRequest(assignment_id=us.assignment_id), timeout=RPC_TIMEOUT_S
        )

        def eu_unhealthy() -> bool:
            listed = admin.ListRegions(pb.ListRegionsRequest(), timeout=RPC_TIMEOUT_S)
            return not next(r for r in listed.regions if r.code == "eu-west").healthy

        wait_for("eu-west reported unhealthy", eu_unhealthy, WAIT_S, poll=0.2)
        time.sleep(1.0)  # several flush and sync intervals while eu-west is down
        assert not any(u.startswith("DE-") for u in users_in(us_dsn))
        assert "US-during" in users_in(us_dsn)

        eu_proxy.restore()
        wanted = {f"DE-down-{i}" for i in range(20)}
        wait_for(
            "the spooled assignments in eu-west",
            lambda: wanted <= users_in(eu_dsn),
            WAIT_S,
            poll=0.2,
        )
        for a in down[:5]:
            answer = allocator.RecordConversion(
                pb.RecordConversionRequest(assignment_id=a.assignment_id, value=1.0),
                timeout=RPC_TIMEOUT_S,
            )
            assert answer.counted and answer.region == "eu-west"
        converted = asyncio.run(
            fetch(eu_dsn, "SELECT count(*) FROM conversions WHERE user_id LIKE 'DE-down-%'")
        )
        assert converted[0][0] == 5
        assert not any(u.startswith("DE-") for u in users_in(us_dsn))
        assert not any(u.startswith("US-") for u in users_in(eu_dsn))
    finally:
        code = stop_process(proc, channel, timeout=30)
    assert code == 0, log.read_text()
