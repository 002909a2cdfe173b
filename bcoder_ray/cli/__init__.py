"""The command lines: `bcoder-run`, `bcoder-evaluate`, `bcoder-generate` once installed (setup.cfg), or
`python experiments/<name>.py` from a checkout."""
