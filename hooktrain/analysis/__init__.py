"""One-command analysis tools: `hooktrain plot`, `browse` and `benchmark`."""
