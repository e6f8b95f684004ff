"""`python -m bit_transfer ...` (the form `msrun` launches) is the `bit-transfer` command."""

from bit_transfer.run import signals

signals.listen_early()  # before the CLI's imports: a signal this early is one line too (cli.main)

from bit_transfer.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
