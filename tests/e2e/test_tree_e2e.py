"""The segment tree against the real server process: RebuildTree and GetTree in every format on
traffic of a known structure, rebuilds while allocation goes on, bad requests, and a new segment
served from its parent's knowledge from its first request.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import grpc
import jsonschema
import pytest
from e2e_support import Launcher

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.hierarchy import json_schema

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
BATCH = 500
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148 Safari/604.1"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
AGENTS = {"mobile": IPHONE, "desktop": DESKTOP}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module (seed 7) without automatic tree rebuilds: these tests build
    their trees with RebuildTree, on traffic every node served (no tree limits the cascade)."""
    home = tmp_path_factory.mktemp("server")
    config = home / "no-tree-rebuilds.yaml"
    config.write_text("hierarchy:\n  enabled: false\n")
    launcher = Launcher(home, graceful=True)
    yield launcher.start("--in-memory", "--config", str(config), "--seed", "7")
    launcher.close()


# Helpers ---------------------------------------------------------------------------------------


def create(
    server: ServerProcess,
    experiment_id: str,
    segment_by: Sequence[str] = ("source", "device"),
    min_samples: int = 50,
) -> None:
    mode = pb.SEGMENTATION_MODE_MANUAL if segment_by else pb.SEGMENTATION_MODE_DISABLED
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(
            experiment=pb.Experiment(
                id=experiment_id,
                name=experiment_id,
                status=pb.EXPERIMENT_STATUS_RUNNING,
                variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                segmentation=pb.SegmentationConfig(
                    mode=mode, segment_by=list(segment_by), min_samples_per_segment=min_samples
                ),
            )
        ),
        timeout=RPC_TIMEOUT_S,
    )


def context(source: str, device: str) -> dict[str, str]:
    return {"utm_source": source, "user_agent": AGENTS[device]}


def simulate(
    server: ServerProcess,
    experiment_id: str,
    cells: dict[tuple[str, str], dict[str, float]],
    users_per_cell: int,
    rounds: int,
    seed: int,
) -> tuple[int, int]:
    """Rounds of allocations (one AllocateBatch per round, users of every (source, device) cell
    mixed) each followed by the conversions the cell's true rates give. Returns (allocations,
    conversions)."""
    rng = random.Random(seed)
    allocations = conversions = 0
    for r in range(rounds):
        users = [
            (f"{experiment_id}-{r}-{source}-{device}-{i}", source, device)
            for (source, device) in cells
            for i in range(users_per_cell)
        ]
        rng.shuffle(users)
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[
                    pb.AllocateRequest(
                        experiment_id=experiment_id, user_id=u, context=context(source, device)
                    )
                    for u, source, device in users
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        converted = []
        for (_, source, device), result in zip(users, reply.results, strict=True):
            assert result.WhichOneof("outcome") == "allocation", result
            answer = result.allocation
            if rng.random() < cells[(source, device)][answer.variant_id]:
                converted.append(pb.RecordConversionRequest(assignment_id=answer.assignment_id))
        allocations += len(users)
        for start in range(0, len(converted), BATCH):
            done = server.allocator.RecordConversionBatch(
                pb.RecordConversionBatchRequest(requests=converted[start : start + BATCH]),
                timeout=RPC_TIMEOUT_S,
            )
            assert all(x.WhichOneof("outcome") == "conversion" for x in done.results)
        conversions += len(converted)
    return allocations, conversions


def fails(call: Callable[[], object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, f"{caught.value.code()}: {caught.value.details()}"
    return str(caught.value.details())


def get_tree(server: ServerProcess, experiment_id: str, fmt: str) -> pb.GetTreeResponse:
    reply: pb.GetTreeResponse = server.admin.GetTree(
        pb.GetTreeRequest(experiment_id=experiment_id, format=fmt), timeout=RPC_TIMEOUT_S
    )
    assert reply.format == fmt
    return reply


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


# (a) Structure, formats and cascade usage ------------------------------------------------------

# instagram users on iPhones convert on B at 12 %; everyone else converts better on A.
SHAPED = {
    (source, device): (
        {"A": 0.04, "B": 0.12}
        if (source, device) == ("instagram", "mobile")
        else {"A": 0.08, "B": 0.03}
    )
    for source in ("instagram", "google", "facebook")
    for device in ("mobile", "desktop")
}


def test_rebuild_and_render_a_known_structure(server: ServerProcess) -> None:
    create(server, "tree-shape")
    allocations, conversions = simulate(server, "tree-shape", SHAPED, 60, 10, seed=1)

    rebuilt = server.admin.RebuildTree(
        pb.RebuildTreeRequest(experiment_id="tree-shape"), timeout=RPC_TIMEOUT_S
    )
    summary = rebuilt.summary
    assert summary.kept >= 2 and summary.nodes == 1 + 3 + 6, summary
    assert summary.kept + summary.pruned == summary.nodes
    assert summary.best_segment.startswith("source:instagram"), summary
    assert rebuilt.version >= 1

    document = json.loads(get_tree(server, "tree-shape", "json").content)
    jsonschema.validate(document, json_schema())
    nodes = {n["key"]: n for n in document["nodes"]}
    assert nodes[""]["visits"] == allocations and nodes[""]["conversions"] == conversions
    leaf = nodes["source:instagram|device:mobile"]
    assert leaf["best_variant"] == "B", leaf
    assert nodes["source:instagram"]["kept"] or leaf["kept"], nodes
    assert sum(n["kept"] for n in nodes.values()) == summary.kept == document["summary"]["kept"]
    assert [k for k, n in nodes.items() if n["best"]] == [summary.best_segment]

    ascii_tree = get_tree(server, "tree-shape", "ascii").content
    assert "source:instagram" in ascii_tree and "[BEST]" in ascii_tree

    page = _Collect()
    page.feed(get_tree(server, "tree-shape", "html").content)
    page.close()
    assert "html" in page.tags and "body" in page.tags
    assert "instagram" in "".join(page.text)

    dot = get_tree(server, "tree-shape", "dot").content
    assert dot.lstrip().startswith(("digraph", "strict digraph"))
    if shutil.which("dot") is not None:
        svg = subprocess.run(
            ["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=60, check=False
        )
        assert svg.returncode == 0, svg.stderr.decode(errors="replace")
        assert b"<svg" in svg.stdout

    cascade = get_tree(server, "tree-shape", "json").cascade
    assert [level.level for level in cascade] == [0, 1, 2]
    assert sum(level.share for level in cascade) == pytest.approx(1.0, abs=1e-9)
    assert sum(level.allocations for level in cascade) == allocations
    assert sum(level.conversions for level in cascade) == conversions
    for level in cascade:
        assert level.share == pytest.approx(level.allocations / allocations, abs=1e-12)


# (b) Rebuilds under load -----------------------------------------------------------------------


def test_rebuilds_while_allocating(server: ServerProcess) -> None:
    create(server, "tree-load")
    simulate(server, "tree-load", SHAPED, 20, 3, seed=2)
    target = server.target
    stop = threading.Event()
    answers: list[pb.AllocateResponse] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    cells = list(SHAPED)

    def allocate_forever(worker: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.AllocatorStub(channel)
        mine: list[pb.AllocateResponse] = []
        i = 0
        try:
            while not stop.is_set():
                source, device = cells[i % len(cells)]
                request = pb.AllocateRequest(
                    experiment_id="tree-load",
                    user_id=f"load-{worker}-{i}",
                    context=context(source, device),
                )
                mine.append(stub.Allocate(request, timeout=RPC_TIMEOUT_S))
                i += 1
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)
        finally:
            channel.close()
            with lock:
                answers.extend(mine)

    threads = [threading.Thread(target=allocate_forever, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    rebuild_errors: list[grpc.RpcError] = []
    versions = []
    try:
        time.sleep(0.2)
        for _ in range(50):
            try:
                versions.append(
                    server.admin.RebuildTree(
                        pb.RebuildTreeRequest(experiment_id="tree-load"), timeout=RPC_TIMEOUT_S
                    ).version
                )
            except grpc.RpcError as exc:
                rebuild_errors.append(exc)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=RPC_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)
    assert not rebuild_errors, rebuild_errors[:3]
    assert not errors, errors[:3]
    assert versions == sorted(versions) and len(set(versions)) == 50
    assert len(answers) >= 50, len(answers)
    for answer in answers:
        assert answer.variant_id in ("A", "B"), answer
        assert answer.cascade_level <= 2, answer
        assert answer.assignment_id and not answer.sticky


# (c) Bad requests ------------------------------------------------------------------------------


def test_rebuild_needs_segmentation_and_formats_are_checked(server: ServerProcess) -> None:
    create(server, "tree-flat", segment_by=())
    admin = server.admin
    fails(
        lambda: admin.RebuildTree(
            pb.RebuildTreeRequest(experiment_id="tree-flat"), timeout=RPC_TIMEOUT_S
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    create(server, "tree-formats")
    details = fails(
        lambda: admin.GetTree(
            pb.GetTreeRequest(experiment_id="tree-formats", format="pdf"), timeout=RPC_TIMEOUT_S
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "format" in details
    fails(
        lambda: admin.RebuildTree(
            pb.RebuildTreeRequest(experiment_id="no-such-tree"), timeout=RPC_TIMEOUT_S
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "experiment_id" in fails(
        lambda: admin.GetTree(pb.GetTreeRequest(), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# (d) Cold start --------------------------------------------------------------------------------

# instagram converts far better on B, google on A, on both devices seen so far.
PARENTS = {
    (source, device): {"A": 0.03, "B": 0.30} if source == "instagram" else {"A": 0.30, "B": 0.03}
    for source in ("instagram", "google")
    for device in ("mobile", "desktop")
}


def test_new_segment_starts_from_its_parent(server: ServerProcess) -> None:
    create(server, "tree-cold", min_samples=200)
    simulate(server, "tree-cold", PARENTS, 100, 8, seed=3)
    for source, favoured in (("instagram", "B"), ("google", "A")):
        picked = []
        for i in range(100):
            answer = server.allocator.Allocate(
                pb.AllocateRequest(
                    experiment_id="tree-cold",
                    user_id=f"newcomer-{source}-{i}",
                    context={"utm_source": source, "device": "tablet"},
                ),
                timeout=RPC_TIMEOUT_S,
            )
            # A new leaf: too few samples of its own, so its parent decides.
            assert answer.segment_key == f"source:{source}|device:tablet", answer
            assert answer.cascade_level == 1, answer
            picked.append(answer.variant_id)
        share = picked.count(favoured) / len(picked)
        assert share >= 0.8, (source, picked)
