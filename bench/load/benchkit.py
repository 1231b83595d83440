"""What the benchmark scripts share: the request context they allocate with, their experiments'
segmentation, a line describing the machine, waiting for a server they started to serve, and
finding (or installing) ghz.

Scripts in bench/load/ import it as `benchkit`, those in bench/ as `load.benchkit` (each runs
with its own folder first on the path).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from allocsvc._proto import allocsvc_pb2 as pb

# Pinned: through the Go module proxy `@latest` resolves to v0.93.0, which has no
# --max-recv-message-size and whose reflection client cannot resolve allocsvc's services.
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz@v0.120.0"
# A flag v0.93.0 lacks and the harnesses pass: a ghz without it is too old to use.
GHZ_NEEDED_FLAG = "--max-recv-message-size"

# An Instagram visitor on an iPhone in the US: every request extracts source, device and country.
CONTEXT = {
    "utm_source": "instagram",
    "user_agent": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
    ),
    "country_code": "US",
}


def manual_segmentation() -> pb.SegmentationConfig:
    """Segments by source and device, at least 100 samples a segment."""
    return pb.SegmentationConfig(
        mode=pb.SEGMENTATION_MODE_MANUAL,
        segment_by=["source", "device"],
        min_samples_per_segment=100,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    """CPU model, core count, kernel, Python and grpcio versions."""
    return (
        f"{cpu_model()}, nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


def log_entry(log: Path, msg: str) -> dict[str, Any]:
    """The first JSON line of a server's log whose `msg` is `msg` ({} while there is none)."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == msg:
            return entry
    return {}


def wait_health(
    target: str,
    deadline: float,
    alive: Callable[[], None] = lambda: None,
    every: float = 0.05,
) -> None:
    """Poll the standard health service at `target` until it answers SERVING, by `deadline`
    (time.monotonic()); `alive` raises when the server has died meanwhile."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(every)
    raise RuntimeError(f"{target}: health not SERVING in time")


RESULTS = Path(__file__).resolve().parent.parent / "RESULTS.md"


# In a section a bench writes, what follows this line (written by hand: earlier runs side by
# side, what each showed) is kept when the bench writes the section again.
BY_HAND = "<!-- by hand below: kept when the bench rewrites this section -->"


def write_section(section: str, text: str, results: Path = RESULTS) -> None:
    """Replace the section of bench/RESULTS.md headed by the line `section` (up to the next
    `## ` heading) with `text`, or append it; a part of the old section from a `BY_HAND` line
    on stays, after `text`. The file is read just before writing: other benchmarks write
    their own sections."""
    current = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)

    def replaced(old: re.Match[str]) -> str:
        _, marker, by_hand = old.group(0).partition(f"\n{BY_HAND}\n")
        kept = f"\n{BY_HAND}\n{by_hand.rstrip()}\n" if marker else ""
        return text.rstrip("\n") + "\n" + kept + "\n"

    if pattern.search(current):
        updated = pattern.sub(replaced, current, count=1)
        updated = updated.rstrip("\n") + "\n"
    else:
        updated = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    results.write_text(updated)


def debian_programs(package: str, *programs: str) -> list[str]:
    """The paths of `programs`, with Debian's `package` installed by apt-get first when one of
    them is not on the PATH; RuntimeError naming the package when one is still missing."""
    if not all(shutil.which(p) for p in programs):
        command = ["apt-get", "install", "-y", package]
        print(f"installing {package}: {' '.join(command)}", file=sys.stderr)
        subprocess.run(command, check=True, timeout=600, stdout=subprocess.DEVNULL)
    found = [shutil.which(p) for p in programs]
    missing = [p for p, path in zip(programs, found, strict=True) if not path]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: apt-get install {package}")
    return [path for path in found if path]


def _ghz_usable(path: str) -> bool:
    """Whether the ghz at `path` is recent enough (`ghz --version` says only "dev" for builds
    from `go install`, so its flags tell)."""
    try:
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return GHZ_NEEDED_FLAG in done.stdout + done.stderr


def find_ghz(install: bool = True) -> str | None:
    """A usable ghz: on the PATH or in ~/go/bin, else (with `install`) GHZ_MODULE installed with
    `go install` into GOPATH/bin, replacing an older one there. None without ghz or Go."""
    candidates = [shutil.which("ghz"), str(Path.home() / "go" / "bin" / "ghz")]
    for path in candidates:
        if path and Path(path).exists() and _ghz_usable(path):
            return path
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if not install or go is None:
        return None
    print(f"installing ghz: {go} install {GHZ_MODULE}", file=sys.stderr)
    subprocess.run([go, "install", GHZ_MODULE], check=True, timeout=900)
    gopath = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, check=True)
    path = str(Path(gopath.stdout.strip()) / "bin" / "ghz")
    if not _ghz_usable(path):
        raise RuntimeError(f"{path} (from {GHZ_MODULE}) lacks {GHZ_NEEDED_FLAG}")
    return path
