import os

import pytest
import torch
from helpers import TINY_RECIPE, make_image_folder

# One torch thread per core: pytest-xdist runs one worker per core, and two threads per worker on two cores spin
# against each other (the subprocesses the CLI tests start read OMP_NUM_THREADS).
_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def readme_flow(tmp_path_factory):
    """The README's flow through the CLI on a tiny model and an image folder with only train/: `train` ->
    `convert RUN` (no --img-size) -> `finetune` (no --data: both come from the run), with the input sizes (last
    dimension of every 3-channel 4-D tensor a module was called on) that each step fed its models."""
    from dynamize_cli.main import run
    root = tmp_path_factory.mktemp("runs")
    data = make_image_folder(root / "data", splits=("train",))
    sets = [x for kv in TINY_RECIPE for x in ("--set", kv)]
    steps = {"train": ["train", "test_resnet", "--data", str(data), "-o", str(root / "teacher"), *sets],
             "convert": ["convert", str(root / "teacher"), "-o", str(root / "conv")],
             "finetune": ["finetune", str(root / "conv"), "--budget", "0.6", "-o", str(root / "ft"),
                          *[x for kv in TINY_RECIPE if not kv.startswith(("img_size", "in_chans"))
                            for x in ("--set", kv)]]}
    sizes = {}
    for step, argv in steps.items():
        seen = sizes[step] = set()

        def record(module, args, seen=seen):
            if args and torch.is_tensor(args[0]) and args[0].dim() == 4 and args[0].shape[1] == 3:
                seen.add(args[0].shape[-1])

        handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            assert run(argv) == 0, step
        finally:
            handle.remove()
    return {"root": root, "data": data, "sizes": sizes}


@pytest.fixture(scope="session")
def tiny_runs(readme_flow):
    """A tiny data folder and the runs of the whole CLI path on it: teacher, converted (conv), fine-tuned (ft)."""
    return readme_flow["root"], readme_flow["data"]
