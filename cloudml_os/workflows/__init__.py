"""Use cases as plain functions over injected drivers, runners and stores (no Celery here)."""
