"""`python -m engine.demo --preset NAME --out DIR`: builds a demo checkpoint folder."""

from engine.demo.checkpoints import main

main()
