"""Example trainer for cloudml-os and Cloud ML Engine: run as ``python -m trainer.task --job-dir DIR``."""
