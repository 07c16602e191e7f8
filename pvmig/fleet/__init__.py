"""A fleet: N agents named in a fleet file, and what moves domains among them under its
caps (evacuate, rebalance). It talks to the agents only through their RPCs, and runs each
migration with the coordinator (pvmig.coordinator.migrate), several at once."""
