"""The README's flow, `train` -> `convert RUN` -> `finetune` -> `report`, on a tiny model and an image folder with
only train/: every step works at the data's input size, and evaluation never sees a training or calibration image."""
import json

from dynamize.io.runs import check_run
from dynamize.training.data import HeldOut
from dynamize.training.preflight import splits
from dynamize.training.recipe import load_recipe
from dynamize_cli.main import run


def _files(ds) -> set[str]:
    return {str(ds.dataset.ds.filename(i, absolute=True)) for i in ds.indices}


def test_readme_flow_keeps_the_input_size_and_holds_out_evaluation(readme_flow, tmp_path):
    root, data, sizes = readme_flow["root"], readme_flow["data"], readme_flow["sizes"]
    assert run(["report", str(root / "ft"), "-o", str(tmp_path / "report")]) == 0
    assert sizes == {"train": {32}, "convert": {32}, "finetune": {32}}
    converted = check_run(root / "conv")
    assert converted.plan.input_size == [3, 32, 32] and converted.info["head_trained"]
    assert converted.info["data"] == {"data": str(data), "data_dir": None, "img_size": 32, "in_chans": 3}
    recipe = check_run(root / "ft").info["recipe"]
    assert (recipe["model"], recipe["data"], recipe["img_size"], recipe["in_chans"]) == ("test_resnet", str(data),
                                                                                         32, 3)
    train, calib, evaluation = splits(load_recipe(None, **recipe))
    assert isinstance(evaluation, HeldOut)
    assert not _files(evaluation) & (_files(train) | _files(calib)) and not _files(train) & _files(calib)
    report = json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]
    assert report["input_size"] == [3, 32, 32] and report["data"]["img_size"] == 32
    assert report["data"]["images"] == len(evaluation)
    # The converted run, too, is evaluated on the data it records.
    assert run(["report", str(root / "conv"), "-o", str(tmp_path / "conv-report")]) == 0
    report = json.loads((tmp_path / "conv-report" / "report.json").read_text())["runs"][0]
    assert report["data"]["name"] == str(data) and report["data"]["images"] == len(evaluation)
