"""sfp server tasks (`/sfp`): grammar, service steps and messages."""
