"""Files the platform uploads to serving nodes and runs there with the node's framework runtime.

Nothing here imports ``cloudml_os``: each file must run alone on a node (see ``model_server.py``).
"""
