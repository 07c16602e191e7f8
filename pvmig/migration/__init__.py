"""A migration's vocabulary and parts, shared by both sides and the coordinator:
policies and defaults, session states, page batches, the pre-copy policy, injection
points, device state, verification, recovery.
"""
