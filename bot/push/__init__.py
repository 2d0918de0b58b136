"""Push upgrades (`/push`): grammar, service steps and messages."""
