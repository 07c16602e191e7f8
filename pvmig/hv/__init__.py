"""The hypervisor shim: what Xen keeps per domain (memory, log-dirty, grant tables,
event channels, hypercalls, the dom0 write journal). The bottom layer: it imports only
pvmig.errors.
"""
