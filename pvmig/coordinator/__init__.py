"""The coordinator: one migration through two agents, top to bottom (migrate.py), its
report and progress. It reaches agents through their RPCs only.
"""
