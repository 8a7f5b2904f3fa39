"""The jobs: one module per --mode (main.py's MODES). Each reads and writes under --workdir and answers
`is_complete` for its own output; experiment.py only orders them."""
