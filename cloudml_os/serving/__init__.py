"""Serving: the model server runtime, the health monitor and the router in front of replicas."""
