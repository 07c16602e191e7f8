"""pvmig: live migration of a Xen-style paravirtualized guest, emulated in Python.

The core package: what the host agents, the guest and the coordinator share. The
guest lives in guest/, the save side of a migration in source_host/, the restore side
in dest_host/. See the README for the commands and docs/ for the model.
"""

__version__ = "0.1.0"
