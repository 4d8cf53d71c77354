"""``clipvisor.ray.scan``: a dataset scan (``clipvisor-scan``) spread over a Ray cluster.

The scan's own sharding does the work: shard ``i`` of ``n`` runs ``clipvisor-scan ... --shard i/n``
in a Ray task, through the node-local supervisor of the node it lands on (so a hang or a crash is
a row and a skip-log entry on that node, never a stuck task), into ``out/shard-i``; the driver
then merges the shards into ``out`` (``clipvisor-scan merge``), which writes the CSV, Parquet and
the report. ``out`` must be on storage every node can write (a shared file system).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import ray

from ._datasource import node_socket


def _scan_shard(arguments: List[str], supervisor: Optional[str], binary: Optional[str], serve_args: List[str]) -> int:
    from clipvisor.scan.cli import main

    return main(arguments + ["--socket", node_socket(supervisor, binary, serve_args), "--no-progress"])


def scan(
    inputs: Sequence[str],
    out: str,
    *,
    shards: Optional[int] = None,
    args: Sequence[str] = (),
    supervisor: Optional[str] = None,
    binary: Optional[str] = None,
    serve_args: Sequence[str] = (),
    num_cpus: float = 0.5,
) -> Dict[str, Any]:
    """Scans ``inputs`` (directories, list files, manifests: as ``clipvisor-scan``) into ``out``.

    ``shards``: how many Ray tasks (default: the cluster's CPUs, at most 64); ``args``: further
    ``clipvisor-scan`` options (``["--verify", "--qwen"]``...); ``supervisor``, ``binary`` and
    ``serve_args``: as for :func:`read_videos`. Each task needs little CPU (the decoding runs in the node's
    supervisor), hence ``num_cpus=0.5``. Returns the merged summary (samples, clips, failed,
    usable, verify_bad); raises ``RuntimeError`` naming the shards that failed.
    """
    if not inputs:
        raise ValueError("give at least one input")
    if not ray.is_initialized():
        ray.init()
    if shards is None:
        shards = max(1, min(64, int(ray.cluster_resources().get("CPU", 1))))
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    shard_dirs = [os.path.join(out, f"shard-{i}") for i in range(shards)]
    task = ray.remote(num_cpus=num_cpus, max_retries=0)(_scan_shard)
    pending = []
    for i in range(shards):
        arguments = list(inputs) + ["--out", shard_dirs[i], "--shard", f"{i}/{shards}"] + list(args)
        pending.append(task.remote(arguments, supervisor, binary, list(serve_args)))
    codes = ray.get(pending)
    failed = [f"shard {i} (exit {code})" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise RuntimeError(f"clipvisor.ray.scan: {', '.join(failed)}; their output is in {out}/shard-*")
    from clipvisor.scan.cli import merge

    return merge(out, shard_dirs)
