"""Entry point: ``python cli.py {fit,validate,test,predict} --config configs/<x>.yaml``."""
from seqmodels.cli import main

if __name__ == "__main__":
    main()
