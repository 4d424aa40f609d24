"""``python -m vargpt ...`` = the ``vargpt`` command (for launchers: ``accelerate launch -m vargpt train ...``)."""

from vargpt.cli import main

if __name__ == "__main__":
    main()
