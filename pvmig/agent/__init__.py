"""The host agent: its gRPC server, one thin servicer per service, its watchdog.
"""
