"""`python -m bit_transfer ...` (the form `msrun` launches) is the `bit-transfer` command."""

from bit_transfer.cli import main

if __name__ == "__main__":
    main()
