"""How commands run on a node: SSH sessions with pinned host keys (``ssh``) and parallel fan-out
(``parallel``). The only package that imports paramiko."""

from cloudml_os.remote.parallel import FanOutError, fan_out
from cloudml_os.remote.ssh import (
    CommandFailed,
    CommandResult,
    HostKeyMismatch,
    NodeSession,
    ProcessStatus,
    RemoteError,
    build_command,
    connect_node,
    wait_for_streams,
)

__all__ = [
    "CommandFailed",
    "CommandResult",
    "FanOutError",
    "HostKeyMismatch",
    "NodeSession",
    "ProcessStatus",
    "RemoteError",
    "build_command",
    "connect_node",
    "fan_out",
    "wait_for_streams",
]
