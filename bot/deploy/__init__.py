"""Metadata deployments (`/deploy`): grammar, artifacts, service steps and messages."""
