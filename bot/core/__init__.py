"""The machinery every operation kind shares: approvals, access, lifecycle writes, grammar."""
