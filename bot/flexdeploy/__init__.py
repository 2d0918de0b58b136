"""FlexDeploy packages (`/fd`): grammar, service steps and messages."""
