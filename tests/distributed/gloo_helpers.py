"""Run a function on N CPU processes joined in a gloo process group.

    results = run_on_ranks(2, fn, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank

``fn`` must be importable by name (a module-level function), its arguments and
return value picklable. Results come back as a list ordered by rank; an
exception in any rank is re-raised here with the child's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, timeout_s):
    # One thread per process: the test machines have few cores and N ranks share them.
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # The group lives on 127.0.0.1; without this gloo may pick an interface
        # that the host name resolves to and that loopback peers cannot reach.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; torch's queue reducer would share
        # memory that disappears when this process exits.
        results.put((rank, pickle.dumps(result)))
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable, *args, timeout_s: float = 120.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each in
    its own process of one gloo group (the default group, so ``group=None`` works)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = mp.start_processes(
        _worker,
        args=(world_size, free_tcp_port(), fn, args, results, timeout_s),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected: dict[int, object] = {}

    def drain():
        while True:
            try:
                rank, payload = results.get_nowait()
            except queue.Empty:
                return
            collected[rank] = pickle.loads(payload)

    deadline = time.monotonic() + timeout_s
    try:
        while not processes.join(timeout=0.2):
            drain()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"run_on_ranks({world_size}, {fn.__name__}) took over {timeout_s} s"
                )
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.terminate()
    # The last results may still be in the pipe after the processes exit.
    wait_until = time.monotonic() + 10
    while len(collected) < world_size and time.monotonic() < wait_until:
        drain()
        time.sleep(0.01)
    if len(collected) != world_size:
        raise RuntimeError(f"only ranks {sorted(collected)} of {world_size} returned a result")
    return [collected[rank] for rank in range(world_size)]
