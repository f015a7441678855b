"""Prometheus metrics (one catalogue for every component) and dashboards."""
