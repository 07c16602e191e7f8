"""A host: its domains, the migrations it takes part in (sessions and their leases),
its durable records (commit log, domain records), parking and revival.
"""
