"""``python -m gpu_align <command>``: the same as the ``gpu-align`` console script."""

from gpu_align.cli import main

if __name__ == "__main__":  # the guard matters: multiprocessing's spawn re-imports this module in the packer process
    main()
