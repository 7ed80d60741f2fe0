"""cloudml-os: Cloud ML Engine's training and serving experience on an organisation's own OpenStack."""

__version__ = "0.1.0"
