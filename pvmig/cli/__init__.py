"""The `pvmig` command: main.py, and one module per command group.
"""
