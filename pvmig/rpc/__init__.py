"""How processes reach each other: gRPC channels, the agent client, security, the
mapping of pvmig's errors to status codes.
"""
