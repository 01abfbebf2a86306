"""Tools for local development and tests (not used by running services)."""
