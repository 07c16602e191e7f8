"""Programs built on the rest: local clusters, demo, bench, matrix, the raw-TCP
ceiling, the QEMU peer, plots, the net peer.
"""
