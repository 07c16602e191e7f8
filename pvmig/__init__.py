"""pvmig: live migration of a Xen-style paravirtualized guest, emulated in Python.

The core package: what the host agents, the guest and the coordinator share. The
guest lives in guest/, the save side of a migration in source_host/, the restore side
in dest_host/. See the README for the commands and docs/ for the model.
"""

import os as _os

# pvmig forks only to exec (guest processes, via vfork); gRPC's fork handlers are of no
# use to it and have crashed children. Must be set before grpc is imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# gRPC's core logs each failed TLS handshake to stderr; pvmig says it once, with the fix.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
