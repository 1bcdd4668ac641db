"""``python -m exits.evaluate``: see :mod:`exits.evaluate.metrics`."""

from exits.evaluate.metrics import main

if __name__ == "__main__":
    main()
