"""torch.distributed for a Ray Train worker group on a loopback-only Ray instance: every
socket it listens on is bound to 127.0.0.1.

A laptop run's Ray instance listens on 127.0.0.1 only (``pipeline.ray_runtime.start_local_ray``),
but Ray Train's torch backend would open two more listeners on every interface: torch's
rendezvous store (``TCPStore``) in rank 0 binds its server to all interfaces whatever
address it is given, and gloo's (or NCCL's) connections listen on the interface that the
host name resolves to. Neither library takes a bind address for these, so this backend
binds the store's socket itself and hands it to torch (``master_listen_fd``), and names
the loopback interface to gloo and NCCL (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``).

A worker group whose rank 0 is not on a loopback node (any real cluster) is set up by Ray
Train's own torch backend, unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

# Ray Train's own torch backend, extended: its set-up is what runs on a cluster.
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_server: tuple[socket.socket, object] | None = None  # rank 0's listening socket and store, kept open


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil  # vendored with Ray

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return "lo"


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def open_store_server(world_size: int, timeout_s: float) -> int:
    """Rank 0: the rendezvous store's server on a socket bound to loopback; returns its port."""
    import torch.distributed as dist

    global _server
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.fileno())
    _server = (listener, store)
    return port


def join_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    interface = _loopback_interface()
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface})
    if world_rank == 0:
        store = _server[1]
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        if not _is_loopback(worker_group.execute_single(0, node_address)):
            super().on_start(worker_group, backend_config)
            return
        import ray

        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        size = len(worker_group)
        worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, open_store_server, world_size=size, timeout_s=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend, world_rank=rank,
                                                   world_size=size, port=port, timeout_s=backend_config.timeout_s)
                 for rank in range(size)])


class LoopbackTorchConfig(TorchConfig):
    """``TorchTrainer(torch_config=LoopbackTorchConfig())``: Ray Train's torch set-up, on
    loopback when the worker group is."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
