"""``python -m hooktrain``: see ``hooktrain.cli``."""

from hooktrain.cli import main

if __name__ == "__main__":
    main()
