"""`python -m xsae_cli`: the entry point that launchers (accelerate, torchrun, deepspeed) re-run."""

from xsae_cli.cli import app

if __name__ == "__main__":
    app(prog_name="xsae")
