"""What msrun runs in every worker: `bit-transfer fit ...`.

msrun launches a script path, which puts the script's folder first on sys.path; this file lives
alone in its own folder so that none of the package's modules can shadow another import.
"""

from bit_transfer.run import signals

signals.listen_early()  # before the CLI's imports, as in bit_transfer/__main__.py

from bit_transfer.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
