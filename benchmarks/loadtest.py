"""A bounded load test of a running ``steadyclip serve``: throughput and latency as JSON.

Loopback only, a fixed number of requests and a hard time limit, so it can never
turn into a flood. Each of ``clients`` threads keeps one request in flight; every
response body is hashed, so the report also says whether all answers were identical.

    python -m benchmarks.loadtest --spawn --image examples/red_circle.png --labels "red circle,blue square"
    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --image x.png --labels a,b --clients 16

From code:
    >>> report = run_loadtest("http://127.0.0.1:8000", png_bytes, ["red circle", "blue square"])
    >>> report["throughput_rps"], report["latency_ms"]["p99"]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

_logger = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_REQUESTS = 10_000
MAX_SECONDS = 600.0


def _require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load tests only target loopback (127.0.0.1, ::1, localhost); refusing {url!r}")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (no interpolation surprises)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def run_loadtest(url: str, image_bytes: bytes | None, labels: Sequence[str], *, clients: int = 16,
                 requests: int = 200, max_seconds: float = 60.0, token: str | None = None,
                 timeout_s: float = 60.0, warmup: int = 1, texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Send ``requests`` classify requests (or, with ``texts``, ``/v1/embeddings`` requests of those
    texts) from ``clients`` threads; report throughput and latency.

    Args:
        url: base URL of the server (loopback only), e.g. ``http://127.0.0.1:8000``.
        image_bytes: the image every classify request uploads.
        labels: the labels every classify request sends.
        texts: instead of classify: every request embeds these texts (OpenAI-style ``/v1/embeddings``);
            the report adds ``texts_per_s``.
        clients: concurrent clients (threads, one connection each).
        requests: total requests to send (stops early at ``max_seconds``).
        max_seconds: hard wall-clock limit for the whole run.
        token: bearer token, if the server needs one.
        timeout_s: per-request client timeout.
        warmup: untimed requests sent first (fills the server's text-embedding cache).
    Returns:
        A JSON-able dict: counts, status codes, ``throughput_rps``, ``latency_ms`` (p50/p90/p99/max/mean),
        ``distinct_answers`` (1 when every successful response body was identical), and the server's
        ``batching`` counters for the timed part (``rows_per_forward``: how full micro-batches were).
    Raises:
        ValueError: a non-loopback URL or out-of-range bounds.
    """
    _require_loopback(url)
    if not 1 <= clients <= MAX_CLIENTS or not 1 <= requests <= MAX_REQUESTS or not 0 < max_seconds <= MAX_SECONDS:
        raise ValueError(f"clients 1..{MAX_CLIENTS}, requests 1..{MAX_REQUESTS}, max_seconds (0, {MAX_SECONDS}] "
                         f"- got {clients}, {requests}, {max_seconds}")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    post = _poster(url, headers, image_bytes, labels, texts)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    bodies: Counter[str] = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
        for _ in range(warmup):
            post(http)
        before = _batching(http)

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() >= deadline:
                return False
            issued += 1
            return True

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
            while take():
                t0 = time.perf_counter()
                try:
                    resp = post(http)
                    status, body = str(resp.status_code), resp.content
                except httpx.HTTPError as e:
                    status, body = type(e).__name__, b""
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(dt)
                        bodies[hashlib.sha256(body).hexdigest()] += 1
                    elif len(errors) < 5:
                        errors.append(f"{status}: {body[:200]!r}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"loadtest-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout_s)
    elapsed = time.perf_counter() - start
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
        after = _batching(http)
    lat = sorted(x * 1000.0 for x in latencies)
    ok = len(lat)
    server_errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    return {
        "url": url, "clients": clients, "requests": requests, "max_seconds": max_seconds,
        "sent": sum(statuses.values()), "ok": ok, "server_errors": server_errors,
        "status_counts": dict(sorted(statuses.items())), "error_samples": errors,
        "duration_s": round(elapsed, 3), "throughput_rps": round(ok / elapsed, 3) if elapsed > 0 else None,
        "latency_ms": {
            "p50": round(_percentile(lat, 50), 2), "p90": round(_percentile(lat, 90), 2),
            "p99": round(_percentile(lat, 99), 2), "max": round(lat[-1], 2) if lat else None,
            "mean": round(sum(lat) / ok, 2) if ok else None,
        },
        "distinct_answers": len(bodies),
        **({"texts_per_request": len(texts), "texts_per_s": round(ok * len(texts) / elapsed, 2) if elapsed > 0
            else None} if texts else {}),
        "batching": _batching_delta(before, after),
        "stopped_by_time_limit": sum(statuses.values()) < requests,
    }


def _poster(url: str, headers: dict[str, str], image_bytes: bytes | None, labels: Sequence[str],
            texts: Sequence[str] | None) -> Any:
    """The one request every client sends: a classify upload, or an embeddings request of ``texts``."""
    if texts:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "input": list(texts)}
        return lambda http: http.post("/v1/embeddings", json=body)
    if image_bytes is None:
        raise ValueError("give image_bytes (classify) or texts (embeddings)")
    form = {"labels": list(labels)}
    return lambda http: http.post("/v1/classify", files={"image": ("image.png", image_bytes)}, data=form)


def _batching(http: httpx.Client) -> dict[str, Any]:
    try:
        resp = http.get("/v1/model")
        return dict(resp.json().get("batching", {})) if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def _batching_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Server-side micro-batching during the timed part: forwards run and rows per forward."""
    if not before or not after:
        return {}
    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    return {"max_rows": after.get("max_rows"), "wait_ms": after.get("wait_ms"), "forwards": batches, "rows": rows,
            "rows_per_forward": round(rows / batches, 2) if batches else None,
            "largest_batch_ever": after.get("largest_batch")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawned_server(*serve_args: str, env: dict[str, str] | None = None, ready_timeout_s: float = 180.0,
                   log_path: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Start ``python -m steadyclip serve SERVE_ARGS`` on a free loopback port; yield its URL when ready."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "steadyclip", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before becoming ready ({cmd})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {ready_timeout_s:.0f}s")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", help="base URL of a running server (loopback)")
    p.add_argument("--spawn", action="store_true", help="start `python -m steadyclip serve` for the run")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for the spawned server")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--labels", required=True, help="comma-separated")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--token", default=os.environ.get("STEADYCLIP_TOKEN"))
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("give exactly one of --url or --spawn")
    image, labels = args.image.read_bytes(), [s for s in args.labels.split(",") if s.strip()]
    def run(url: str) -> dict[str, Any]:
        return run_loadtest(url, image, labels, clients=args.clients, requests=args.requests,
                            max_seconds=args.max_seconds, token=args.token)

    if args.spawn:
        with spawned_server(*args.serve_arg) as url:
            report = run(url)
    else:
        report = run(args.url)
    report["client_threads"] = args.clients
    json.dump(report, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0 if report["server_errors"] == 0 and report["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
