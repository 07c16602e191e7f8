"""dom0 on one host: domains, the toolstack, the backends, disks, xenstored.
"""
