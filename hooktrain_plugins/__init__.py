"""The built-in hooktrain hooks, registered through the hooktrain.hooks entry points."""
