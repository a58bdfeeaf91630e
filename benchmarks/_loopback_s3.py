"""Moto's S3 server on 127.0.0.1 for benchmarks, in its own process so that it does not compete
with the measured process for the GIL. Benchmarks start their own server; nothing leaves loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import boto3


def start_s3(bucket: str = "bench") -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start the server with one bucket; returns (process, fsspec storage options)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )
    for _ in range(150):
        try:
            client.create_bucket(Bucket=bucket)
            break
        except Exception:  # noqa: BLE001  (server still starting)
            time.sleep(0.2)
    else:
        server.kill()
        raise RuntimeError(f"moto server did not start on {endpoint}")
    return server, {
        "endpoint_url": endpoint,
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"region_name": "us-east-1"},
    }
