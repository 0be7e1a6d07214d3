"""`python -m dynamize_cli ...`, which is what `torchrun -m dynamize_cli finetune ...` runs on every process."""
from .main import main

main()
