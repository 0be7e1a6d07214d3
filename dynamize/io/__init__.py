"""Run directories (config.json + model.safetensors) and atomic writes."""
from .atomic import write_dir, write_file, write_json, write_text
from .runs import CONFIG, WEIGHTS, check_run, latest_run, load, load_base, new_run_dir, save, save_base

__all__ = ["write_dir", "write_file", "write_json", "write_text", "CONFIG", "WEIGHTS", "check_run", "latest_run",
           "load", "load_base", "new_run_dir", "save", "save_base"]
