"""Framework plugins: what runs on each node of a training cluster (roles, environment, success policy)."""
