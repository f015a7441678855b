"""``python -m dmrstream``: the same CLI as the ``dmrstream`` console script."""

from dmrstream.cli import app

app(prog_name="dmrstream")
