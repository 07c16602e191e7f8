"""The PV ABI frontends and backends agree on: rings, the xenstore wire, xenbus, the
guest's info page and device area, the net service's wire. Imports only pvmig.hv and
pvmig.errors.
"""
