"""`python -m compclip.study`."""
from compclip.study.cli import main

if __name__ == "__main__":
    main()
