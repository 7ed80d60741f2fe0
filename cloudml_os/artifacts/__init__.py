"""Artifact stores: where packages, exported models and job outputs live."""
