"""The guest "kernel": one process per domain, started by its host agent.

It maps the domain's RAM as its physical memory and runs the self-verifying memory
workload. Everything it needs to go on after a migration lives in guest RAM or in the
vCPU context it hands over at suspend, so a fresh process on the destination resumes
where the old one stopped.
"""
