from magic_align.cli import app

app()
