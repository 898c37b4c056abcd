"""``python -m gradsketch ...`` (also ``torchrun --nproc_per_node N -m gradsketch ...``): the command line."""

from .cli import main

if __name__ == "__main__":
    main()
