"""MMSegmentation 1.2.2 as a reference, in a throwaway environment (see README.md here)."""
